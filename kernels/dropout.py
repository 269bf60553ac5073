"""Inter-layer dropout masks, generated where they are used instead of stored.

Dimension letters: T time steps, B batch, W width of the layer output (directions * hidden units).

Element (t, b, w) of a layer output keeps its value, scaled by 1 / (1 - p), when Philox draw number
``offset`` of the layer's seed is >= p. Standard dropout numbers every element of every step
(offset = (t * B + b) * W + w); variational dropout numbers only (b, w), so one mask per sequence and
unit is reused at every step. The forward kernel draws the mask where it writes the output, the
backward kernel draws it again where it reads the gradient: no mask is ever held in memory.
"""

import triton
import triton.language as tl

DROPOUT_NONE = tl.constexpr(0)
DROPOUT_STANDARD = tl.constexpr(1)
DROPOUT_VARIATIONAL = tl.constexpr(2)


@triton.jit
def dropout_scale(seed, p, t, o_b, o_w, B, W, MODE: tl.constexpr):
    """[len(o_b), len(o_w)] ACC multipliers of output rows o_b, columns o_w at step t: 0 or 1 / (1 - p).

    t, o_b and o_w are int64 (offsets exceed 2**31 for long sequences).
    """
    if MODE == DROPOUT_VARIATIONAL:
        offset = o_b[:, None] * W + o_w[None, :]
    else:
        offset = (t * B + o_b)[:, None] * W + o_w[None, :]
    # Philox with the 64-bit offset as two 32-bit counters: 32-bit arithmetic, the same numbers on every Triton
    # (tl.rand runs a 64-bit Philox for int64 offsets on older versions, much dearer on the GPU).
    zero = (offset * 0).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, offset.to(tl.uint32), (offset >> 32).to(tl.uint32), zero, zero)
    # p = 1 (torch.nn allows it) drops everything. Triton 3.6-3.9 scale the draw so that it stays below 1 (at most
    # 1 - 2**-24), so the comparison alone would do; the guard keeps it so under a generator that rounds up to 1.0.
    # The scale is kept finite (never selected then).
    keep = (tl.uint_to_uniform_float(bits) >= p) & (p < 1.0)
    return tl.where(keep, 1.0 / tl.maximum(1.0 - p, 1e-30), 0.0)


@triton.jit(do_not_specialize=["T", "B", "seed_ptr", "p"])
def dropout_mask_kernel(
    mask,  # [T, B, W] fp32 out: the multipliers dropout_scale gives (T = 1 for a variational mask)
    seed_ptr,  # [1] int64
    p,
    T,
    B,
    W,
    MODE: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Write the mask the layer kernels draw, so the reference (and tests) can apply the same one."""
    row = tl.program_id(0).to(tl.int64)  # t * B + b
    seed = tl.load(seed_ptr)
    t = row // B
    o_b = row % B + tl.arange(0, 1)
    for w0 in range(0, W, BLOCK_W):
        o_w = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
        b_scale = dropout_scale(seed, p, t, o_b, o_w, B, W, MODE)
        tl.store(mask + row * W + o_w[None, :], b_scale, mask=(o_w < W)[None, :])
