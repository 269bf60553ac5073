"""The Triton interpreter's masked loads without ``other`` fill their masked lanes with NaN (integers: their largest
value), where the GPU leaves them undefined.

The interpreter of Triton 3.6 to 3.9 fills them with zeros (``InterpreterBuilder.create_masked_load``), so a kernel
that loads a tile without ``other`` and lets its masked lanes reach a sum or a dot (a weight row past H, a batch row
past B) gives the right answer on the CPU and garbage on a GPU. Every masked load of ``kernels/`` passes ``other``;
conftest installs this under the interpreter so one that does not, and uses those lanes, fails the CPU tier
(``test_masked_lanes_a_load_leaves_undefined_are_nan`` checks it is installed). A mutation audit found the gap:
``_load_operand`` without ``other=0.0`` passed every test.
"""

from __future__ import annotations

import numpy as np
from triton.runtime import interpreter


def install() -> None:
    """Make masked loads without ``other`` fill their masked lanes with NaN or an integer's largest value (once)."""
    builder = interpreter.InterpreterBuilder  # an AttributeError here: the interpreter changed, look again
    zero_filling = builder.create_masked_load
    if getattr(zero_filling, "poisons_masked_lanes", False):
        return

    # Triton 3.6: (ptrs, mask, other, cache_modifier, eviction_policy, is_volatile); 3.9: (ptrs, mask, other,
    # cache_policy, is_volatile).
    def create_masked_load(self, ptrs, mask, other, *rest):
        if other is None and not np.all(mask.data):
            element = ptrs.get_element_ty()
            dtype = interpreter._get_np_dtype(element)
            fill = np.nan if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max
            other = interpreter.TensorHandle(np.full(ptrs.data.shape, fill, dtype=dtype), element)
        return zero_filling(self, ptrs, mask, other, *rest)

    create_masked_load.poisons_masked_lanes = True
    builder.create_masked_load = create_masked_load
