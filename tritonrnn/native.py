"""Each layer's recurrence on torch's own RNN op (``torch._VF``, what torch.nn's layers run): CPU tensors without the
Triton interpreter, and the layers the kernels cannot hold (the fallback, on any device).

On the CPU torch's op (oneDNN or ATen's fused cells) trains a layer several times faster than the reference's step
loop under autograd (perf/NOTES.md, twenty-second session), so a model moved to the CPU is no slower than torch.nn's.
On a GPU it is cuDNN (MIOpen on ROCm), with torch's own settings for it (``torch.backends.cudnn``, its TF32 flag
included), as torch.nn's layers run it: a layer too large for the kernels costs what it costs in torch.nn instead of
the reference's few small kernels per step. Only the recurrence is torch's (a batch of lengths as a PackedSequence,
which is the semantics of tritonrnn's lengths); what lies between layers (the dropout masks, standard or variational,
and the residual sums) stays tritonrnn's (``reference.layer_output``), so the masks are the kernels'.
On the CPU half precision is computed in float32 and rounded back, as the reference and the kernels do; on a GPU in
the half dtype itself, as torch.nn's cuDNN layers compute it.

Where torch's op cannot serve, the reference runs: under a torch.func transform (the op has no batching rule), an
empty sequence, a sequence of length 0, one bias without the other or directions of different layouts (torch's op
takes both biases or neither, the same in every direction), float64 on a GPU (a checking precision: the reference's
backward can be differentiated again, cuDNN's cannot), and a batch of lengths while a CUDA graph is captured (packing
reads the lengths on the host).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from tritonrnn import dropout as _dropout
from tritonrnn import reference

_OPS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh, "rnn_relu": torch._VF.rnn_relu}


# cuDNN copies weights that are not views of one flat buffer into one at every call and warns each time, advising
# flatten_parameters(). The fallback's weights are per layer (a StackedRNN's, or weight_drop's products): the copy is
# the price of the fallback, and the advice does not apply. torch raises the warning from the Python frame that called
# the op, so a filter on this module drops it here only (torch.nn's own layers keep it). It is added where it is
# missing (a catch_warnings block around an import or a call takes it away on exit), not around every call: a changed
# filter list makes Python forget which warnings it has shown, everywhere.
_UNFLATTENED_WARNING = "RNN module weights are not part of single contiguous chunk of memory"


def _ignore_flatten_advice() -> None:
    warnings.filterwarnings("ignore", _UNFLATTENED_WARNING, UserWarning, module=re.escape(__name__) + r"\Z")


with warnings.catch_warnings():  # the entry as this Python stores it, to look for in warnings.filters
    _ignore_flatten_advice()
    _FLATTEN_ADVICE_FILTER = warnings.filters[0]


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype torch's op runs a layer of ``dtype`` in on ``device``, or None where the reference runs instead."""
    if device.type == "cpu":
        return reference._compute_dtype(dtype)
    return None if dtype == torch.float64 else dtype


def _runs_natively(x: Tensor, weights: Sequence[reference.Weights], lengths: Tensor | None) -> bool:
    if torch._C._functorch.peek_interpreter_stack() is not None or x.shape[0] == 0:
        return False
    if compute_dtype(x.device, x.dtype) is None:
        return False
    if lengths is not None and x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
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
    cdt = compute_dtype(x.device, dtype)
    # torch's parameter list: per direction w_ih, w_hh, then b_ih, b_hh when present, then an LSTM's w_hr.
    params = [w.to(cdt) for direction in weights for w in direction if w is not None]
    has_biases = weights[0][2] is not None
    hx = (h0.to(cdt), c0.to(cdt)) if cell == "lstm" else h0.to(cdt)
    # Keep what backward needs only when there will be one (torch.nn passes its training flag here).
    options = (has_biases, 1, 0.0, torch.is_grad_enabled(), len(weights) == 2)
    if _FLATTEN_ADVICE_FILTER not in warnings.filters:
        _ignore_flatten_advice()
    out, states = _run(cell, x.to(cdt), hx, params, options, lengths)
    h_n = states[0].to(dtype)
    c_n = states[1].to(dtype) if cell == "lstm" else None
    return reference.layer_output(x, out.to(dtype), h_n, c_n, residual, dropout, lengths)


def _run(cell, x, hx, params, options, lengths):
    """torch's op on time-major x (packed by ``lengths`` when given): the output [T, B, D*H] and the final states."""
    if lengths is None:
        out, *states = _OPS[cell](x, hx, params, *options, False)
        return out, states
    packed = pack_padded_sequence(x, lengths.to("cpu", torch.int64), enforce_sorted=False)
    order, restore = packed.sorted_indices, packed.unsorted_indices
    hx = tuple(s.index_select(1, order) for s in hx) if cell == "lstm" else hx.index_select(1, order)
    data, *states = _OPS[cell](packed.data, packed.batch_sizes, hx, params, *options)
    out = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, order, restore), total_length=len(x))[0]
    return out, [s.index_select(1, restore) for s in states]
