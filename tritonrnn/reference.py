"""Pure-PyTorch recurrent layers: the one statement of the math.

Tests compare the kernels against it (in float64), perf measures errors with it, and the layers the
kernels cannot run (on the CPU: those torch's own CPU op cannot, tritonrnn/native.py) run on it.
Gate orders are torch.nn's: LSTM (i, f, g, o), GRU (r, z, n) with the hidden bias of n inside ``r * (W_hn h + b_hn)``.
Half-precision inputs are computed in float32 (the kernels' state and accumulation precision)
and the outputs rounded back.

``layer_forward`` is one direction of one layer; ``layer`` a whole layer (both directions, the
residual connection and the output's dropout mask), with the signature the stack scheduler
(tritonrnn/scheduler.py) calls; ``stack_forward`` chains reference layers with that scheduler.
Their arguments are not checked here (the math stays readable): ``functional.stack`` checks the same arguments, and
``tritonrnn.functional.check_stack_arguments`` can check a call to these first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tritonrnn import dropout as _dropout
from tritonrnn._plan import CELLS


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
    w_hr: Tensor | None = None,
    reverse: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One direction of one layer over a sequence.

    Args:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        x: [T, B, I] input.
        h0, c0: [B, H] initial states (c0 only for LSTM, else None).
        w_ih: [G*H, I], w_hh: [G*H, N], b_ih / b_hh: [G*H] or None.
        w_hr: [N, H] an LSTM's projection (h = W_hr (o * tanh(c)), N = proj_size), or None (N = H).
        reverse: run from the last step to the first (the reverse direction of a bidirectional layer).
        lengths: [B] each sequence's length: at steps t >= length a row keeps its state and outputs zeros (so
            h_n is its last real state and, in reverse, its first real step starts from h0), as torch.nn runs a
            PackedSequence.

    Returns:
        (output [T, B, N] in time order, h_n [B, N], c_n [B, H] or None), in x's dtype.
    """
    dtype = x.dtype
    cdt = _compute_dtype(dtype)
    # Cast once, outside the loop: the gradients of w_hh and w_hr then flow back through one cast, summed over the
    # steps in cdt (a cast per step would round each step's contribution to the dtype).
    w_hh = w_hh.to(cdt)
    w_hr = w_hr.to(cdt) if w_hr is not None else None
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}")
    hidden = w_hh.shape[0] // CELLS[cell][1]
    xproj = x.to(cdt) @ w_ih.to(cdt).t()
    if b_ih is not None:
        xproj = xproj + b_ih.to(cdt)
    b_hh = b_hh.to(cdt) if b_hh is not None else torch.zeros(w_hh.shape[0], dtype=cdt, device=x.device)
    h = h0.to(cdt)
    c = c0.to(cdt) if c0 is not None else None
    outputs = []
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h_before, c_before = h, c
        gh = h @ w_hh.t() + b_hh
        if cell == "lstm":
            gates = xproj[t] + gh
            i, f, g, o = gates.split(hidden, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                # Like the kernels: the projection's input is rounded to the dtype (a tensor-core operand).
                h = h.to(dtype).to(cdt) @ w_hr.t()
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
        if lengths is not None:
            active = (t < lengths).to(x.device)[:, None]
            outputs.append(torch.where(active, h, torch.zeros_like(h)))
            h = torch.where(active, h, h_before)
            c = torch.where(active, c, c_before) if c is not None else None
            continue
        outputs.append(h)
    if reverse:
        outputs.reverse()
    if outputs:
        out = torch.stack(outputs)
    else:
        out = xproj.new_empty(0, *h.shape)
    return out.to(dtype), h.to(dtype), (c.to(dtype) if c is not None else None)


# (w_ih, w_hh, b_ih, b_hh) or, for an LSTM with a projection, (w_ih, w_hh, b_ih, b_hh, w_hr).
Weights = tuple[Tensor, ...]


def layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: Sequence[Weights],
    residual: bool = False,
    dropout: _dropout.LayerDropout | None = None,
    lengths: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """One layer, all directions: y = [h_forward, h_reverse] (+ x), z = y * mask.

    Args:
        x: [T, B, I]; h0 [D, B, N], c0 [D, B, H] (LSTM only); weights: D tuples (w_ih, w_hh, b_ih, b_hh[, w_hr]).
        residual: add x to the output (I == D*H).
        dropout: the mask applied to the output for the next layer, or None.
        mask: dropout's mask, when already drawn (``dropout.mask``; under torch.func the mask kernel cannot run).

    Returns:
        (y [T, B, D*N], z [T, B, D*N] or None, h_n [D, B, N], c_n [D, B, H] or None), in x's dtype.
    """
    results = [
        layer_forward(cell, x, h0[d], c0[d] if c0 is not None else None, *w, reverse=d == 1, lengths=lengths)
        for d, w in enumerate(weights)
    ]
    y = torch.cat([r[0] for r in results], dim=-1)
    h_n = torch.stack([r[1] for r in results])
    c_n = torch.stack([r[2] for r in results]) if c0 is not None else None
    return layer_output(x, y, h_n, c_n, residual, dropout, lengths, mask)


def layer_output(
    x: Tensor,
    y: Tensor,
    h_n: Tensor,
    c_n: Tensor | None,
    residual: bool = False,
    dropout: _dropout.LayerDropout | None = None,
    lengths: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The end of ``layer`` once its directions have run (y [T, B, D*N], h_n, c_n): the residual sum and the
    dropped-out output, with ``layer``'s arguments and returns."""
    if not residual and dropout is None:
        return y, None, h_n, c_n
    cdt = _compute_dtype(x.dtype)
    # Like the kernels: the sum and the dropped output are formed in the compute precision from h as rounded.
    y_c = y.to(cdt) + x.to(cdt) if residual else y.to(cdt)
    if residual and lengths is not None:
        y_c = y_c * (torch.arange(y.shape[0], device=y.device)[:, None] < lengths.to(y.device))[..., None]
    z = None
    if dropout is not None:
        T, B, W = y.shape
        mask = mask if mask is not None else _dropout.mask(dropout, T, B, W, x.device)
        z = (y_c * mask.to(cdt)).to(x.dtype)
    return y_c.to(x.dtype), z, h_n, c_n


def stack_forward(x: Tensor, h0: Tensor, c0: Tensor | None, layers: Sequence) -> tuple[Tensor, Tensor, Tensor | None]:
    """torch.nn's stack on reference layers: x [T, B, I], h0/c0 [L*D, B, H], layers: scheduler.StackLayer's.

    Returns (output [T, B, D*H] of the top layer, h_n [L*D, B, H], c_n [L*D, B, H] or None).
    """
    from tritonrnn import scheduler

    D = len(layers[0].weights)
    h0s = h0.split(D)
    c0s = c0.split(D) if c0 is not None else [None] * len(layers)
    ys, h_n, c_n = scheduler.run_stack(x, layers, h0s, c0s, layer_fn=layer)
    return ys[-1], torch.cat(h_n), (torch.cat(c_n) if c0 is not None else None)
