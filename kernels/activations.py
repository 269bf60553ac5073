"""Numerically safe pointwise functions shared by every cell.

None of them evaluates ``exp`` of a large positive argument, so saturating inputs give exact
0/1 (sigmoid) or -1/1 (tanh) instead of inf/inf = NaN, and NaN inputs propagate as NaN.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    # exp(-x) overflows to inf for x << 0, giving 1 / inf = 0: no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1 saturates to exactly -1 / 1.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def relu(x):
    # tl.where keeps NaN as NaN (torch.relu does); tl.maximum would not promise that.
    return tl.where(x < 0, 0.0, x)
