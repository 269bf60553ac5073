"""The Triton interpreter's float32 -> bfloat16 cast rounded to nearest even, as the GPU rounds it (cvt.rn.bf16.f32).

The interpreter of Triton 3.6 to 3.9 truncates that cast (``InterpreterBuilder.cast_impl`` converts with no rounding
mode: toward zero). Every bf16 value the kernels write is such a cast (h carried into the next step, the values saved
for backward, the gate gradients), so under it a bf16 layer drifts toward zero and the CPU tier checks arithmetic the
GPU does not do: a bf16 LSTM over 400 steps gave 4.6e-3 of error against float64 truncating, 3.2e-3 rounding
(torch's own bf16 LSTM: 3.2e-3). conftest installs this under the interpreter;
``test_float32_to_bfloat16_rounds_to_nearest_even`` fails without it.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bits (uint16), rounded to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):  # a NaN's bits may wrap; NaNs are set below
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def install() -> None:
    """Make the interpreter's float32 -> bfloat16 casts round to nearest even (once; other casts unchanged)."""
    builder = interpreter.InterpreterBuilder  # an AttributeError here: the interpreter changed, look again
    truncating = builder.cast_impl
    if getattr(truncating, "rounds_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(round_to_bfloat16(src.data), dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl.rounds_to_nearest = True
    builder.cast_impl = cast_impl
