"""CPU tensors without the Triton interpreter: each layer's recurrence on torch's own CPU implementation.

torch's CPU LSTM/GRU/RNN op (``torch._VF``: oneDNN or ATen's fused cells) trains a layer several times faster than
the reference's step loop under autograd (perf/NOTES.md, twenty-second session), so a model moved to the CPU is no
slower than torch.nn's. Only the recurrence is torch's (a batch of lengths as a PackedSequence, which is the
semantics of tritonrnn's lengths); what lies between layers (the dropout masks, standard or variational, and the
residual sums) stays tritonrnn's (``reference.layer_output``), as on the GPU.
Half precision is computed in float32 and rounded back, as the reference and the kernels do.

Where torch's op cannot serve, the reference runs: under a torch.func transform (the op has no batching rule), an
empty sequence, a sequence of length 0, or one bias without the other or directions of different layouts (torch's
op takes both biases or neither, the same in every direction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from tritonrnn import dropout as _dropout
from tritonrnn import reference

_OPS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh, "rnn_relu": torch._VF.rnn_relu}


def _runs_natively(x: Tensor, weights: Sequence[reference.Weights], lengths: Tensor | None) -> bool:
    if torch._C._functorch.peek_interpreter_stack() is not None or x.shape[0] == 0:
        return False
    # torch's op reads one layout for every direction: both biases or neither, a projection or not.
    layouts = {(w[2] is not None, w[3] is not None, len(w) > 4 and w[4] is not None) for w in weights}
    (has_b_ih, has_b_hh, _), *other_layouts = layouts
    if other_layouts or has_b_ih != has_b_hh:
        return False
    return lengths is None or bool((lengths > 0).all())


def layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: Sequence[reference.Weights],
    residual: bool = False,
    dropout: _dropout.LayerDropout | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``reference.layer``'s contract (arguments and returns), the recurrence of all directions in one torch op."""
    if not _runs_natively(x, weights, lengths):
        return reference.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
    dtype = x.dtype
    cdt = reference._compute_dtype(dtype)
    # torch's parameter list: per direction w_ih, w_hh, then b_ih, b_hh when present, then an LSTM's w_hr.
    params = [w.to(cdt) for direction in weights for w in direction if w is not None]
    has_biases = weights[0][2] is not None
    hx = (h0.to(cdt), c0.to(cdt)) if cell == "lstm" else h0.to(cdt)
    # Keep what backward needs only when there will be one (torch.nn passes its training flag here).
    options = (has_biases, 1, 0.0, torch.is_grad_enabled(), len(weights) == 2)
    if lengths is None:
        out, *states = _OPS[cell](x.to(cdt), hx, params, *options, False)
    else:
        packed = pack_padded_sequence(x.to(cdt), lengths.to("cpu", torch.int64), enforce_sorted=False)
        order, restore = packed.sorted_indices, packed.unsorted_indices
        hx = tuple(s.index_select(1, order) for s in hx) if cell == "lstm" else hx.index_select(1, order)
        data, *states = _OPS[cell](packed.data, packed.batch_sizes, hx, params, *options)
        out = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, order, restore), total_length=len(x))[0]
        states = [s.index_select(1, restore) for s in states]
    h_n = states[0].to(dtype)
    c_n = states[1].to(dtype) if cell == "lstm" else None
    return reference.layer_output(x, out.to(dtype), h_n, c_n, residual, dropout, lengths)
