"""Persistent recurrent loops for every cell: one launch runs all time steps of one layer.

Dimension letters:
    T  time steps            B  batch                 H  hidden units
    G  gates per unit (RNN 1, GRU 3, LSTM 4)          S  values saved for backward per unit (LSTM 5, GRU 4, RNN 0)
    D  directions in the buffers (1, or 2 for a bidirectional layer; program_id(1) picks one)
    BLOCK_H  hidden units owned by one program (the grid splits H)
    BLOCK_B  batch rows per tile (a program loops over its group's rows)
    NB       batch groups (grid axis 2): batch rows never interact, so the batch is split in groups of whole
             tiles, each with its own programs and grid barrier (idle SMs take a share of a large batch)
    BLOCK_K  units of the reduction over the previous hidden state held on chip (next power of two >= H,
             or fewer where the slice does not fit: units [BLOCK_K, H) are then read every step in
             chunks of BLOCK_KS)
    K_SPLIT  chunks the reduction (held and streamed rows alike) is cut into, each a batch entry of a 3-D dot (1:
             one 2-D dot): Triton gives a 3-D dot's warps to its batch dimension, so each warp reduces its own chunk
             (_dot_k)

Each program owns BLOCK_H hidden units of every gate and keeps that slice of W_hh on chip for the
whole loop. Once per step the programs exchange the new hidden state (forward) or the gate
gradients (backward) through global memory and meet at a grid barrier (``SYNC``). With
``SYNC=False`` the host launches one step at a time instead: the launch boundary is the barrier.
That mode lets the interpreter (which runs programs one after another) test a split grid, and it
is the fallback where the grid could not be co-resident.

Directions: step s of direction d handles time t = s (forward) or T - 1 - s (reverse). Everything
indexed by time (the input projection, the layer output, saved values, gate gradients) is
stored in time order, so the host's GEMMs cover both directions at once; ``hseq`` holds direction
d's hidden states with h_t at row t + 1 - d and the initial state at row 0 (forward) or T (reverse).
Both directions run in one launch (grid (P, 2), each with its own barrier counter) where the GPU
holds both grids, else one after the other (``direction0``). Grid axis 2 splits the batch into NB groups of
whole tiles (``_group_rows``), each group with its own P programs and barrier counter: the host uses it where
P * D programs leave SMs idle and the batch has tiles to spare. A row's arithmetic does not depend on its group.

The layer output y = h (+ the layer input with ``RESIDUAL``) and the next layer's input
z = dropout(y) are written where h is, with the mask drawn in place (kernels/dropout.py).
"""

import triton
import triton.language as tl

from tritonrnn._plan import triton_version

from .activations import relu, sigmoid, tanh
from .dropout import DROPOUT_NONE, dropout_scale
from .sync import grid_barrier, load_tagged, tag_of, tag_pack

# A held weight tile in chunks whose rows are adjacent in memory (_tile's ROWS_CONTIGUOUS) is built unit-major, [K /
# K_SPLIT, K_SPLIT, R], and permuted to chunks first on Triton 3.7 and later; built chunks first on 3.6 and older. Each
# version lays only one of the two forms out in shared memory so that ldmatrix reads it without bank conflicts
# (_operand).
WEIGHT_CHUNKS_PERMUTED = tl.constexpr(triton_version() >= (3, 7))

CELL_RNN_TANH = tl.constexpr(0)
CELL_RNN_RELU = tl.constexpr(1)
CELL_LSTM = tl.constexpr(2)
CELL_GRU = tl.constexpr(3)


@triton.jit
def _dot(a, b, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b accumulated in ACC."""
    if DOT_UPCAST:
        # The Triton interpreter (3.9) multiplies bfloat16 operands as their raw uint16 bits; the host sets
        # DOT_UPCAST there only. bf16 products are exact in fp32, so this computes what the GPU's MMA does.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=ACC, input_precision="ieee")
    return tl.dot(a, b, out_dtype=ACC, input_precision=DOT_PRECISION)


@triton.jit
def _dot_k(
    a, b, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, K_SPLIT: tl.constexpr = 1
):  # fmt: skip
    """a @ b over the reduction: with K_SPLIT > 1, a [K_SPLIT, M, K/K_SPLIT] and b [K_SPLIT, K/K_SPLIT, N], the
    chunks' products summed. Triton lays a 3-D dot's warps over its batch dimension (warpsPerCTA [K_SPLIT, 1, 1]
    where K_SPLIT is the number of warps): each warp reduces its own chunk, where a 2-D dot of 16 rows and 16 columns
    gives every warp the whole tile (_plan.heuristic_width), and each warp's chain of dependent mma is K_SPLIT times
    shorter."""
    if K_SPLIT > 1:
        return _sum_chunks(_dot(a, b, ACC, DOT_PRECISION, DOT_UPCAST), K_SPLIT)
    else:
        return _dot(a, b, ACC, DOT_PRECISION, DOT_UPCAST)


@triton.jit
def _sum_chunks(x, K_SPLIT: tl.constexpr):
    """x [K_SPLIT, M, N] (K_SPLIT 2, 4 or 8) summed over its chunks, pairwise: chunk c plus chunk c + K_SPLIT / 2,
    halving until one is left. Not tl.sum: with the chunks on different warps, Triton 3.6 sums them through a
    scratch that puts a warp's lanes 64 bytes apart (16-way bank conflicts: LSTM bf16 H=1024 forward 5,664 loads and
    5,889 stores of shared memory a step); for tl.split Triton gathers each element's chunks into one thread with
    one layout conversion, without conflicts (1,536 and 1,537; Triton 3.9 1,824 and 2,048 -> 1,536 and 1,536; sm_90
    compiles, perf/NOTES.md, thirty-fourth session)."""
    tl.static_assert(K_SPLIT == 2 or K_SPLIT == 4 or K_SPLIT == 8, "the reduction in 2, 4 or 8 chunks")
    if K_SPLIT > 4:
        x = _halve_chunks(x)
    if K_SPLIT > 2:
        x = _halve_chunks(x)
    x = _halve_chunks(x)
    return tl.reshape(x, (x.shape[1], x.shape[2]))


@triton.jit
def _halve_chunks(x):
    """x [C, M, N] -> [C / 2, M, N]: chunk c plus chunk c + C / 2."""
    C: tl.constexpr = x.shape[0]
    low, high = tl.split(tl.permute(tl.reshape(x, (2, C // 2, x.shape[1], x.shape[2])), (1, 2, 3, 0)))
    return low + high


@triton.jit
def _reduction_units(k0, WIDTH: tl.constexpr):
    """Units k0 + [0, WIDTH) of the reduction. Tiles over them (_tile) put them last ([rows, units]) or first (the
    weight tiles [units, BLOCK_H]); a reduction in chunks cuts them at the dot (_operand)."""
    return k0 + tl.arange(0, WIDTH)


@triton.jit
def _weight_units(
    k0, WIDTH: tl.constexpr, K_SPLIT: tl.constexpr, ROWS_CONTIGUOUS: tl.constexpr, STREAMED: tl.constexpr = False
):  # fmt: skip
    """Units k0 + [0, WIDTH) of a weight tile's reduction: [WIDTH], or where _tile builds that tile in chunks (K_SPLIT
    > 1, ROWS_CONTIGUOUS) [K_SPLIT, WIDTH / K_SPLIT], chunk c from unit k0 + c * WIDTH / K_SPLIT, as _operand cuts
    the other tiles; for a held tile (not STREAMED) with WEIGHT_CHUNKS_PERMUTED the transpose, [WIDTH / K_SPLIT,
    K_SPLIT] (_operand permutes the loaded tile). (Made so rather than reshaped from the 1-D form: neither Triton 3.6
    nor 3.9 lays that out well.)"""
    if K_SPLIT > 1 and ROWS_CONTIGUOUS:
        o_c = tl.arange(0, K_SPLIT) * (WIDTH // K_SPLIT)
        o_u = tl.arange(0, WIDTH // K_SPLIT)
        if WEIGHT_CHUNKS_PERMUTED and not STREAMED:
            return k0 + o_c[None, :] + o_u[:, None]
        else:
            return k0 + o_c[:, None] + o_u[None, :]
    else:
        return k0 + tl.arange(0, WIDTH)


@triton.jit
def _tile(rows, units, K_SPLIT: tl.constexpr, UNITS_FIRST: tl.constexpr, ROWS_CONTIGUOUS: tl.constexpr = False):
    """``rows`` [R] and the reduction's ``units`` [K] as broadcastable parts of one tile's offsets, pointers or masks:
    [K, R] (UNITS_FIRST: the weight tiles) or [R, K]; _operand makes the loaded tile a dot operand. A weight tile in
    K_SPLIT chunks whose rows are adjacent in memory (ROWS_CONTIGUOUS: the backward's W_hh) is built in chunks
    already, [K_SPLIT, K / K_SPLIT, R] from units [K_SPLIT, K / K_SPLIT], or its permutation (_weight_units; why:
    _operand)."""
    if K_SPLIT > 1 and ROWS_CONTIGUOUS:
        return rows[None, None, :], units[:, :, None]
    elif UNITS_FIRST:
        return rows[None, :], units[:, None]
    else:
        return rows[:, None], units[None, :]


@triton.jit
def _operand(
    x, K_SPLIT: tl.constexpr, UNITS_FIRST: tl.constexpr, ROWS_CONTIGUOUS: tl.constexpr = False,
    STREAMED: tl.constexpr = False,
):  # fmt: skip
    """A tile loaded in _tile's order as a dot operand: with K_SPLIT > 1 the reduction cut in chunks, [K_SPLIT,
    K / K_SPLIT, R] (UNITS_FIRST) or [K_SPLIT, R, K / K_SPLIT] (_dot_k).

    Triton lays a dot operand out in shared memory after the registers of the tile it is made from, and swizzles it
    (to spread ldmatrix's rows over the banks) along the dimension after the contiguous one. Loaded as a 3-D tile, a
    chunked operand was swizzled over its chunks by Triton 3.9 (its rows, 4*H bytes apart, met in 4 banks: 4- to
    8-way conflicts at every ldmatrix of the dots), over its rows by 3.6. Loaded as the 2-D tile and reshaped, it is
    swizzled over its rows by both; except a weight tile whose rows are contiguous, which is built in chunks (_tile):
    Triton orders its shared memory after the dimensions its registers repeat over, so the loaded tile must repeat
    over the units of a chunk, not over the chunks. Built [K_SPLIT, K / K_SPLIT, R], Triton 3.6's registers do,
    3.7's to 3.9's do not (LSTM bf16 H=1024 backward, B=16: 18,944 shared-memory load wavefronts a step on 3.7 and
    3.8, 10,752 on 3.9, for an ideal 4,608); built [K / K_SPLIT, K_SPLIT, R] and permuted, the other way round
    (WEIGHT_CHUNKS_PERMUTED). That holds for the tiles held on chip, which go to shared memory from registers; a tile
    of rows streamed every step (STREAMED) is staged there by Triton's pipeliner for the dot it feeds, which the
    permutation hides from it (3.9 then stages it without a swizzle: LSTM bf16 H=2048's backward 1.4 times the ideal),
    so those are built chunks first on every version. Counted from the compiled PTX: perf/smem_banks.py,
    perf/NOTES.md."""
    if K_SPLIT > 1 and ROWS_CONTIGUOUS and WEIGHT_CHUNKS_PERMUTED and not STREAMED:
        x = tl.permute(x, (1, 0, 2))
    if K_SPLIT > 1 and not ROWS_CONTIGUOUS:
        if UNITS_FIRST:
            x = tl.reshape(x, (K_SPLIT, x.shape[0] // K_SPLIT, x.shape[1]))
        else:
            x = tl.permute(tl.reshape(x, (x.shape[0], K_SPLIT, x.shape[1] // K_SPLIT)), (1, 0, 2))
    return x


@triton.jit
def _load_operand(
    p_rows, units, m_rows, m_units, K_SPLIT: tl.constexpr, UNITS_FIRST: tl.constexpr,
    ROWS_CONTIGUOUS: tl.constexpr = False, BYPASS_L1: tl.constexpr = False, STREAMED: tl.constexpr = False,
):  # fmt: skip
    """The tile p_rows [R] (pointers) by units (offsets), masked by m_rows by m_units, as a dot operand (_tile,
    _operand); BYPASS_L1: values other programs wrote since the last barrier (loaded .cg); STREAMED: see _operand."""
    p_r, p_u = _tile(p_rows, units, K_SPLIT, UNITS_FIRST, ROWS_CONTIGUOUS)
    m_r, m_u = _tile(m_rows, m_units, K_SPLIT, UNITS_FIRST, ROWS_CONTIGUOUS)
    if BYPASS_L1:
        x = tl.load(p_r + p_u, mask=m_r & m_u, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(p_r + p_u, mask=m_r & m_u, other=0.0)
    return _operand(x, K_SPLIT, UNITS_FIRST, ROWS_CONTIGUOUS, STREAMED)


@triton.jit
def _program_units(H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's hidden units (o_j, m_j) and the held units of the reduction (o_k, m_k)."""
    o_j = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    o_k = _reduction_units(0, BLOCK_K)
    return o_j, o_j < H, o_k, o_k < H


@triton.jit
def _group_rows(B, BLOCK_B: tl.constexpr):
    """The batch rows [lo, hi) of this program's group (grid axis 2, NB groups): whole tiles, as evenly as they
    split; a group may be empty. One group (a grid without axis 2) covers [0, B)."""
    per_group = tl.cdiv(tl.cdiv(B, BLOCK_B), tl.num_programs(2)) * BLOCK_B
    lo = tl.program_id(2) * per_group
    return lo, tl.minimum(lo + per_group, B)


@triton.jit
def _load_gate_tiles(
    p_w, m_w, GATE_STRIDE: tl.constexpr, G: tl.constexpr, K_SPLIT: tl.constexpr = 1,
    ROWS_CONTIGUOUS: tl.constexpr = False,
):  # fmt: skip
    """The G weight tiles at p_w (gate g starts GATE_STRIDE elements after gate g-1), p_w and m_w in _tile's order
    (units first), as dot operands."""
    b_w0 = _operand(tl.load(p_w, mask=m_w, other=0.0), K_SPLIT, True, ROWS_CONTIGUOUS)
    b_w1 = b_w0
    b_w2 = b_w0
    b_w3 = b_w0
    if G > 1:
        b_w1 = _operand(tl.load(p_w + GATE_STRIDE, mask=m_w, other=0.0), K_SPLIT, True, ROWS_CONTIGUOUS)
        b_w2 = _operand(tl.load(p_w + 2 * GATE_STRIDE, mask=m_w, other=0.0), K_SPLIT, True, ROWS_CONTIGUOUS)
    if G > 3:
        b_w3 = _operand(tl.load(p_w + 3 * GATE_STRIDE, mask=m_w, other=0.0), K_SPLIT, True, ROWS_CONTIGUOUS)
    return b_w0, b_w1, b_w2, b_w3


@triton.jit
def _load_input_preacts(p_x, m_bj, H: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr):
    """The input parts x0..x3 of the G gates' pre-activations of a tile, from the input projection at p_x."""
    x0 = tl.load(p_x, mask=m_bj, other=0.0).to(ACC)
    x1 = x0
    x2 = x0
    x3 = x0
    if G > 1:
        x1 = tl.load(p_x + H, mask=m_bj, other=0.0).to(ACC)
        x2 = tl.load(p_x + 2 * H, mask=m_bj, other=0.0).to(ACC)
    if G > 3:
        x3 = tl.load(p_x + 3 * H, mask=m_bj, other=0.0).to(ACC)
    return x0, x1, x2, x3


@triton.jit
def _store_saved(p, x, mask):
    """x stored at p in p's dtype (the layer's). In fp16 a finite value past 65504 is stored as the largest finite one
    instead of inf: backward multiplies GRU's W_hn h + b_hn by r (1 - r), which can be exactly 0, and inf * 0 is NaN;
    sigmoid and tanh of the stored value are those of the true one. An inf (an inf input or state) stays inf, so its
    gradients turn inf or NaN as in float32 and torch.nn, where AMP's GradScaler sees the overflow. NaN stays NaN."""
    ty = p.dtype.element_ty
    if ty == tl.float16:
        finite = tl.abs(x) <= 3.4028234663852886e38  # float32's largest
        x = tl.where(finite & (x > 65504.0), 65504.0, tl.where(finite & (x < -65504.0), -65504.0, x))
    tl.store(p, x.to(ty), mask=mask)


@triton.jit
def _cell_fwd(
    x0, x1, x2, x3, r0, r1, r2, r3, b_bhn, p_state, p_saved, m_bj, b_act, H: tl.constexpr, CELL: tl.constexpr,
    SAVE: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """One step of a [BLOCK_B, BLOCK_H] tile: the new h (ACC) from the gates' input parts x_g and recurrent parts r_g.

    p_state: LSTM's c or GRU's full-precision h (ACC), updated; p_saved: what backward needs, at +k*H, in the
    layer's dtype (LSTM the pre-activations of i, f, g, o, and c; GRU those of r, z, n, and W_hn h + b_hn);
    b_bhn: GRU's [BLOCK_H] b_hn.
    Pre-activations, not activations, are saved: rounded to bf16 or fp16 they cost the gradients nothing measurable,
    where activations rounded so lose the derivative of a saturated gate, f (1 - f) from an f near 1 (perf/NOTES.md).
    The step itself runs on the unrounded values.
    VARLEN: rows outside b_act (past their sequence's end) keep their state, also in the saved c slot.
    """
    if CELL == CELL_LSTM:
        a_i = x0 + r0
        a_f = x1 + r1
        a_g = x2 + r2
        a_o = x3 + r3
        b_i = sigmoid(a_i)
        b_f = sigmoid(a_f)
        b_g = tanh(a_g)
        b_o = sigmoid(a_o)
        b_cold = tl.load(p_state, mask=m_bj, other=0.0)
        b_c = b_f * b_cold + b_i * b_g
        if VARLEN:
            b_c = tl.where(b_act, b_c, b_cold)
        tl.store(p_state, b_c, mask=m_bj)
        if SAVE:
            _store_saved(p_saved, a_i, m_bj)
            _store_saved(p_saved + H, a_f, m_bj)
            _store_saved(p_saved + 2 * H, a_g, m_bj)
            _store_saved(p_saved + 3 * H, a_o, m_bj)
            _store_saved(p_saved + 4 * H, b_c, m_bj)
        b_hnew = b_o * tanh(b_c)
    elif CELL == CELL_GRU:
        b_ghn = r2 + b_bhn[None, :]
        a_r = x0 + r0
        a_z = x1 + r1
        b_r = sigmoid(a_r)
        b_z = sigmoid(a_z)
        a_n = x2 + b_r * b_ghn
        b_n = tanh(a_n)
        b_hold = tl.load(p_state, mask=m_bj, other=0.0)
        b_hnew = (1.0 - b_z) * b_n + b_z * b_hold
        if VARLEN:
            b_hnew = tl.where(b_act, b_hnew, b_hold)
        tl.store(p_state, b_hnew, mask=m_bj)
        if SAVE:
            _store_saved(p_saved, a_r, m_bj)
            _store_saved(p_saved + H, a_z, m_bj)
            _store_saved(p_saved + 2 * H, a_n, m_bj)
            _store_saved(p_saved + 3 * H, b_ghn, m_bj)
    elif CELL == CELL_RNN_TANH:
        b_hnew = tanh(x0 + r0)
    else:
        b_hnew = relu(x0 + r0)
    return b_hnew


@triton.jit
def _gate_dots(
    b_h, b_w0, b_w1, b_w2, b_w3, G: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, K_SPLIT: tl.constexpr,
):  # fmt: skip
    """b_h @ b_w{g} for each gate g < G (r0..r3; the unused ones copies of r0)."""
    r0 = _dot_k(b_h, b_w0, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
    r1 = r0
    r2 = r0
    r3 = r0
    if G > 1:
        r1 = _dot_k(b_h, b_w1, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
        r2 = _dot_k(b_h, b_w2, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
    if G > 3:
        r3 = _dot_k(b_h, b_w3, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
    return r0, r1, r2, r3


@triton.jit
def _recurrent_preacts(
    b_h, b_w0, b_w1, b_w2, b_w3, p_hrow, m_b, p_wrow, m_j, K: tl.constexpr, GATE_STRIDE: tl.constexpr,
    G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KS: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr, K_SPLIT: tl.constexpr = 1, K_STRIDE: tl.constexpr = 1,
):  # fmt: skip
    """h_{t-1} @ W_g^T on this program's units for each gate g < G (r0..r3), a reduction over K units.

    Units [0, BLOCK_K) come from b_h and the held tiles b_w*; where the slice is too large to hold, the units
    [BLOCK_K, K) are read every step in chunks of BLOCK_KS: h from p_hrow ([BLOCK_B] row pointers), W^T from p_wrow
    ([BLOCK_H] pointers to W[j, 0], m_j their mask; gate g at +g*GATE_STRIDE, unit k at +k*K_STRIDE). Both
    reductions cut in K_SPLIT chunks (_dot_k).
    """
    r0, r1, r2, r3 = _gate_dots(b_h, b_w0, b_w1, b_w2, b_w3, G, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
    for k0 in range(BLOCK_K, K, BLOCK_KS):
        o_k = _reduction_units(k0, BLOCK_KS)
        m_k = o_k < K
        b_hk = _load_operand(p_hrow, o_k, m_b, m_k, K_SPLIT, False, BYPASS_L1=True)
        o_kw = _weight_units(k0, BLOCK_KS, K_SPLIT, K_STRIDE != 1, STREAMED=True)
        p_wr, p_wu = _tile(p_wrow, o_kw * K_STRIDE, K_SPLIT, True, K_STRIDE != 1)
        m_wr, m_wu = _tile(m_j, o_kw < K, K_SPLIT, True, K_STRIDE != 1)
        p_wk = p_wr + p_wu
        m_wk = m_wr & m_wu
        b_wk0 = _operand(tl.load(p_wk, mask=m_wk, other=0.0), K_SPLIT, True, K_STRIDE != 1, STREAMED=True)
        r0 += _dot_k(b_hk, b_wk0, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
        if G > 1:
            b_wk1 = _operand(
                tl.load(p_wk + GATE_STRIDE, mask=m_wk, other=0.0), K_SPLIT, True, K_STRIDE != 1, STREAMED=True
            )
            r1 += _dot_k(b_hk, b_wk1, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
            b_wk2 = _operand(
                tl.load(p_wk + 2 * GATE_STRIDE, mask=m_wk, other=0.0), K_SPLIT, True, K_STRIDE != 1, STREAMED=True
            )
            r2 += _dot_k(b_hk, b_wk2, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
        if G > 3:
            b_wk3 = _operand(
                tl.load(p_wk + 3 * GATE_STRIDE, mask=m_wk, other=0.0), K_SPLIT, True, K_STRIDE != 1, STREAMED=True
            )
            r3 += _dot_k(b_hk, b_wk3, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
    return r0, r1, r2, r3


@triton.jit
def _lstm_bwd_step(b_dh, p_saved, b_cprev, p_dc, p_dg, m_bj, b_act, H: tl.constexpr, VARLEN: tl.constexpr):
    """Gate gradients of one LSTM step from dL/d(o*tanh(c)) = b_dh (stored at p_dg and returned, in p_dg's dtype);
    carries dL/dc (p_dc) one step back. b_cprev: the previous step's c (_saved_c_prev).

    VARLEN: rows outside b_act (past their sequence's end, where c was kept) get zero gate gradients and pass
    dL/dc through unchanged.
    """
    grad_ty = p_dg.dtype.element_ty
    acc = b_dh.dtype
    # The activations again, from the saved pre-activations (_cell_fwd).
    b_i = sigmoid(tl.load(p_saved, mask=m_bj, other=0.0).to(acc))
    b_f = sigmoid(tl.load(p_saved + H, mask=m_bj, other=0.0).to(acc))
    b_g = tanh(tl.load(p_saved + 2 * H, mask=m_bj, other=0.0).to(acc))
    b_o = sigmoid(tl.load(p_saved + 3 * H, mask=m_bj, other=0.0).to(acc))
    b_tc = tanh(tl.load(p_saved + 4 * H, mask=m_bj, other=0.0).to(acc))
    b_dcin = tl.load(p_dc, mask=m_bj, other=0.0)
    b_dc = b_dcin + b_dh * b_o * (1.0 - b_tc * b_tc)
    b_dgi = b_dc * b_g * b_i * (1.0 - b_i)
    b_dgf = b_dc * b_cprev * b_f * (1.0 - b_f)
    b_dgg = b_dc * b_i * (1.0 - b_g * b_g)
    b_dgo = b_dh * b_tc * b_o * (1.0 - b_o)
    b_dcout = b_dc * b_f
    if VARLEN:
        b_dgi = tl.where(b_act, b_dgi, 0.0)
        b_dgf = tl.where(b_act, b_dgf, 0.0)
        b_dgg = tl.where(b_act, b_dgg, 0.0)
        b_dgo = tl.where(b_act, b_dgo, 0.0)
        b_dcout = tl.where(b_act, b_dcout, b_dcin)
    b_dgi = b_dgi.to(grad_ty)
    b_dgf = b_dgf.to(grad_ty)
    b_dgg = b_dgg.to(grad_ty)
    b_dgo = b_dgo.to(grad_ty)
    tl.store(p_dg, b_dgi, mask=m_bj)
    tl.store(p_dg + H, b_dgf, mask=m_bj)
    tl.store(p_dg + 2 * H, b_dgg, mask=m_bj)
    tl.store(p_dg + 3 * H, b_dgo, mask=m_bj)
    tl.store(p_dc, b_dcout, mask=m_bj)
    return b_dgi, b_dgf, b_dgg, b_dgo


@triton.jit
def _saved_c_prev(p_c0, p_saved_prev, first, m_bj, H: tl.constexpr, ACC: tl.constexpr, CELL: tl.constexpr):
    """LSTM's c of the previous step (ACC): c0 at p_c0 before the first step (first), else the c the forward saved
    at p_saved_prev (that step's saved row). Zeros for the other cells, which keep no c."""
    b_cprev = tl.zeros(p_c0.shape, ACC)  # p_c0: [BLOCK_B, BLOCK_H] pointers
    if CELL == CELL_LSTM:
        if first:
            b_cprev = tl.load(p_c0, mask=m_bj, other=0.0).to(ACC)
        else:
            b_cprev = tl.load(p_saved_prev + 4 * H, mask=m_bj, other=0.0).to(ACC)
    return b_cprev


@triton.jit
def _cell_bwd(
    b_dh, p_dh, p_saved, b_cprev, p_dc, p_dg, p_dx, p_hprev, p_hnew, m_bj, b_act, H: tl.constexpr, CELL: tl.constexpr,
    VARLEN: tl.constexpr, DX_ALL_GATES: tl.constexpr,
):  # fmt: skip
    """Gate gradients of one step of a tile from b_dh = dL/dh_t; leaves at p_dh what flows to h_{t-1} directly.
    Returns the G gradients stored at p_dg (in its dtype; the others repeat the first).

    p_dg: dL/d(recurrent pre-activations) of the G gates at +g*H. GRU's input part of the n gate is not multiplied
    by r: its gradient goes to p_dx, alone, or after r's and z's (DX_ALL_GATES: p_dx then holds every gate's
    input-side gradient). b_cprev, p_dc: LSTM's previous c (_saved_c_prev) and dL/dc (carried one step back);
    p_hprev: GRU's h_{t-1}; p_hnew: the RNN cells' h_t.
    VARLEN: rows outside b_act (past their sequence's end) get zero gate gradients and pass dL/dh, dL/dc through.
    """
    grad_ty = p_dg.dtype.element_ty
    if CELL == CELL_LSTM:
        g0, g1, g2, g3 = _lstm_bwd_step(b_dh, p_saved, b_cprev, p_dc, p_dg, m_bj, b_act, H, VARLEN)
        tl.store(p_dh, tl.where(b_act, 0.0, b_dh), mask=m_bj)
    elif CELL == CELL_GRU:
        acc = b_dh.dtype
        b_r = sigmoid(tl.load(p_saved, mask=m_bj, other=0.0).to(acc))
        b_z = sigmoid(tl.load(p_saved + H, mask=m_bj, other=0.0).to(acc))
        b_n = tanh(tl.load(p_saved + 2 * H, mask=m_bj, other=0.0).to(acc))
        b_ghn = tl.load(p_saved + 3 * H, mask=m_bj, other=0.0).to(acc)
        b_hprev = tl.load(p_hprev, mask=m_bj, other=0.0).to(b_dh.dtype)
        b_dan = b_dh * (1.0 - b_z) * (1.0 - b_n * b_n)
        b_dgr = b_dan * b_ghn * b_r * (1.0 - b_r)
        b_dgz = b_dh * (b_hprev - b_n) * b_z * (1.0 - b_z)
        # h_t = ... + z * h_{t-1}: the direct path to the previous state.
        b_dhprev = b_dh * b_z
        if VARLEN:
            b_dan = tl.where(b_act, b_dan, 0.0)
            b_dgr = tl.where(b_act, b_dgr, 0.0)
            b_dgz = tl.where(b_act, b_dgz, 0.0)
            b_dhprev = tl.where(b_act, b_dhprev, b_dh)
        g0 = b_dgr.to(grad_ty)
        g1 = b_dgz.to(grad_ty)
        g2 = (b_dan * b_r).to(grad_ty)
        g3 = g0
        tl.store(p_dg, g0, mask=m_bj)
        tl.store(p_dg + H, g1, mask=m_bj)
        tl.store(p_dg + 2 * H, g2, mask=m_bj)
        if DX_ALL_GATES:
            tl.store(p_dx, g0, mask=m_bj)
            tl.store(p_dx + H, g1, mask=m_bj)
            tl.store(p_dx + 2 * H, b_dan.to(grad_ty), mask=m_bj)
        else:
            tl.store(p_dx, b_dan.to(grad_ty), mask=m_bj)
        tl.store(p_dh, b_dhprev, mask=m_bj)
    else:
        b_hnew = tl.load(p_hnew, mask=m_bj, other=0.0).to(b_dh.dtype)
        if CELL == CELL_RNN_TANH:
            b_da = b_dh * (1.0 - b_hnew * b_hnew)
        else:
            # torch's threshold_backward: zero where the output is <= 0.
            b_da = tl.where(b_hnew <= 0, 0.0, b_dh)
        if VARLEN:
            b_da = tl.where(b_act, b_da, 0.0)
        g0 = b_da.to(grad_ty)
        g1 = g0
        g2 = g0
        g3 = g0
        tl.store(p_dg, g0, mask=m_bj)
        tl.store(p_dh, tl.where(b_act, 0.0, b_dh), mask=m_bj)
    return g0, g1, g2, g3


@triton.jit
def _time(step, T, d):
    """The time index of direction d's step: step (forward) or T - 1 - step (reverse)."""
    return step + d * (T - 1 - 2 * step)


@triton.jit
def _emit(
    y, res, z, b_h, t, o_b, m_b, o_j, m_j, d, seed, p_drop, B, H: tl.constexpr, D: tl.constexpr,
    WRITE_Y: tl.constexpr, RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, b_act, VARLEN: tl.constexpr,
):  # fmt: skip
    """Write the layer output y = h (+ res) and the next layer's input z = dropout(y) for step t's rows o_b.

    VARLEN: rows outside b_act (past their sequence's end) output zeros, as torch pads.
    """
    if WRITE_Y or DROPOUT != DROPOUT_NONE:
        o_w = d * H + o_j.to(tl.int64)
        o_y = (t * B + o_b)[:, None] * (D * H) + o_w[None, :]
        m_bj = m_b[:, None] & m_j[None, :]
        b_y = b_h
        if RESIDUAL:
            b_y += tl.load(res + o_y, mask=m_bj, other=0.0).to(b_h.dtype)
        if VARLEN:
            b_y = tl.where(b_act, b_y, 0.0)
        if WRITE_Y:
            tl.store(y + o_y, b_y.to(y.dtype.element_ty), mask=m_bj)
        if DROPOUT != DROPOUT_NONE:
            b_z = b_y * dropout_scale(seed, p_drop, t, o_b, o_w, B, D * H, DROPOUT)
            tl.store(z + o_y, b_z.to(z.dtype.element_ty), mask=m_bj)


@triton.jit
def _load_h_prev(p_h, ring, step, o_words, mask, B, H: tl.constexpr, VALUE: tl.constexpr, TAGGED: tl.constexpr):
    """h before step ``step`` of every unit: from the plain buffer at p_h, written by all programs before the last
    barrier (bypassing L1), or (TAGGED) from the words the programs wrote at the previous step, slot step % 2 of
    ring at offsets o_words, once they carry the step's tag (sync.py)."""
    if TAGGED:
        b_h = load_tagged(ring + (step % 2) * B * H + o_words, mask, tag_of(step + 1, ring.dtype.element_ty), VALUE)
    else:
        b_h = tl.load(p_h, mask=mask, other=0.0, cache_modifier=".cg")
    return b_h


@triton.jit
def _held_h(
    p_hprev, ring, step, o_b, m_b, o_k, B, H: tl.constexpr, VALUE: tl.constexpr, TAGGED: tl.constexpr,
    K_SPLIT: tl.constexpr,
):  # fmt: skip
    """h before step ``step`` of rows o_b and reduction units o_k (p_hprev: the step's [B, H] rows of hseq), as the
    held dots' operand (_load_h_prev, _operand)."""
    o_br, o_bu = _tile(o_b * H, o_k, K_SPLIT, False)
    m_br, m_bu = _tile(m_b, o_k < H, K_SPLIT, False)
    o_bk = o_br + o_bu
    b_h = _load_h_prev(p_hprev + o_bk, ring, step, o_bk, m_br & m_bu, B, H, VALUE, TAGGED)
    return _operand(b_h, K_SPLIT, False)


@triton.jit
def _held_fwd_tiles(
    w_hh, o_j, m_j, k0, WIDTH: tl.constexpr, H: tl.constexpr, G: tl.constexpr, W_UNIT: tl.constexpr,
    W_RED: tl.constexpr, K_SPLIT: tl.constexpr, W_T: tl.constexpr,
):  # fmt: skip
    """The forward's held tiles b_w{g}[k, j] = W_hh[g*H + j, k] of reduction units [k0, k0 + WIDTH) (k in chunks with
    K_SPLIT; W_hh[g*H + j, k] at w_hh + (g*H + j) * W_UNIT + k * W_RED)."""
    o_kw = _weight_units(k0, WIDTH, K_SPLIT, W_T)
    o_wr, o_wu = _tile(o_j * W_UNIT, o_kw * W_RED, K_SPLIT, True, W_T)
    m_wr, m_wu = _tile(m_j, o_kw < H, K_SPLIT, True, W_T)
    return _load_gate_tiles(w_hh + o_wr + o_wu, m_wr & m_wu, H * W_UNIT, G, K_SPLIT, W_T)


@triton.jit(do_not_specialize=["T", "B", "t_start", "n_steps", "direction0", "seed_ptr", "p_drop"])
def rnn_fwd_kernel(
    xproj,  # [T, B, D*G*H] x @ W_ih^T plus the biases that can be folded in (all but GRU's b_hn)
    w_hh,  # [D, G*H, H]
    b_hn,  # [D, H] GRU's hidden bias of the n gate (sits inside r * (...)); unused by other cells
    hseq,  # [D, T+1, B, H] the hidden states: h_t at row t + 1 - d, the initial state at row d * T
    state,  # [D, B, H] ACC: LSTM c, GRU h in full precision; initial state in, final state out
    saved,  # [D, T, B, S*H] in the layer's dtype: what backward needs (_cell_fwd), by time (written when SAVE)
    y,  # [T, B, D*H] the layer output (written when WRITE_Y; else hseq[0, 1:] is the output)
    res,  # [T, B, D*H] the layer input, added to the output (RESIDUAL)
    z,  # [T, B, D*H] dropout(y), the next layer's input (written when DROPOUT)
    counter,  # [D, NB] int32, zeroed: one grid barrier per direction and batch group
    lengths,  # [B] int32 (VARLEN): each sequence's length; rows keep their state at steps t >= length
    T,
    B,
    t_start,  # runs steps t_start, ..., t_start + n_steps - 1 of each direction
    n_steps,
    direction0,  # the direction of program_id(1) == 0
    seed_ptr,  # [1] int64: the dropout seed (read on the GPU, so a replayed CUDA graph draws new masks)
    p_drop,
    H: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr,
    SAVE: tl.constexpr,
    SYNC: tl.constexpr,
    WRITE_Y: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    VARLEN: tl.constexpr = False,
    K_SPLIT: tl.constexpr = 1,  # the reduction in K_SPLIT chunks, one a warp (_dot_k)
    ring=None,  # [D, 2, B, H] int32 (16-bit dtypes) or int64 (fp32) words (TAGGED): slot 0 the initial state, tag 1
    TAGGED: tl.constexpr = False,  # exchange h through ring's tagged words instead of the grid barrier (sync.py)
    W_T: tl.constexpr = False,  # w_hh holds each direction's W_hh transposed, [D, H, G*H] (layer_run: float32 on FMA)
    HALVES: tl.constexpr = False,  # the held rows as two halves, two dots a gate (_plan.fma_halves)
):
    num_programs = tl.num_programs(0)
    seed = tl.load(seed_ptr)
    d = (direction0 + tl.program_id(1)).to(tl.int64)
    # With HALVES each held tile and dot covers half the held rows: the FMA dots load each thread's share of both
    # operands into registers at once, which spills beyond 32 units of the reduction a chunk (perf/NOTES.md).
    HELD: tl.constexpr = BLOCK_K // 2 if HALVES else BLOCK_K
    o_j, m_j, o_k, _ = _program_units(H, BLOCK_H, HELD)
    out_ty = hseq.dtype.element_ty
    # W_hh[g*H + j, k] at w_hh + (g*H + j) * W_UNIT + k * W_RED. The FMA dots (float32 without TF32) read a held
    # tile from shared memory a unit j a lane: with W_hh row-major, the 16 units of a warp lie 4*H bytes apart, all
    # in one bank (16-way conflicts); transposed, side by side (perf/NOTES.md).
    W_UNIT: tl.constexpr = 1 if W_T else H
    W_RED: tl.constexpr = G * H if W_T else 1
    if TAGGED:
        ring += d * 2 * B * H
    # This direction's slices of every buffer.
    w_hh += d * (G * H * H)
    hseq += d * (T + 1) * B * H
    state += d * B * H
    saved += d * T * B * (S * H)
    xproj += d * (G * H)
    counter += d * tl.num_programs(2) + tl.program_id(2)
    b_lo, b_hi = _group_rows(B, BLOCK_B)
    # b_w{g}[k, j] = W_hh[g*H + j, k] (k in chunks with K_SPLIT): loaded once, resident for all steps.
    b_w0, b_w1, b_w2, b_w3 = _held_fwd_tiles(w_hh, o_j, m_j, 0, HELD, H, G, W_UNIT, W_RED, K_SPLIT, W_T)
    # The second half (HALVES; else unused copies of the first).
    b_v0, b_v1, b_v2, b_v3 = b_w0, b_w1, b_w2, b_w3
    if HALVES:
        b_v0, b_v1, b_v2, b_v3 = _held_fwd_tiles(w_hh, o_j, m_j, HELD, HELD, H, G, W_UNIT, W_RED, K_SPLIT, W_T)
    b_bhn = tl.load(b_hn + d * H + o_j, mask=m_j, other=0.0).to(ACC)  # GRU's (other cells: any values, unused)

    for s in range(n_steps):
        step = (t_start + s).to(tl.int64)
        t = _time(step, T, d)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            m_b = o_b < B
            row = t * B + o_b
            m_bj = m_b[:, None] & m_j[None, :]
            b_act = m_bj
            if VARLEN:
                # Past its length a row keeps its state: carried to the end (forward) or, in the reverse
                # direction, from the end down to its last element (so its first real step starts from h0).
                b_act = m_bj & (t < tl.load(lengths + o_b, mask=m_b, other=0))[:, None]
                b_hkeep = tl.load(hseq + ((t + d) * B + o_b)[:, None] * H + o_j[None, :], mask=m_bj, other=0.0)
            p_hprev = hseq + (t + d) * B * H
            r0, r1, r2, r3 = _recurrent_preacts(
                _held_h(p_hprev, ring, step, o_b, m_b, o_k, B, H, out_ty, TAGGED, K_SPLIT), b_w0, b_w1, b_w2, b_w3,
                hseq + ((t + d) * B + o_b) * H, m_b, w_hh + o_j * W_UNIT, m_j, H, H * W_UNIT, G, BLOCK_K, BLOCK_KS,
                ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT, W_RED,
            )  # fmt: skip
            if HALVES:
                b_h = _held_h(p_hprev, ring, step, o_b, m_b, HELD + o_k, B, H, out_ty, TAGGED, K_SPLIT)
                v0, v1, v2, v3 = _gate_dots(b_h, b_v0, b_v1, b_v2, b_v3, G, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
                r0 += v0
                r1 += v1
                r2 += v2
                r3 += v3
            p_x = xproj + row[:, None] * (D * G * H) + o_j[None, :]
            p_state = state + o_b[:, None] * H + o_j[None, :]
            p_saved = saved + row[:, None] * (S * H) + o_j[None, :]
            x0, x1, x2, x3 = _load_input_preacts(p_x, m_bj, H, G, ACC)
            b_hnew = _cell_fwd(
                x0, x1, x2, x3, r0, r1, r2, r3, b_bhn, p_state, p_saved, m_bj, b_act, H, CELL, SAVE, VARLEN
            )  # fmt: skip
            b_hout = b_hnew.to(out_ty)
            if VARLEN:
                b_hout = tl.where(b_act, b_hout, b_hkeep)
            tl.store(hseq + ((t + 1 - d) * B + o_b)[:, None] * H + o_j[None, :], b_hout, mask=m_bj)
            if TAGGED:
                word = ring.dtype.element_ty
                b_words = tag_pack(b_hout, tag_of(step + 2, word), word)
                tl.store(ring + ((step + 1) % 2) * B * H + o_b[:, None] * H + o_j[None, :], b_words, mask=m_bj)
            # The output is h as rounded to the dtype (what the next step and torch.nn see).
            _emit(
                y, res, z, b_hout.to(ACC), t, o_b, m_b, o_j, m_j, d, seed, p_drop, B, H, D, WRITE_Y, RESIDUAL, DROPOUT,
                b_act, VARLEN,
            )  # fmt: skip
        if TAGGED:
            # No grid barrier: the words carry the synchronisation. Threads of this program still reread what
            # others of it wrote (state, saved c, kept h), which a CTA barrier orders.
            tl.debug_barrier()
        elif SYNC:
            grid_barrier(counter, (s + 1) * num_programs)


@triton.jit
def _bwd_recurrent_step(
    grad_gates, grad_h, tn, B, o_j, m_j, o_k, m_k, b_w0, b_w1, b_w2, b_w3, p_wcol,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    ACCUMULATE: tl.constexpr = True,
    ring=None,
    tag=0,
    TAGGED: tl.constexpr = False,
    K_SPLIT: tl.constexpr = 1,
):  # fmt: skip
    """grad_h[:, j] += sum_g grad_gates[tn, :, g, :] @ W_hh[g*H:(g+1)*H, j]: dL/dh through W_hh.

    tn is the time of the direction's next step; grad_gates and grad_h [B, N] (N = H, or P with a
    projection) point at this direction's slice. Gate units [0, BLOCK_K) use the held tiles b_w*, the rest are read
    every step in chunks of BLOCK_KS from p_wcol ([BLOCK_H] pointers to W_hh[0, j]); both reductions cut in
    K_SPLIT chunks (o_k, m_k and the held tiles so cut: _dot_k).
    ACCUMULATE=False: grad_h = the sum, what it held is ignored. The stack kernel (kernels/stack.py) also computes
    the gradient of a layer's input this way, from the layer above's gate gradients and W_ih.
    TAGGED: the gate gradients come from ring ([B, G*H] words of step tn's slot) once they carry tag (sync.py).
    Rows: this program's batch group's (all of them without grid axis 2).
    """
    b_lo, b_hi = _group_rows(B, BLOCK_B)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        m_b = o_b < B
        m_br, m_bu = _tile(m_b, m_k, K_SPLIT, False)
        m_bk = m_br & m_bu
        m_bj = m_b[:, None] & m_j[None, :]
        p_dh = grad_h + o_b[:, None] * N + o_j[None, :]
        # Gate gradients of every unit, written by all programs before the last barrier: bypass L1.
        p_row = grad_gates + (tn * B + o_b) * (D * G * H)
        p_r, p_u = _tile(p_row, o_k, K_SPLIT, False)
        p_dg = p_r + p_u
        acc = tl.load(p_dh, mask=m_bj & ACCUMULATE, other=0.0)
        if TAGGED:
            grad_ty = grad_gates.dtype.element_ty
            p_wr, p_wu = _tile(ring + o_b * (G * H), o_k, K_SPLIT, False)
            p_w = p_wr + p_wu
            b_dg0 = _operand(load_tagged(p_w, m_bk, tag, grad_ty), K_SPLIT, False)
            acc += _dot_k(b_dg0, b_w0, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
            if G > 1:
                b_dg1 = _operand(load_tagged(p_w + H, m_bk, tag, grad_ty), K_SPLIT, False)
                acc += _dot_k(b_dg1, b_w1, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
                b_dg2 = _operand(load_tagged(p_w + 2 * H, m_bk, tag, grad_ty), K_SPLIT, False)
                acc += _dot_k(b_dg2, b_w2, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
            if G > 3:
                b_dg3 = _operand(load_tagged(p_w + 3 * H, m_bk, tag, grad_ty), K_SPLIT, False)
                acc += _dot_k(b_dg3, b_w3, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
        else:
            b_dg0 = _operand(tl.load(p_dg, mask=m_bk, other=0.0, cache_modifier=".cg"), K_SPLIT, False)
            acc += _dot_k(b_dg0, b_w0, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
            if G > 1:
                b_dg1 = _operand(tl.load(p_dg + H, mask=m_bk, other=0.0, cache_modifier=".cg"), K_SPLIT, False)
                acc += _dot_k(b_dg1, b_w1, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
                b_dg2 = _operand(tl.load(p_dg + 2 * H, mask=m_bk, other=0.0, cache_modifier=".cg"), K_SPLIT, False)
                acc += _dot_k(b_dg2, b_w2, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
            if G > 3:
                b_dg3 = _operand(tl.load(p_dg + 3 * H, mask=m_bk, other=0.0, cache_modifier=".cg"), K_SPLIT, False)
                acc += _dot_k(b_dg3, b_w3, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
        for k0 in range(BLOCK_K, H, BLOCK_KS):
            o_ks = _reduction_units(k0, BLOCK_KS)
            m_ks = o_ks < H
            o_kw = _weight_units(k0, BLOCK_KS, K_SPLIT, True, STREAMED=True)
            for g in tl.static_range(G):
                b_dgk = _load_operand(p_row + g * H, o_ks, m_b, m_ks, K_SPLIT, False, BYPASS_L1=True)
                b_wk = _load_operand(p_wcol, (g * H + o_kw) * N, m_j, o_kw < H, K_SPLIT, True, True, STREAMED=True)
                acc += _dot_k(b_dgk, b_wk, ACC, DOT_PRECISION, DOT_UPCAST, K_SPLIT)
        tl.store(p_dh, acc, mask=m_bj)


@triton.jit
def _store_tagged_gates(ring, k, o_b, o_j, g0, g1, g2, g3, m_bj, B, H: tl.constexpr, G: tl.constexpr):
    """Store the G gate-gradient tiles of rows o_b, units o_j as backward step k's tagged words: slot k % 2 of ring
    ([2, B, G*H] words, gate g at +g*H), tag k + 1."""
    word = ring.dtype.element_ty
    tag = tag_of(k + 1, word)
    p_w = ring + (k % 2) * B * (G * H) + o_b[:, None] * (G * H) + o_j[None, :]
    tl.store(p_w, tag_pack(g0, tag, word), mask=m_bj)
    if G > 1:
        tl.store(p_w + H, tag_pack(g1, tag, word), mask=m_bj)
        tl.store(p_w + 2 * H, tag_pack(g2, tag, word), mask=m_bj)
    if G > 3:
        tl.store(p_w + 3 * H, tag_pack(g3, tag, word), mask=m_bj)


@triton.jit
def _ring_slot(ring, slot, B, G: tl.constexpr, H: tl.constexpr, TAGGED: tl.constexpr):
    """The [B, G*H] words of one slot of the backward's ring; when not TAGGED (ring is None) ``slot``, unused: Triton
    3.6's compiler cannot return None from a function (its interpreter and Triton 3.9 can)."""
    if TAGGED:
        return ring + slot * B * (G * H)
    else:
        return slot


@triton.jit
def _ring_tag(ring, step, TAGGED: tl.constexpr):
    """The tag of a step's words in ring (0 when not TAGGED: unused)."""
    tag = 0
    if TAGGED:
        tag = tag_of(step, ring.dtype.element_ty)
    return tag


@triton.jit(do_not_specialize=["T", "B", "u_start", "n_steps", "finish", "direction0", "seed_ptr", "p_drop"])
def rnn_bwd_kernel(
    w_hh,  # [D, G*H, H]
    hseq,  # [D, T+1, B, H] from the forward
    saved,  # [D, T, B, S*H] from the forward (_cell_fwd), by time
    c0,  # [D, B, H] ACC: LSTM's initial cell state
    grad_y,  # [T, B, D*H] dL/dy, the layer output
    grad_z,  # [T, B, D*H] dL/dz, the next layer's input (DROPOUT)
    grad_res,  # [T, B, D*H] out (RESIDUAL): dL/dy + dropout'(dL/dz), the gradient the residual adds to dx
    grad_gates,  # [T, B, D*G*H] out: dL/d(recurrent pre-activations W_hh h_{t-1} + b_hh), by time
    grad_xn,  # [T, B, D*H] out, GRU only: dL/d(input part of the n gate), which differs from grad_gates'
    grad_h,  # [D, B, H] ACC: dL/dh_n in, dL/dh0 out
    grad_c,  # [D, B, H] ACC: dL/dc_n in, dL/dc0 out (LSTM)
    counter,  # [D, NB] int32, zeroed: one grid barrier per direction and batch group
    lengths,  # [B] int32 (VARLEN): each sequence's length; steps t >= length pass the gradients through
    T,
    B,
    u_start,  # runs steps u_start, u_start - 1, ..., u_start - n_steps + 1 of each direction
    n_steps,
    finish,  # nonzero: after the steps, carry the gate gradients of step u_start - n_steps + 1 into grad_h
    direction0,  # the direction of program_id(1) == 0
    seed_ptr,  # [1] int64: the dropout seed (read on the GPU, so a replayed CUDA graph draws new masks)
    p_drop,
    H: tl.constexpr,
    CELL: tl.constexpr,
    G: tl.constexpr,
    S: tl.constexpr,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr,
    SYNC: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    VARLEN: tl.constexpr = False,
    K_SPLIT: tl.constexpr = 1,  # the reduction in K_SPLIT chunks, one a warp (_dot_k)
    ring=None,  # [D, 2, B, G*H] int32 or int64 words, zeroed (TAGGED): the gate gradients of the last two steps
    TAGGED: tl.constexpr = False,  # exchange the gate gradients as tagged words instead of the grid barrier
):
    num_programs = tl.num_programs(0)
    seed = tl.load(seed_ptr)
    d = (direction0 + tl.program_id(1)).to(tl.int64)
    o_j, m_j, o_k, m_k = _program_units(H, BLOCK_H, BLOCK_K)
    w_hh += d * (G * H * H)
    hseq += d * (T + 1) * B * H
    saved += d * T * B * (S * H)
    c0 += d * B * H
    grad_h += d * B * H
    grad_c += d * B * H
    grad_gates += d * (G * H)
    counter += d * tl.num_programs(2) + tl.program_id(2)
    b_lo, b_hi = _group_rows(B, BLOCK_B)
    if TAGGED:
        ring += d * 2 * B * (G * H)
    o_w = d * H + o_j.to(tl.int64)  # this program's columns of the [T, B, D*H] tensors
    # b_w{g}[k, j] = W_hh[g*H + k, j]: the transpose of the forward's tiles, resident for all steps.
    o_kw = _weight_units(0, BLOCK_K, K_SPLIT, True)
    o_wr, o_wu = _tile(o_j, o_kw * H, K_SPLIT, True, True)
    m_wr, m_wu = _tile(m_j, o_kw < H, K_SPLIT, True, True)
    b_w0, b_w1, b_w2, b_w3 = _load_gate_tiles(w_hh + o_wr + o_wu, m_wr & m_wu, H * H, G, K_SPLIT, True)

    for s in range(n_steps):
        u = (u_start - s).to(tl.int64)
        t = _time(u, T, d)
        k = T - 1 - u  # the backward's step count: tagged words of step k sit in slot k % 2 with tag k + 1
        if u < T - 1:
            _bwd_recurrent_step(
                grad_gates, grad_h, _time(u + 1, T, d), B, o_j, m_j, o_k, m_k, b_w0, b_w1, b_w2, b_w3,
                w_hh + o_j, H, G, D, H, BLOCK_B, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION, DOT_UPCAST, True,
                _ring_slot(ring, (k - 1) % 2, B, G, H, TAGGED), _ring_tag(ring, k, TAGGED), TAGGED, K_SPLIT,
            )  # fmt: skip
        # grad_h was just written by other threads of this program.
        tl.debug_barrier()
        for b0 in range(b_lo, b_hi, BLOCK_B):
            o_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
            m_b = o_b < B
            row = t * B + o_b
            m_bj = m_b[:, None] & m_j[None, :]
            o_h = row[:, None] * H + o_j[None, :]  # [T, B, H] layout: saved rows, hseq rows
            o_y = row[:, None] * (D * H) + o_w[None, :]  # [T, B, D*H] layout
            p_dh = grad_h + o_b[:, None] * H + o_j[None, :]
            p_saved = saved + row[:, None] * (S * H) + o_j[None, :]
            p_dg = grad_gates + row[:, None] * (D * G * H) + o_j[None, :]
            b_dy = tl.load(grad_y + o_y, mask=m_bj, other=0.0).to(ACC)
            if DROPOUT != DROPOUT_NONE:
                b_dz = tl.load(grad_z + o_y, mask=m_bj, other=0.0).to(ACC)
                b_dy += b_dz * dropout_scale(seed, p_drop, t, o_b, o_w, B, D * H, DROPOUT)
            b_act = m_bj
            if VARLEN:
                # Past its length a row's outputs are constant zeros and its state is carried unchanged.
                b_act = m_bj & (t < tl.load(lengths + o_b, mask=m_b, other=0))[:, None]
                b_dy = tl.where(b_act, b_dy, 0.0)
            if RESIDUAL:
                tl.store(grad_res + o_y, b_dy.to(grad_res.dtype.element_ty), mask=m_bj)
            b_dh = b_dy + tl.load(p_dh, mask=m_bj, other=0.0)
            # c of the previous step, which ran at time t - 1 (forward) or t + 1 (reverse); c0 before the first.
            b_cprev = _saved_c_prev(
                c0 + o_b[:, None] * H + o_j[None, :], p_saved + (1 - 2 * d) * (-B * S * H), u == 0, m_bj, H, ACC, CELL
            )  # fmt: skip
            g0, g1, g2, g3 = _cell_bwd(
                b_dh, p_dh, p_saved, b_cprev, grad_c + o_b[:, None] * H + o_j[None, :], p_dg, grad_xn + o_y,
                hseq + o_h + d * B * H, hseq + o_h + (1 - d) * B * H, m_bj, b_act, H, CELL, VARLEN, False,
            )  # fmt: skip
            if TAGGED:
                _store_tagged_gates(ring, k, o_b, o_j, g0, g1, g2, g3, m_bj, B, H, G)
        if TAGGED:
            # The words carry the synchronisation; a CTA barrier orders this program's own rereads (grad_h, dL/dc).
            tl.debug_barrier()
        elif SYNC:
            grid_barrier(counter, (s + 1) * num_programs)

    if finish != 0:
        k_last = (T - 1 - (u_start - n_steps + 1)).to(tl.int64)
        _bwd_recurrent_step(
            grad_gates, grad_h, _time((u_start - n_steps + 1).to(tl.int64), T, d), B, o_j, m_j, o_k, m_k,
            b_w0, b_w1, b_w2, b_w3, w_hh + o_j, H, G, D, H, BLOCK_B, BLOCK_K, BLOCK_KS, ACC, DOT_PRECISION,
            DOT_UPCAST, True, _ring_slot(ring, k_last % 2, B, G, H, TAGGED), _ring_tag(ring, k_last + 1, TAGGED),
            TAGGED, K_SPLIT,
        )  # fmt: skip
