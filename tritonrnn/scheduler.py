"""The stack scheduler: chains layers of any cells, with dropout between them and residual connections.

Layer l reads the previous layer's output after dropout (or the input x for l = 0), runs all its
directions, and writes its output y_l (plus its input when ``residual``) and, if dropout applies,
z_l = dropout(y_l) for layer l + 1 in the same kernel pass. Dropout sits between layers, never
after the last one (torch.nn's rule), and only in training.

The layer itself is a function (``layer_fn``) with ``reference.layer``'s signature: the kernels
(functional._layer) or the pure-PyTorch reference, so one scheduler serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tritonrnn import dropout as _dropout
from tritonrnn import reference


class StackLayer(NamedTuple):
    """One layer of a stack: its cell and one (w_ih, w_hh, b_ih, b_hh) per direction (forward first)."""

    cell: str
    weights: tuple[reference.Weights, ...]


LayerFn = Callable[..., "tuple[Tensor, Tensor | None, Tensor, Tensor | None]"]


def layer_dropouts(
    n_layers: int,
    dropout: float,
    dropout_mode: str,
    training: bool,
    device: torch.device,
    batch: int = 0,
    held: _dropout.HeldMasks | None = None,
) -> list[_dropout.LayerDropout | None]:
    """Each layer's output dropout for one call: between layers only (never after the last), in training only,
    one seed per layer drawn from the default generator of ``device``, bottom layer first. With ``held``, the
    variational seeds drawn by an earlier call with the same store (truncated BPTT; ``batch`` sequences)."""
    dropouts = []
    for index in range(n_layers):
        if not training or dropout <= 0 or index == n_layers - 1:
            dropouts.append(None)
        elif held is not None and dropout_mode == "variational":
            dropouts.append(held.layer_dropout(index, dropout, device, batch))
        else:
            dropouts.append(_dropout.draw(dropout, dropout_mode, device))
    return dropouts


def run_stack(
    x: Tensor,
    layers: Sequence[StackLayer],
    h0: Sequence[Tensor],
    c0: Sequence[Tensor | None],
    *,
    dropout: float = 0.0,
    dropout_mode: str = "standard",
    residual: bool = False,
    training: bool = False,
    lengths: Tensor | None = None,
    dropouts: Sequence[_dropout.LayerDropout | None] | None = None,
    layer_fn: LayerFn = reference.layer,
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """Run a stack (no validation of shapes: the modules and functional.stack do it).

    Args:
        x: [T, B, I] time-major input.
        layers: the layers, bottom first.
        h0, c0: per layer [D, B, H_l] initial states (c0[l] for LSTM layers only, else None).
        dropout, dropout_mode: inter-layer dropout ("standard" or "variational"), applied when ``training``.
            One seed per layer is drawn from x's device's generator, bottom layer first (``layer_dropouts``),
            unless ``dropouts`` gives them already drawn.
        residual: add each layer's input to its output (sizes must match).
        lengths: [B] each sequence's length, or None when all run T steps (``functional.stack``).
        layer_fn: runs one layer (``reference.layer``'s signature).

    Returns:
        (each layer's output y_l [T, B, D*H_l] before dropout, h_n per layer [D, B, H_l], c_n per layer).
    """
    if dropouts is None:
        dropouts = layer_dropouts(len(layers), dropout, dropout_mode, training, x.device)
    ys, h_n, c_n = [], [], []
    for index, (layer, drop) in enumerate(zip(layers, dropouts)):
        y, z, h, c = layer_fn(layer.cell, x, h0[index], c0[index], layer.weights, residual, drop, lengths)
        ys.append(y)
        h_n.append(h)
        c_n.append(c)
        x = z if z is not None else y
    return ys, h_n, c_n
