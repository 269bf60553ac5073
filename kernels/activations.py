"""Numerically safe pointwise functions shared by every cell.

Where ``exp`` overflows it is only ever divided into (1 / inf = 0), so saturating inputs give exact
0/1 (sigmoid) or -1/1 (tanh) instead of inf/inf = NaN, and NaN inputs propagate as NaN.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    # exp(-x) overflows to inf for x << 0, giving 1 / inf = 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


# tanh(x) = x + x^3 P(x^2) for |x| < TANH_SERIES_BOUND in float32: P's coefficients fitted here (iterated weighted
# least squares for the relative error, in float64), 4.4e-9 relative in exact arithmetic. With the formula beyond the
# bound, float32's tanh is within 1.7 ulp of the exact value (0.2 on average, 0.6 past |x| = 2; numpy's: 1.4).
TANH_SERIES_BOUND = tl.constexpr(0.625)
TANH_P0 = tl.constexpr(-0.3333328194)
TANH_P1 = tl.constexpr(0.1333144221)
TANH_P2 = tl.constexpr(-0.05373971582)
TANH_P3 = tl.constexpr(0.02063908923)
TANH_P4 = tl.constexpr(-0.005704988741)


@triton.jit
def tanh(x):
    # With e = exp(-2x), tanh(x) = 1 - 2e / (1 + e) for x >= 0 and 2 / (1 + e) - 1 below: either way the small term
    # is the computed one, its rounding lands on +-1 - ..., 0.6 ulp where |x| > 2 (2 / (1 + e) - 1 for every x was 3
    # ulp for x > 0, and 1 - tanh^2 of a saturated unit amplifies it: a bias gradient came out 4.6e-5 from float64,
    # torch.nn's 1.1e-5, now 4.0e-6). Exactly +-1 in saturation (e = inf gives 2 / inf - 1), NaN stays NaN.
    # (The same with e = exp(-2|x|) and the sign applied after crashes LLVM's SLP vectorizer, Triton 3.9, sm_90, fp32
    # with the tagged exchange.)
    e = tl.exp(-2.0 * x)
    t = tl.where(x >= 0, 1.0 - 2.0 * e / (1.0 + e), 2.0 / (1.0 + e) - 1.0)
    if x.dtype == tl.float32:
        # Near 0 that difference keeps only eps / |x| of relative precision (a bias-free 3-layer LSTM on small
        # inputs came out 1.9e-5 from float64, torch.nn in float32 2.6e-7): a series there instead.
        s = x * x
        p = (((TANH_P4 * s + TANH_P3) * s + TANH_P2) * s + TANH_P1) * s + TANH_P0
        t = tl.where(tl.abs(x) < TANH_SERIES_BOUND, x * (1.0 + s * p), t)
    elif x.dtype == tl.float64:
        # float64 (the CPU paths' checking precision) loses the same eps64 / |x|: a sweep met 6e-5 at |x| = 1e-12 (a
        # unit decaying through small recurrent weights). Taylor's terms to x^7 are exact in float64 below 0.01, and
        # above it the difference is within 2e-14.
        s = x * x
        p = ((-17.0 / 315.0 * s + 2.0 / 15.0) * s - 1.0 / 3.0) * s
        t = tl.where(tl.abs(x) < 0.01, x + x * p, t)
    return t


@triton.jit
def relu(x):
    # tl.where keeps NaN as NaN (torch.relu does); tl.maximum would not promise that.
    return tl.where(x < 0, 0.0, x)
