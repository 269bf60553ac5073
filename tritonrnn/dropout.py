"""Inter-layer dropout: one seed per layer and forward call, masks drawn where they are used.

The seed is drawn by torch's generator of the device the layer runs on, into a one-element tensor there:
``torch.manual_seed`` reproduces the masks, drawing never synchronises with the GPU, and a CUDA graph
that captured the call draws a new seed (so new masks) at every replay, as torch's own dropout does. The
kernels read the seed and derive the mask from it with Philox (kernels/dropout.py) in forward and again in
backward; ``mask`` materialises the same mask for the reference implementation and for tests.

Modes: "standard" draws a fresh keep/drop per element and step (torch.nn's dropout);
"variational" draws one per (sequence, unit) and reuses it at every step (Gal & Ghahramani).
Kept elements are scaled by 1 / (1 - p) (computed in float32, as the kernels do).

``HeldMasks`` keeps masks from one call to the next, for truncated BPTT: a long sequence run in chunks keeps
one variational mask (and one DropConnect mask) for the whole sequence (``tritonrnn.hold_dropout_masks``).
"""

from __future__ import annotations

import numbers
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tritonrnn import _plan
from tritonrnn._capture import launch as launch_kernel
from tritonrnn._plan import FP_FUSION, capturing, check_interpreter, interpret_mode, on_device
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


class HeldMasks:
    """Dropout masks drawn at the first call that needs them and reused by every later call given the same store.

    Held: variational inter-layer masks (one seed per layer: the mask of sequence b and unit w depends on the seed
    and (b, w) alone, so it is the same at every step of every chunk) and DropConnect masks on W_hh. Not held:
    standard dropout, which draws a new mask for every step anyway (a later chunk's steps are new steps), so it
    draws fresh seeds at every call. A held variational mask belongs to the batch's sequences: a call with another
    batch size (other sequences) on the same device is refused. nn.DataParallel's replicas share the store (it copies
    a module's attributes), each on its own device with its own part of the batch, called from its own thread: so
    seeds and batch sizes are per device, and drawn under a lock.
    """

    def __init__(self) -> None:
        self._seeds: dict[tuple[int, torch.device], Tensor] = {}
        self._weight_masks: dict[tuple, Tensor] = {}
        self._batch: dict[torch.device, int] = {}
        self._lock = threading.Lock()
        self.thread: int | None = None  # the thread of the hold_dropout_masks block that made it, if one did

    def __reduce__(self):
        # A copy or a pickle of a model made inside a hold_dropout_masks block is not in the block: it holds nothing.
        return (_nothing_held, ())

    def layer_dropout(self, index: int, p: float, device: torch.device, batch: int) -> LayerDropout:
        """Layer ``index``'s variational dropout, its seed drawn once (from ``device``'s generator, as ``draw``)."""
        device = torch.device(device)
        key = (index, device)
        with self._lock:
            held_batch = self._batch.setdefault(device, batch)
            if batch != held_batch:
                raise ValueError(
                    f"hold_dropout_masks: the held variational dropout masks belong to a batch of {held_batch} "
                    f"sequences, this call has {batch}; start a new hold_dropout_masks block for other sequences"
                )
            if key not in self._seeds:
                _refuse_capture(device)
                self._seeds[key] = draw(p, "variational", device).seed
        return LayerDropout(float(p), True, self._seeds[key])

    def drop_weight(self, key: str, weight: Tensor, p: float) -> Tensor:
        """``weight`` with DropConnect (as ``F.dropout(weight, p)``) under the mask held for ``key``."""
        full_key = (key, float(p), tuple(weight.shape), weight.device)
        with self._lock:
            held = self._weight_masks.get(full_key)
            if held is None:
                _refuse_capture(weight.device)
                # The multipliers (0 or 1 / (1 - p)) in at least float32: one rounding of the product, as torch's
                # CUDA dropout computes it.
                dtype = torch.promote_types(weight.dtype, torch.float32)
                held = F.dropout(torch.ones(weight.shape, dtype=dtype, device=weight.device), p, training=True)
                self._weight_masks[full_key] = held
        return (weight.to(held.dtype) * held).to(weight.dtype)


def _refuse_capture(device: torch.device) -> None:
    """A held mask drawn inside a CUDA graph capture would be drawn again at every replay: no longer held."""
    if capturing(device):
        raise RuntimeError(
            "hold_dropout_masks: its masks are drawn at the block's first training call, and a draw captured in a "
            "CUDA graph is drawn again at every replay; make one call inside the block before capturing"
        )


def _nothing_held() -> None:
    return None


def mask(dropout: LayerDropout, steps: int, batch: int, width: int, device: torch.device) -> Tensor:
    """The multipliers the kernels apply: [steps, batch, width] float32 (first dim 1 when variational).

    Runs the kernels' own generator where Triton can run (a GPU, or the CPU under the interpreter);
    on the CPU without it, a torch generator seeded with the same seed (same law, other numbers).
    """
    rows = 1 if dropout.variational else steps
    # The seed cannot be read in an ONNX export, nor under vmap (one seed per sample): torch's own draw there, which
    # ONNX records and vmap's randomness option governs.
    fresh = torch.onnx.is_in_onnx_export() or _plan.transform_beyond_grad() is not None
    if fresh or (device.type == "cpu" and not interpret_mode()):
        drawn = {} if fresh else dict(generator=torch.Generator().manual_seed(int(dropout.seed.item())))
        keep = torch.rand(rows, batch, width, device=device, **drawn) >= dropout.p
        # where, not a product: p = 1 (everything dropped) must give zeros, not 0 * inf.
        return torch.where(keep, 1.0 / (1.0 - torch.tensor(dropout.p, dtype=torch.float32, device=device)), 0.0)
    if device.type == "cpu":
        check_interpreter()
    out = _plan.empty_buffer(rows, batch, width, dtype=torch.float32, device=device)
    if out.numel():
        options = dict(enable_fp_fusion=FP_FUSION) if device.type == "cuda" else {}
        with on_device(device):
            launch_kernel(
                dropout_mask_kernel, (rows * batch,), device,
                mask=out, seed_ptr=dropout.seed.to(device), p=dropout.p, T=rows, B=batch, W=width,
                MODE=dropout.kernel_mode, BLOCK_W=min(1024, max(16, 1 << (width - 1).bit_length())), **options,
            )  # fmt: skip
    return out
