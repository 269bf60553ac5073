"""LSTM with a projection (torch.nn.LSTM's ``proj_size``): h_t = W_hr (o_t * tanh(c_t)).

Dimension letters as in kernels/recurrent.py, plus P = proj_size (< H): h, the recurrent input and
the layer output are P wide, c and the gates H wide. BLOCK_KH / BLOCK_KP: next powers of two >= H / P.
W_hh's reduction (over P forward, over H backward) is held on chip for BLOCK_K units, the rest read every step in
chunks of BLOCK_KS (as kernels/recurrent.py: fp32 at H=1024, 16-bit at H=2048); W_hr's (a quarter of the bytes) is
held whole.

Each step runs in two phases, each closed by the grid barrier:
    A. program i owns hidden units [i*BLOCK_H, (i+1)*BLOCK_H) of the four gates and of c: the gates from
       h_{t-1} (all P units) and its W_hh slice, then c_t and m_t = o_t * tanh(c_t), written to ``mseq``;
    B. program i owns projected units [i*BLOCK_H, (i+1)*BLOCK_H) of h (programs past P idle):
       h_t = m_t (all H units) @ its slice of W_hr^T.
Backward mirrors it per step: 1. dL/dh_t on the P units, through the next step's gate gradients and
W_hh; 2. dL/dm_t = dL/dh_t @ W_hr on the H units, then the gate gradients. ``phases`` selects the
phases one launch runs (3 = both; the one-launch-per-step mode launches them separately).
Directions, residual, dropout and sequences of different lengths (VARLEN) work as in kernels/recurrent.py, on the
P-wide output: past its length a row keeps c (phase A) and h (phase B) and outputs zeros.
"""

import triton
import triton.language as tl

from .dropout import DROPOUT_NONE, dropout_scale
from .recurrent import (
    CELL_LSTM,
    _bwd_recurrent_step,
    _cell_fwd,
    _dot_k,
    _emit,
    _load_gate_tiles,
    _load_input_preacts,
    _load_operand,
    _lstm_bwd_step,
    _recurrent_preacts,
    _reduction_units,
    _saved_c_prev,
    _tile,
    _time,
    _weight_units,
)
from .sync import grid_barrier


@triton.jit
def _units(H: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_KP: tl.constexpr):
    """This program's units (o_j; m_j in H, m_p in P) and the reduction ranges over H and P (tiles over them:
    recurrent._tile, cut in chunks at the dots by recurrent._operand)."""
    o_j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    o_kh = _reduction_units(0, BLOCK_KH)
    o_kp = _reduction_units(0, BLOCK_KP)
    return o_j, o_j < H, o_j < P, o_kh, o_kh < H, o_kp, o_kp < P


@triton.jit(do_not_specialize=["T", "B", "t_start", "n_steps", "direction0", "seed_ptr", "p_drop", "phases"])
def lstm_proj_fwd_kernel(
    xproj,  # [T, B, D*4*H] x @ W_ih^T + b_ih + b_hh
    w_hh,  # [D, 4*H, P]
    w_hr,  # [D, P, H]
    hseq,  # [D, T+1, B, P] h_t at row t + 1 - d, the initial state at row d * T
    state,  # [D, B, H] ACC: c; initial state in, final state out
    saved,  # [D, T, B, 5*H] in the layer's dtype: pre-activations of i, f, g, o, and c, by time (written when SAVE)
    mseq,  # [D, T, B, H] m_t = o_t * tanh(c_t) rounded to the dtype (the projection's input), by time
    y,  # [T, B, D*P] the layer output (WRITE_Y)
    res,  # [T, B, D*P] the layer input, added to the output (RESIDUAL)
    z,  # [T, B, D*P] dropout(y) (DROPOUT)
    lengths,  # [B] int32 (VARLEN): each sequence's length; rows keep their state at steps t >= length
    counter,  # [D] int32, zeroed
    T,
    B,
    t_start,
    n_steps,
    direction0,
    seed_ptr,  # [1] int64: the dropout seed (read on the GPU, so a replayed CUDA graph draws new masks)
    p_drop,
    phases,
    H: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_K: tl.constexpr,  # W_hh's units of the reduction over P held on chip (<= BLOCK_KP), the rest streamed
    BLOCK_KS: tl.constexpr,
    SAVE: tl.constexpr,
    SYNC: tl.constexpr,
    WRITE_Y: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    K_SPLIT: tl.constexpr = 1,  # both reductions (over P and over H) in K_SPLIT chunks, one a warp (recurrent._dot_k)
    W_T: tl.constexpr = False,  # w_hh, w_hr hold W_hh and W_hr transposed, [D, P, 4*H] and [D, H, P] (float32 on FMA)
):
    num_programs = tl.num_programs(0)
    seed = tl.load(seed_ptr)
    d = (direction0 + tl.program_id(1)).to(tl.int64)
    o_j, m_j, m_p, o_kh, m_kh, _, _ = _units(H, P, BLOCK_H, BLOCK_KH, BLOCK_KP)
    o_kp = _reduction_units(0, BLOCK_K)  # the held units of the reduction over P (the gates from h_{t-1})
    m_kp = o_kp < P
    # W_hh[g*H + j, k] at w_hh + (g*H + j) * W_UNIT + k * W_RED, W_hr[p, k] at w_hr + p * R_UNIT + k * R_RED. The FMA
    # dots read a held tile a unit a lane: row-major, a warp's units lie a whole row apart, in one bank; transposed,
    # side by side (as recurrent.rnn_fwd_kernel's W_T).
    W_UNIT: tl.constexpr = 1 if W_T else P
    W_RED: tl.constexpr = 4 * H if W_T else 1
    R_UNIT: tl.constexpr = 1 if W_T else H
    R_RED: tl.constexpr = P if W_T else 1
    w_hh += d * (4 * H * P)
    w_hr += d * (P * H)
    hseq += d * (T + 1) * B * P
    state += d * B * H
    saved += d * T * B * (5 * H)
    mseq += d * T * B * H
    xproj += d * (4 * H)
    counter += d
    # b_w{g}[k, j] = W_hh[g*H + j, k] (k < P) and b_wr[k, p] = W_hr[p, k] (k < H): resident for all steps.
    o_kw = _weight_units(0, BLOCK_K, K_SPLIT, W_T)
    o_wr, o_wu = _tile(o_j * W_UNIT, o_kw * W_RED, K_SPLIT, True, W_T)
    m_wr, m_wu = _tile(m_j, o_kw < P, K_SPLIT, True, W_T)
    b_w0, b_w1, b_w2, b_w3 = _load_gate_tiles(w_hh + o_wr + o_wu, m_wr & m_wu, H * W_UNIT, 4, K_SPLIT, W_T)
    o_krw = _weight_units(0, BLOCK_KH, K_SPLIT, W_T)
    b_wr = _load_operand(w_hr + o_j * R_UNIT, o_krw * R_RED, m_p, o_krw < H, K_SPLIT, True, W_T)
    out_ty = hseq.dtype.element_ty

    for s in range(n_steps):
        t = _time((t_start + s).to(tl.int64), T, d)
        if phases % 2 == 1:
            for b0 in range(0, B, BLOCK_B):
                o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                m_b = o_b < B
                row = t * B + o_b
                m_bj = m_b[:, None] & m_j[None, :]
                p_hrow = hseq + ((t + d) * B + o_b) * P
                b_h = _load_operand(p_hrow, o_kp, m_b, m_kp, K_SPLIT, False, BYPASS_L1=True)
                p_x = xproj + row[:, None] * (D * 4 * H) + o_j[None, :]
                r0, r1, r2, r3 = _recurrent_preacts(
                    b_h, b_w0, b_w1, b_w2, b_w3, p_hrow, m_b, w_hh + o_j * W_UNIT,
                    m_j, P, H * W_UNIT, 4, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT, W_RED,
                )  # fmt: skip
                x0, x1, x2, x3 = _load_input_preacts(p_x, m_bj, H, 4, ACC)
                b_act = m_bj
                if VARLEN:
                    b_act = m_bj & (t < tl.load(lengths + o_b, mask=m_b, other=0))[:, None]
                b_m = _cell_fwd(
                    x0, x1, x2, x3, r0, r1, r2, r3, None, state + o_b[:, None] * H + o_j[None, :],
                    saved + row[:, None] * (5 * H) + o_j[None, :], m_bj, b_act, H, CELL_LSTM, SAVE, VARLEN,
                )  # fmt: skip
                tl.store(mseq + row[:, None] * H + o_j[None, :], b_m.to(out_ty), mask=m_bj)
            if SYNC:
                grid_barrier(counter, (2 * s + 1) * num_programs)
        if phases >= 2:
            for b0 in range(0, B, BLOCK_B):
                o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                m_b = o_b < B
                row = t * B + o_b
                # m_t of every hidden unit, written by all programs before the last barrier: bypass L1.
                b_m = _load_operand(mseq + row * H, o_kh, m_b, m_kh, K_SPLIT, False, BYPASS_L1=True)
                b_hout = _dot_k(b_m, b_wr, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT).to(out_ty)
                m_bp = m_b[:, None] & m_p[None, :]
                b_act = m_bp
                if VARLEN:
                    # Past its length a row keeps h (this program's units, which it wrote at the previous step).
                    b_act = m_bp & (t < tl.load(lengths + o_b, mask=m_b, other=0))[:, None]
                    b_hkeep = tl.load(hseq + ((t + d) * B + o_b)[:, None] * P + o_j[None, :], mask=m_bp, other=0.0)
                    b_hout = tl.where(b_act, b_hout, b_hkeep)
                p_h = hseq + ((t + 1 - d) * B + o_b)[:, None] * P + o_j[None, :]
                tl.store(p_h, b_hout, mask=m_bp)
                _emit(
                    y, res, z, b_hout.to(ACC), t, o_b, m_b, o_j, m_p, d, seed, p_drop, B, P, D,
                    WRITE_Y, RESIDUAL, DROPOUT, b_act, VARLEN,
                )  # fmt: skip
            if SYNC:
                grid_barrier(counter, (2 * s + 2) * num_programs)


@triton.jit(do_not_specialize=["T", "B", "u_start", "n_steps", "finish", "direction0", "seed_ptr", "p_drop", "phases"])
def lstm_proj_bwd_kernel(
    w_hh,  # [D, 4*H, P]
    w_hr,  # [D, P, H]
    saved,  # [D, T, B, 5*H] from the forward (recurrent._cell_fwd)
    c0,  # [D, B, H] ACC
    grad_y,  # [T, B, D*P] dL/dy
    grad_z,  # [T, B, D*P] dL/dz (DROPOUT)
    grad_res,  # [T, B, D*P] out (RESIDUAL): dL/dy + dropout'(dL/dz)
    grad_hp,  # [T, B, D*P] out: dL/dh_t through every path (for phase 2 and dW_hr)
    grad_gates,  # [T, B, D*4*H] out: dL/d(gate pre-activations), by time
    grad_h,  # [D, B, P] ACC: dL/dh_n in, dL/dh0 out
    grad_c,  # [D, B, H] ACC: dL/dc_n in, dL/dc0 out
    lengths,  # [B] int32 (VARLEN): each sequence's length; steps t >= length pass the gradients through
    counter,  # [D] int32, zeroed
    T,
    B,
    u_start,
    n_steps,
    finish,
    direction0,
    seed_ptr,  # [1] int64: the dropout seed (read on the GPU, so a replayed CUDA graph draws new masks)
    p_drop,
    phases,
    H: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_K: tl.constexpr,  # W_hh's units of the reduction over H held on chip (<= BLOCK_KH), the rest streamed
    BLOCK_KS: tl.constexpr,
    SYNC: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    K_SPLIT: tl.constexpr = 1,  # both reductions (over P and over H) in K_SPLIT chunks, one a warp (recurrent._dot_k)
):
    num_programs = tl.num_programs(0)
    seed = tl.load(seed_ptr)
    d = (direction0 + tl.program_id(1)).to(tl.int64)
    o_j, m_j, m_p, _, _, o_kp, m_kp = _units(H, P, BLOCK_H, BLOCK_KH, BLOCK_KP)
    o_kh = _reduction_units(0, BLOCK_K)  # the held units of the reduction over H (dL/dh through W_hh)
    m_kh = o_kh < H
    w_hh += d * (4 * H * P)
    w_hr += d * (P * H)
    saved += d * T * B * (5 * H)
    c0 += d * B * H
    grad_h += d * B * P
    grad_c += d * B * H
    grad_gates += d * (4 * H)
    counter += d
    o_w = d * P + o_j.to(tl.int64)  # this program's columns of the [T, B, D*P] tensors
    # b_w{g}[k, p] = W_hh[g*H + k, p] (k < H) and b_wr[k, j] = W_hr[k, j] (k < P): resident for all steps.
    o_kwh = _weight_units(0, BLOCK_K, K_SPLIT, True)
    o_kwp = _weight_units(0, BLOCK_KP, K_SPLIT, True)
    o_wr, o_wu = _tile(o_j, o_kwh * P, K_SPLIT, True, True)
    m_wr, m_wu = _tile(m_p, o_kwh < H, K_SPLIT, True, True)
    b_w0, b_w1, b_w2, b_w3 = _load_gate_tiles(w_hh + o_wr + o_wu, m_wr & m_wu, H * P, 4, K_SPLIT, True)
    b_wr = _load_operand(w_hr + o_j, o_kwp * H, m_j, o_kwp < P, K_SPLIT, True, True)
    grad_ty = grad_hp.dtype.element_ty

    for s in range(n_steps):
        u = (u_start - s).to(tl.int64)
        t = _time(u, T, d)
        if phases % 2 == 1:
            if u < T - 1:
                _bwd_recurrent_step(
                    grad_gates, grad_h, _time(u + 1, T, d), B, o_j, m_p, o_kh, m_kh, b_w0, b_w1, b_w2, b_w3,
                    w_hh + o_j, H, 4, D, P, BLOCK_B, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST,
                    K_SPLIT=K_SPLIT,
                )  # fmt: skip
            # grad_h was just written by other threads of this program.
            tl.debug_barrier()
            for b0 in range(0, B, BLOCK_B):
                o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                m_b = o_b < B
                m_bp = m_b[:, None] & m_p[None, :]
                o_y = (t * B + o_b)[:, None] * (D * P) + o_w[None, :]
                p_dh = grad_h + o_b[:, None] * P + o_j[None, :]
                b_dy = tl.load(grad_y + o_y, mask=m_bp, other=0.0).to(ACC)
                if DROPOUT != DROPOUT_NONE:
                    b_dz = tl.load(grad_z + o_y, mask=m_bp, other=0.0).to(ACC)
                    b_dy += b_dz * dropout_scale(seed, p_drop, t, o_b, o_w, B, D * P, DROPOUT)
                b_act = m_bp
                if VARLEN:
                    # Past its length a row's outputs are constant zeros and h_t = h_{t-1}: dL/dh_t flows on to
                    # h_{t-1} unchanged, none of it through the projection.
                    b_act = m_bp & (t < tl.load(lengths + o_b, mask=m_b, other=0))[:, None]
                    b_dy = tl.where(b_act, b_dy, 0.0)
                if RESIDUAL:
                    tl.store(grad_res + o_y, b_dy.to(grad_res.dtype.element_ty), mask=m_bp)
                b_dh = b_dy + tl.load(p_dh, mask=m_bp, other=0.0)
                tl.store(grad_hp + o_y, tl.where(b_act, b_dh, 0.0).to(grad_ty), mask=m_bp)
                tl.store(p_dh, tl.where(b_act, 0.0, b_dh), mask=m_bp)
            if SYNC:
                grid_barrier(counter, (2 * s + 1) * num_programs)
        if phases >= 2:
            for b0 in range(0, B, BLOCK_B):
                o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                m_b = o_b < B
                row = t * B + o_b
                m_bj = m_b[:, None] & m_j[None, :]
                # dL/dh_t of every projected unit, written by all programs before the last barrier: bypass L1.
                b_dhp = _load_operand(grad_hp + row * (D * P) + d * P, o_kp, m_b, m_kp, K_SPLIT, False, BYPASS_L1=True)
                b_dm = _dot_k(b_dhp, b_wr, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
                p_saved = saved + row[:, None] * (5 * H) + o_j[None, :]
                # c of the previous step, which ran at time t - 1 (forward) or t + 1 (reverse); c0 before the first.
                b_cprev = _saved_c_prev(
                    c0 + o_b[:, None] * H + o_j[None, :], p_saved + (1 - 2 * d) * (-B * 5 * H), u == 0, m_bj, H, ACC,
                    CELL_LSTM,
                )  # fmt: skip
                p_dg = grad_gates + row[:, None] * (D * 4 * H) + o_j[None, :]
                b_act = m_bj
                if VARLEN:
                    b_act = m_bj & (t < tl.load(lengths + o_b, mask=m_b, other=0))[:, None]
                _lstm_bwd_step(
                    b_dm, p_saved, b_cprev, grad_c + o_b[:, None] * H + o_j[None, :], p_dg, m_bj, b_act, H, VARLEN
                )  # fmt: skip
            if SYNC:
                grid_barrier(counter, (2 * s + 2) * num_programs)

    if finish != 0:
        _bwd_recurrent_step(
            grad_gates, grad_h, _time((u_start - n_steps + 1).to(tl.int64), T, d), B, o_j, m_p, o_kh, m_kh,
            b_w0, b_w1, b_w2, b_w3, w_hh + o_j, H, 4, D, P, BLOCK_B, BLOCK_K, BLOCK_KS, ACC,
            DOT_PRECISION, DOT_UPCAST, K_SPLIT=K_SPLIT,
        )  # fmt: skip
