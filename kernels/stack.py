"""One persistent launch for a whole stack of equal layers (same cell and hidden size, one direction).

Dimension letters as in recurrent.py, plus L, the layers. The grid is (P, L): program (j, l) owns hidden units
j of layer l and holds on chip, for the whole loop, its slices of W_hh^l and, for l > 0, of W_ih^l (forward) or
of W_ih^{l+1} (backward). The layers run as a wavefront: at step s layer l handles time t = s - l (forward) or
t = T - 1 - s + (L - 1 - l) (backward), so a stack of L layers takes T + L - 1 grid barriers instead of L * T.

Forward: layer 0 reads its input projection (one GEMM on the host, as a single layer does); layer l > 0 projects
its input in the loop, from the output of layer l - 1 at the same t (after dropout), written one step earlier.
Backward: layer l adds to dL/dy_t the gradient of its output through layer l + 1's input weights, from layer
l + 1's gate gradients at the same t, written one step earlier. The weight gradients are GEMMs over all steps
on the host afterwards, as for a single layer.

With ``SYNC=False`` the host launches one wavefront step at a time (the launch boundary is the barrier): the
interpreter, which runs programs one after another, tests that mode.
"""

import triton
import triton.language as tl

from .dropout import DROPOUT_NONE, dropout_scale
from .recurrent import (
    _bwd_recurrent_step,
    _cell_bwd,
    _cell_fwd,
    _emit,
    _load_gate_tiles,
    _load_h_prev,
    _load_input_preacts,
    _operand,
    _program_units,
    _recurrent_preacts,
    _ring_slot,
    _ring_tag,
    _saved_c_prev,
    _store_tagged_gates,
    _tile,
    _weight_units,
)
from .sync import arrive, grid_barrier, tag_of, tag_pack, wait_each


@triton.jit(do_not_specialize=["T", "B", "s_start", "n_steps", "seed_ptr", "p_drop"])
def stack_fwd_kernel(
    xproj,  # [T, B, G*H] layer 0's input projection plus the biases that can be folded in
    w_ih,  # [L-1, G*H, H] the input weights of layers 1..L-1
    bias,  # [L-1, G*H] the folded biases of layers 1..L-1 (b_ih + b_hh; GRU's n gate b_in alone)
    w_hh,  # [L, G*H, H]
    b_hn,  # [L, H] GRU's hidden bias of the n gate; unused by other cells
    hseq,  # [L, T+1, B, H] each layer's hidden states: h_t at row t + 1, the initial state at row 0
    state,  # [L, B, H] ACC: LSTM c, GRU h in full precision; initial state in, final state out
    saved,  # [L, T, B, S*H] in the layer's dtype: what backward needs (recurrent._cell_fwd; written when SAVE)
    z,  # [L-1, T, B, H] dropout(h) of layers 0..L-2, the next layer's input (DROPOUT)
    counter,  # [L, P] int32, zeroed: the grid barrier's (counter[0, 0]), or each program's steps done (TAGGED)
    seed_ptr,  # [L] int64: each layer's dropout seed
    T,
    B,
    s_start,  # runs wavefront steps s_start, ..., s_start + n_steps - 1 (of T + L - 1)
    n_steps,
    p_drop,
    H: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr,
    SAVE: tl.constexpr,
    SYNC: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ring=None,  # [L, 2, B, H] words (TAGGED): each layer's h exchange, slot 0 holding h0 under tag 1 (sync.py)
    TAGGED: tl.constexpr = False,
    K_SPLIT: tl.constexpr = 1,  # both reductions (h and the layer's input) in K_SPLIT chunks (recurrent._dot_k)
    W_T: tl.constexpr = False,  # w_ih and w_hh hold each layer's matrix transposed, [., H, G*H] (float32 on FMA)
):
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    n_layers = tl.num_programs(1)
    layer = tl.program_id(1).to(tl.int64)
    below = tl.maximum(layer - 1, 0)
    if TAGGED:
        ring += layer * 2 * B * H
    # TAGGED: each program's count of its steps done ([L, P]); the counts of the layer this one reads.
    my_count = counter + layer * tl.num_programs(0) + tl.program_id(0)
    counts_read = counter + below * tl.num_programs(0)
    seed = tl.load(seed_ptr + layer)
    o_j, m_j, o_k, m_k = _program_units(H, BLOCK_H, BLOCK_K)
    w_hh += layer * (G * H * H)
    w_ih += below * (G * H * H)
    hseq += layer * (T + 1) * B * H
    state += layer * B * H
    saved += layer * T * B * (S * H)
    # This layer's input for l > 0: the layer below's output after dropout, or its hidden states (h_t at row t + 1).
    if DROPOUT != DROPOUT_NONE:
        inputs = z + below * T * B * H
    else:
        inputs = hseq - (layer - below) * (T + 1) * B * H + B * H
    z += layer * T * B * H
    # W[g*H + j, k] at w + (g*H + j) * W_UNIT + k * W_RED, for W_hh and W_ih alike. The FMA dots (float32 without
    # TF32) read a held tile a unit a lane: row-major, a warp's units lie 4*H bytes apart, in one bank; transposed,
    # side by side (as recurrent.rnn_fwd_kernel's W_T).
    W_UNIT: tl.constexpr = 1 if W_T else H
    W_RED: tl.constexpr = G * H if W_T else 1
    # Tiles over the reduction's units: recurrent._tile.
    o_kw = _weight_units(0, BLOCK_K, K_SPLIT, W_T)
    m_wr, m_wu = _tile(m_j, o_kw < H, K_SPLIT, True, W_T)
    m_w = m_wr & m_wu
    # (Conditions on the layer are spelled as vectors: the interpreter refuses masks made with int64 scalars.)
    m_u = m_w & _tile(m_j, (o_kw * 0 + layer) > 0, K_SPLIT, True, W_T)[1]
    o_wr, o_wu = _tile(o_j * W_UNIT, o_kw * W_RED, K_SPLIT, True, W_T)
    # b_w{g}[k, j] = W_hh[g*H + j, k], b_u{g}[k, j] = W_ih[g*H + j, k]: loaded once, resident for all steps.
    b_w0, b_w1, b_w2, b_w3 = _load_gate_tiles(w_hh + o_wr + o_wu, m_w, H * W_UNIT, G, K_SPLIT, W_T)
    b_u0, b_u1, b_u2, b_u3 = _load_gate_tiles(w_ih + o_wr + o_wu, m_u, H * W_UNIT, G, K_SPLIT, W_T)
    b_b0, b_b1, b_b2, b_b3 = _load_input_preacts(bias + below * (G * H) + o_j[None, :], m_j[None, :], H, G, ACC)
    b_bhn = tl.load(b_hn + layer * H + o_j, mask=m_j, other=0.0).to(ACC)
    out_ty = hseq.dtype.element_ty

    for s in range(n_steps):
        t = (s_start + s).to(tl.int64) - layer
        if (t >= 0) & (t < T):
            if TAGGED:
                if layer > 0:
                    # No grid barrier: wait for the layer below's step t (each of its programs counts its steps).
                    wait_each(counts_read, tl.num_programs(0), t + 1)
            for b0 in range(0, B, BLOCK_B):
                o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                m_b = o_b < B
                row = t * B + o_b
                m_bj = m_b[:, None] & m_j[None, :]
                m_br, m_bu = _tile(m_b, m_k, K_SPLIT, False)
                o_br, o_bu = _tile(o_b * H, o_k, K_SPLIT, False)
                m_bk = m_br & m_bu
                o_bk = o_br + o_bu
                # h_{t-1} of every unit of this layer (the step count of a layer's exchange is t).
                b_h = _operand(_load_h_prev(hseq + t * B * H + o_bk, ring, t, o_bk, m_bk, B, H, out_ty, TAGGED),
                               K_SPLIT, False)  # fmt: skip
                r0, r1, r2, r3 = _recurrent_preacts(
                    b_h, b_w0, b_w1, b_w2, b_w3, hseq + row * H, m_b, w_hh + o_j * W_UNIT, m_j, H, H * W_UNIT,
                    G, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT, W_RED,
                )  # fmt: skip
                if layer == 0:
                    x0, x1, x2, x3 = _load_input_preacts(xproj + row[:, None] * (G * H) + o_j[None, :], m_bj, H, G, ACC)
                else:
                    # The layer below's output at t, written by all its programs one barrier ago.
                    b_x = tl.load(inputs + t * B * H + o_bk, mask=m_bk, other=0.0, cache_modifier=".cg")
                    x0, x1, x2, x3 = _recurrent_preacts(
                        _operand(b_x, K_SPLIT, False), b_u0, b_u1, b_u2, b_u3, inputs + row * H, m_b,
                        w_ih + o_j * W_UNIT, m_j, H, H * W_UNIT, G, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST,
                        K_SPLIT, W_RED,
                    )  # fmt: skip
                    x0 += b_b0
                    x1 += b_b1
                    x2 += b_b2
                    x3 += b_b3
                b_hnew = _cell_fwd(
                    x0, x1, x2, x3, r0, r1, r2, r3, b_bhn, state + o_b[:, None] * H + o_j[None, :],
                    saved + row[:, None] * (S * H) + o_j[None, :], m_bj, m_bj, H, CELL, SAVE, False,
                )  # fmt: skip
                b_hout = b_hnew.to(out_ty)
                tl.store(hseq + (row + B)[:, None] * H + o_j[None, :], b_hout, mask=m_bj)
                if TAGGED:
                    word = ring.dtype.element_ty
                    p_w = ring + ((t + 1) % 2) * B * H + o_b[:, None] * H + o_j[None, :]
                    tl.store(p_w, tag_pack(b_hout, tag_of(t + 2, word), word), mask=m_bj)
                if layer < n_layers - 1:
                    # Dropout between layers only: the output of the top layer is h itself.
                    _emit(
                        z, z, z, b_hout.to(ACC), t, o_b, m_b, o_j, m_j, 0, seed, p_drop, B, H, 1, False, False,
                        DROPOUT, m_bj, False,
                    )  # fmt: skip
            if TAGGED:
                if layer < n_layers - 1:
                    arrive(my_count)  # this step's output, for the layer above
                else:
                    tl.debug_barrier()  # this program's threads reread what others of it wrote (c, saved)
        if SYNC and not TAGGED:
            grid_barrier(counter, (s + 1) * num_programs)


@triton.jit(do_not_specialize=["T", "B", "s_start", "n_steps", "finish", "seed_ptr", "p_drop"])
def stack_bwd_kernel(
    w_ih,  # [L-1, G*H, H] the input weights of layers 1..L-1
    w_hh,  # [L, G*H, H]
    hseq,  # [L, T+1, B, H] from the forward
    saved,  # [L, T, B, S*H] from the forward (recurrent._cell_fwd)
    c0,  # [L, B, H] ACC: LSTM's initial cell states
    grad_y,  # [T, B, H] dL/d(the top layer's output), or [L, T, B, H] every layer's (ALL_LAYERS)
    grad_above,  # [L, B, H] ACC scratch: dL/d(layer l's output) through layer l + 1, this step
    grad_gates,  # [L, T, B, G*H] out: dL/d(recurrent pre-activations W_hh h_{t-1} + b_hh)
    grad_xgates,  # [L, T, B, G*H] out, GRU only: dL/d(input pre-activations x W_ih^T + b_ih) (else grad_gates)
    grad_h,  # [L, B, H] ACC: dL/dh_n in, dL/dh0 out
    grad_c,  # [L, B, H] ACC: dL/dc_n in, dL/dc0 out (LSTM)
    counter,  # [L, P] int32, zeroed: the grid barrier's (counter[0, 0]), or each program's steps done (TAGGED)
    seed_ptr,  # [L] int64: each layer's dropout seed
    T,
    B,
    s_start,  # runs wavefront steps s_start, ..., s_start + n_steps - 1 (of T + L - 1)
    n_steps,
    finish,  # nonzero: after the steps, carry each layer's gate gradients at t = 0 into grad_h (dL/dh0)
    p_drop,
    H: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr,
    SYNC: tl.constexpr,
    DROPOUT: tl.constexpr,
    ALL_LAYERS: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ring=None,  # [L, 2, B, G*H] words, zeroed (TAGGED): each layer's exchange of gate gradients (sync.py)
    TAGGED: tl.constexpr = False,
    K_SPLIT: tl.constexpr = 1,  # both reductions (over W_hh and the layer above's W_ih) in K_SPLIT chunks
):
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    n_layers = tl.num_programs(1)
    # Top layer first in program order: the interpreter, which runs programs one after another, can then run the
    # TAGGED mode in one launch (each layer only waits for the one above).
    layer = (n_layers - 1 - tl.program_id(1)).to(tl.int64)
    above = tl.minimum(layer + 1, n_layers - 1)
    if TAGGED:
        ring += layer * 2 * B * (G * H)
    # TAGGED: each program's count of its steps done ([L, P]); the counts of the layer this one reads.
    my_count = counter + layer * tl.num_programs(0) + tl.program_id(0)
    counts_read = counter + above * tl.num_programs(0)
    seed = tl.load(seed_ptr + layer)
    o_j, m_j, o_k, m_k = _program_units(H, BLOCK_H, BLOCK_K)
    w_hh += layer * (G * H * H)
    w_ih += (above - 1) * (G * H * H)
    hseq += layer * (T + 1) * B * H
    saved += layer * T * B * (S * H)
    c0 += layer * B * H
    if ALL_LAYERS:
        grad_y += layer * T * B * H
    grad_above += layer * B * H
    grad_h += layer * B * H
    grad_c += layer * B * H
    # The layer above's input-side gate gradients (for the top layer: its own, never read).
    xgates_above = grad_xgates + above * T * B * (G * H)
    grad_gates += layer * T * B * (G * H)
    grad_xgates += layer * T * B * (G * H)
    o_kw = _weight_units(0, BLOCK_K, K_SPLIT, True)
    m_wr, m_wu = _tile(m_j, o_kw < H, K_SPLIT, True, True)
    # (Conditions on the layer are spelled as vectors: the interpreter refuses masks made with int64 scalars.)
    top = (o_j * 0 + layer) == n_layers - 1
    # b_w{g}[k, j] = W_hh^l[g*H + k, j], b_u{g}[k, j] = W_ih^{l+1}[g*H + k, j]: resident for all steps.
    o_wr, o_wu = _tile(o_j, o_kw * H, K_SPLIT, True, True)
    b_w0, b_w1, b_w2, b_w3 = _load_gate_tiles(w_hh + o_wr + o_wu, m_wr & m_wu, H * H, G, K_SPLIT, True)
    m_u = (m_wr & ~_tile(top, o_kw < H, K_SPLIT, True, True)[0]) & m_wu
    b_u0, b_u1, b_u2, b_u3 = _load_gate_tiles(w_ih + o_wr + o_wu, m_u, H * H, G, K_SPLIT, True)
    o_w = o_j.to(tl.int64)

    for s in range(n_steps):
        t = T - 1 - (s_start + s).to(tl.int64) + (n_layers - 1 - layer)
        k = T - 1 - t  # this layer's backward step count: its tagged words of step k sit in slot k % 2, tag k + 1
        if (t >= 0) & (t < T):
            if t < T - 1:
                _bwd_recurrent_step(
                    grad_gates, grad_h, t + 1, B, o_j, m_j, o_k, m_k, b_w0, b_w1, b_w2, b_w3, w_hh + o_j, H,
                    G, 1, H, BLOCK_B, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST, True,
                    _ring_slot(ring, (k - 1) % 2, B, G, H, TAGGED), _ring_tag(ring, k, TAGGED), TAGGED, K_SPLIT,
                )  # fmt: skip
            if TAGGED:
                if layer < n_layers - 1:
                    # No grid barrier: wait for the layer above's step at t (each of its programs counts its steps).
                    wait_each(counts_read, tl.num_programs(0), k + 1)
            if layer < n_layers - 1:
                # dL/d(this layer's output at t) through the layer above, whose step t ran one barrier ago.
                _bwd_recurrent_step(
                    xgates_above, grad_above, t, B, o_j, m_j, o_k, m_k, b_u0, b_u1, b_u2, b_u3, w_ih + o_j,
                    H, G, 1, H, BLOCK_B, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST, False, K_SPLIT=K_SPLIT,
                )  # fmt: skip
            # grad_h and grad_above were just written by other threads of this program.
            tl.debug_barrier()
            for b0 in range(0, B, BLOCK_B):
                o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                m_b = o_b < B
                row = t * B + o_b
                m_bj = m_b[:, None] & m_j[None, :]
                o_h = row[:, None] * H + o_j[None, :]
                m_dy = m_bj & top[None, :]
                if ALL_LAYERS:
                    m_dy = m_bj
                b_dy = tl.load(grad_y + o_h, mask=m_dy, other=0.0).to(ACC)
                if layer < n_layers - 1:
                    b_dz = tl.load(grad_above + o_b[:, None] * H + o_j[None, :], mask=m_bj, other=0.0)
                    if DROPOUT != DROPOUT_NONE:
                        b_dz *= dropout_scale(seed, p_drop, t, o_b, o_w, B, H, DROPOUT)
                    b_dy += b_dz
                p_dh = grad_h + o_b[:, None] * H + o_j[None, :]
                b_dh = b_dy + tl.load(p_dh, mask=m_bj, other=0.0)
                p_saved = saved + row[:, None] * (S * H) + o_j[None, :]
                # c of the previous step; c0 before the first.
                b_cprev = _saved_c_prev(
                    c0 + o_b[:, None] * H + o_j[None, :], p_saved - B * S * H, t == 0, m_bj, H, ACC, CELL
                )  # fmt: skip
                o_g = row[:, None] * (G * H) + o_j[None, :]
                g0, g1, g2, g3 = _cell_bwd(
                    b_dh, p_dh, p_saved, b_cprev, grad_c + o_b[:, None] * H + o_j[None, :], grad_gates + o_g,
                    grad_xgates + o_g, hseq + o_h, hseq + o_h + B * H, m_bj, m_bj, H, CELL, False, True,
                )  # fmt: skip
                if TAGGED:
                    _store_tagged_gates(ring, k, o_b, o_j, g0, g1, g2, g3, m_bj, B, H, G)
            if TAGGED:
                if layer > 0:
                    arrive(my_count)  # this step's input-side gate gradients, for the layer below
                else:
                    tl.debug_barrier()  # this program's threads reread what others of it wrote (dL/dh, dL/dc)
        if SYNC and not TAGGED:
            grid_barrier(counter, (s + 1) * num_programs)

    if finish != 0:
        _bwd_recurrent_step(
            grad_gates, grad_h, 0, B, o_j, m_j, o_k, m_k, b_w0, b_w1, b_w2, b_w3, w_hh + o_j, H, G, 1, H,
            BLOCK_B, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST, True,
            _ring_slot(ring, (T - 1) % 2, B, G, H, TAGGED), _ring_tag(ring, T, TAGGED), TAGGED, K_SPLIT,
        )  # fmt: skip
