"""Pure-PyTorch recurrent layers: the one statement of the math.

Tests compare the kernels against it (in float64), perf measures errors with it, and CPU tensors
run on it when the Triton interpreter is off. Gate orders are torch.nn's: LSTM (i, f, g, o),
GRU (r, z, n) with the hidden bias of n inside ``r * (W_hn h + b_hn)``.
Half-precision inputs are computed in float32 (the kernels' state and accumulation precision)
and the outputs rounded back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def layer_forward(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer over a sequence.

    Args:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        x: [T, B, I] input.
        h0, c0: [B, H] initial states (c0 only for LSTM, else None).
        w_ih: [G*H, I], w_hh: [G*H, H], b_ih / b_hh: [G*H] or None.

    Returns:
        (output [T, B, H], h_n [B, H], c_n [B, H] or None), in x's dtype.
    """
    dtype = x.dtype
    cdt = _compute_dtype(dtype)
    w_hh = w_hh.to(cdt)
    xproj = x.to(cdt) @ w_ih.to(cdt).t()
    if b_ih is not None:
        xproj = xproj + b_ih.to(cdt)
    hidden = w_hh.shape[1]
    b_hh = b_hh.to(cdt) if b_hh is not None else torch.zeros(w_hh.shape[0], dtype=cdt, device=x.device)
    h = h0.to(cdt)
    c = c0.to(cdt) if c0 is not None else None
    outputs = []
    for t in range(x.shape[0]):
        gh = h @ w_hh.t() + b_hh
        if cell == "lstm":
            gates = xproj[t] + gh
            i, f, g, o = gates.split(hidden, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif cell == "gru":
            xr, xz, xn = xproj[t].split(hidden, dim=-1)
            hr, hz, hn = gh.split(hidden, dim=-1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
        elif cell == "rnn_tanh":
            h = torch.tanh(xproj[t] + gh)
        elif cell == "rnn_relu":
            h = torch.relu(xproj[t] + gh)
        else:
            raise ValueError(f"unknown cell {cell!r}")
        outputs.append(h)
    if outputs:
        out = torch.stack(outputs)
    else:
        out = xproj.new_empty(0, *h.shape)
    return out.to(dtype), h.to(dtype), (c.to(dtype) if c is not None else None)


LayerFn = Callable[..., "tuple[Tensor, Tensor, Tensor | None]"]


def stack_forward(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    layers: Sequence[tuple[Tensor, Tensor, Tensor | None, Tensor | None]],
    layer_fn: LayerFn = layer_forward,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A unidirectional stack: x [T, B, I], h0/c0 [L, B, H], layers [(w_ih, w_hh, b_ih, b_hh)].

    ``layer_fn`` runs one layer with ``layer_forward``'s signature (the kernels pass their own).
    Returns (output [T, B, H] of the top layer, h_n [L, B, H], c_n [L, B, H] or None).
    """
    h_n, c_n = [], []
    for index, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        x, h, c = layer_fn(cell, x, h0[index], c0[index] if c0 is not None else None, w_ih, w_hh, b_ih, b_hh)
        h_n.append(h)
        c_n.append(c)
    return x, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)
