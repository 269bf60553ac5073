"""Inter-layer dropout: one seed per layer and forward call, masks drawn where they are used.

The seed is drawn by torch's generator of the device the layer runs on, into a one-element tensor there:
``torch.manual_seed`` reproduces the masks, drawing never synchronises with the GPU, and a CUDA graph
that captured the call draws a new seed (so new masks) at every replay, as torch's own dropout does. The
kernels read the seed and derive the mask from it with Philox (kernels/dropout.py) in forward and again in
backward; ``mask`` materialises the same mask for the reference implementation and for tests.

Modes: "standard" draws a fresh keep/drop per element and step (torch.nn's dropout);
"variational" draws one per (sequence, unit) and reuses it at every step (Gal & Ghahramani).
Kept elements are scaled by 1 / (1 - p) (computed in float32, as the kernels do).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from tritonrnn import _plan
from tritonrnn._plan import check_interpreter, interpret_mode, on_device
from tritonrnn.kernels.dropout import DROPOUT_STANDARD, DROPOUT_VARIATIONAL, dropout_mask_kernel

MODES = ("standard", "variational")


class LayerDropout(NamedTuple):
    """Dropout applied to one layer's output for one forward call (a NamedTuple: torch.compile traces it)."""

    p: float
    variational: bool
    seed: Tensor  # [1] int64 in [0, 2**31 - 1), on the layer's device

    @property
    def kernel_mode(self) -> int:
        return int((DROPOUT_VARIATIONAL if self.variational else DROPOUT_STANDARD).value)


def check_probability(name: str, p: float) -> None:
    """torch-like error for a drop probability outside [0, 1)."""
    # numbers.Real, as torch.nn takes it: a numpy scalar read from a config is a number too.
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"{name} should be a number in range [0, 1) representing the probability of an element "
                         f"being zeroed, got {p!r}")  # fmt: skip


def check_mode(mode: str) -> None:
    """Checked at construction and again at every forward (the attribute can be set in between)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"dropout_mode should be one of {MODES}, got {mode!r}")


def draw(p: float, mode: str, device: torch.device | str = "cpu") -> LayerDropout:
    """A fresh seed from the default generator of ``device`` for one layer's dropout."""
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    return LayerDropout(float(p), mode == "variational", seed)


def mask(dropout: LayerDropout, steps: int, batch: int, width: int, device: torch.device) -> Tensor:
    """The multipliers the kernels apply: [steps, batch, width] float32 (first dim 1 when variational).

    Runs the kernels' own generator where Triton can run (a GPU, or the CPU under the interpreter);
    on the CPU without it, a torch generator seeded with the same seed (same law, other numbers).
    """
    rows = 1 if dropout.variational else steps
    if device.type == "cpu" and not interpret_mode():
        generator = torch.Generator().manual_seed(int(dropout.seed.item()))
        keep = torch.rand(rows, batch, width, generator=generator) >= dropout.p
        # where, not a product: p = 1 (everything dropped) must give zeros, not 0 * inf.
        return torch.where(keep, 1.0 / (1.0 - torch.tensor(dropout.p, dtype=torch.float32)), 0.0)
    if device.type == "cpu":
        check_interpreter()
    out = _plan.empty_buffer(rows, batch, width, dtype=torch.float32, device=device)
    if out.numel():
        with on_device(device):
            dropout_mask_kernel[(rows * batch,)](
                mask=out, seed_ptr=dropout.seed.to(device), p=dropout.p, T=rows, B=batch, W=width,
                MODE=dropout.kernel_mode, BLOCK_W=min(1024, max(16, 1 << (width - 1).bit_length())),
            )  # fmt: skip
    return out
