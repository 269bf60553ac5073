"""Each layer's recurrence on torch's own RNN op (``torch._VF``, what torch.nn's layers run): CPU tensors without the
Triton interpreter, and the layers the kernels cannot hold (the fallback, on any device).

On the CPU torch's op (oneDNN or ATen's fused cells) trains a layer several times faster than the reference's step
loop under autograd (perf/NOTES.md, twenty-second session), so a model moved to the CPU is no slower than torch.nn's.
On a GPU it is what torch.nn's layers run there, with torch's own settings (``torch.backends.cudnn``, its TF32 flag
included): cuDNN (MIOpen on ROCm in fp32 and fp16), or where torch does not give a dtype to those (bf16 with a cuDNN
older than 9.13, bf16 on ROCm) ATen's step loop in C++. A layer too large for the kernels costs what it costs in
torch.nn instead of the reference's few small kernels per step, each from Python. Only the recurrence is torch's (a
batch of lengths as a PackedSequence, which is the semantics of tritonrnn's lengths); what lies between layers (the
dropout masks, standard or variational, and the residual sums) stays tritonrnn's (``reference.layer_output``), so the
masks are the kernels'.
On the CPU half precision is computed in float32 and rounded back, as the reference and the kernels do; on a GPU in
the half dtype itself, as torch.nn's cuDNN layers compute it. cuDNN refuses sequences of more than 65,535 steps
(pytorch/pytorch#133751): on a GPU a longer one-way sequence runs in chunks, the state carried.

Where torch's op cannot serve, the reference runs (logged once on a GPU): under a torch.func transform (on CPU tensors
one other than grad and vjp, which the op has no batching rule for, or one begun inside torch.no_grad, or with a batch
of lengths; on a GPU any: cuDNN's op under functorch has not been run here), an empty sequence, a sequence of length
0, one bias without the other or directions of different layouts (torch's op takes both biases or neither, the same
in every direction), float64 on a GPU (a checking precision: the reference's backward can be differentiated again,
cuDNN's cannot), a batch of lengths while a CUDA graph is captured (packing reads the lengths on the host), and on a
GPU more than 65,535 steps in both directions or with lengths (no chunks there).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from tritonrnn import dropout as _dropout
from tritonrnn import reference
from tritonrnn._plan import capturing, log_once, transform_beyond_grad

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


# The longest sequence one call of torch's op takes, by device type (cuDNN's limit; MIOpen's is not known, so the
# same). Longer one-way sequences run in chunks.
MAX_STEPS_PER_CALL = {"cuda": 65535}


def _transform_in_the_way(device: torch.device, lengths: Tensor | None) -> str | None:
    """The torch.func transform torch's op cannot run under, or None: on CPU tensors any but grad's (vjp's too:
    autograd on wrapped tensors, which the CPU op takes; vmap, jacrev's included, needs a batching rule the op lacks),
    on a GPU any (cuDNN's op under functorch has not been run here)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return None
    if device.type != "cpu":
        return "a torch.func transform"
    if lengths is not None:
        # Packing makes batch_sizes a functorch-wrapped tensor, whose data the packed op reads.
        return "a torch.func transform with a batch of lengths"
    beyond = transform_beyond_grad()
    if beyond is not None:
        return f"{beyond}, a torch.func transform torch's op has no rule for"
    if not all(level.prev_grad_mode() for level in retrieve_all_functorch_interpreters()):
        # The transform runs the op below its level in the grad mode it began in: the CPU LSTM's oneDNN kernel then
        # keeps no workspace for the backward ("Expected a proper Tensor ... 'workspace'", torch 2.13).
        return "a torch.func grad begun inside torch.no_grad"
    return None


def _why_not(x: Tensor, weights: Sequence[reference.Weights], lengths: Tensor | None) -> str | None:
    """Why torch's op cannot run this layer (the reference runs it then), or None."""
    transform = _transform_in_the_way(x.device, lengths)
    if transform is not None:
        return transform
    if x.shape[0] == 0:
        return "an empty sequence"
    if compute_dtype(x.device, x.dtype) is None:
        return f"{x.dtype} on {x.device.type}"
    limit = MAX_STEPS_PER_CALL.get(x.device.type)
    if limit is not None and x.shape[0] > limit and (len(weights) > 1 or lengths is not None):
        return (
            f"more than {limit} steps (torch's op on {x.device.type} takes no more) in both directions or with lengths"
        )
    if lengths is not None and capturing(x.device):
        return "a batch of lengths during CUDA graph capture (packing reads the lengths on the host)"
    # torch's op reads one layout for every direction: both biases or neither, a projection or not.
    layouts = {(w[2] is not None, w[3] is not None, len(w) > 4 and w[4] is not None) for w in weights}
    (has_b_ih, has_b_hh, _), *other_layouts = layouts
    if other_layouts or has_b_ih != has_b_hh:
        return "one bias without the other, or directions of different layouts"
    if lengths is not None and not bool((lengths > 0).all()):
        return "a sequence of length 0"
    return None


def layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: Sequence[reference.Weights],
    residual: bool = False,
    dropout: _dropout.LayerDropout | None = None,
    lengths: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``reference.layer``'s contract (arguments and returns), the recurrence of all directions in one torch op."""
    why = _why_not(x, weights, lengths)
    if why is not None:
        # On a GPU this layer is a fallback already (logged with the kernels' reason), but not the one logged, unless
        # the dtype was the reason (the log named the reference then). CPU tensors take the reference by design.
        if x.device.type != "cpu" and compute_dtype(x.device, x.dtype) is not None:
            log_once(f"tritonrnn: a {cell} layer on {x.device.type} runs the reference instead of torch's op: {why}")
        return reference.layer(cell, x, h0, c0, weights, residual, dropout, lengths, mask)
    dtype = x.dtype
    cdt = compute_dtype(x.device, dtype)
    # torch's parameter list: per direction w_ih, w_hh, then b_ih, b_hh when present, then an LSTM's w_hr. Contiguous,
    # as cuDNN needs (it views each weight flat to copy it, and checks hx); on the CPU a no-op for the usual tensors.
    params = [w.to(cdt).contiguous() for direction in weights for w in direction if w is not None]
    has_biases = weights[0][2] is not None
    hx = (h0.to(cdt).contiguous(), c0.to(cdt).contiguous()) if cell == "lstm" else h0.to(cdt).contiguous()
    # Keep what backward needs only when there will be one (torch.nn passes its training flag here).
    options = (has_biases, 1, 0.0, torch.is_grad_enabled(), len(weights) == 2)
    if _FLATTEN_ADVICE_FILTER not in warnings.filters:
        _ignore_flatten_advice()
    out, states = _run(cell, x.to(cdt), hx, params, options, lengths)
    h_n = states[0].to(dtype)
    c_n = states[1].to(dtype) if cell == "lstm" else None
    return reference.layer_output(x, out.to(dtype), h_n, c_n, residual, dropout, lengths, mask)


def _run(cell, x, hx, params, options, lengths):
    """torch's op on time-major x (packed by ``lengths`` when given): the output [T, B, D*H] and the final states."""
    if lengths is None:
        limit = MAX_STEPS_PER_CALL.get(x.device.type) or len(x)
        outs = []
        for chunk in x.split(limit):  # several only for one direction: _why_not sends the others to the reference
            out, *states = _OPS[cell](chunk, hx, params, *options, False)
            hx = tuple(states) if cell == "lstm" else states[0]
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), states
    packed = pack_padded_sequence(x, lengths.to("cpu", torch.int64), enforce_sorted=False)
    order, restore = packed.sorted_indices, packed.unsorted_indices
    hx = tuple(s.index_select(1, order) for s in hx) if cell == "lstm" else hx.index_select(1, order)
    data, *states = _OPS[cell](packed.data, packed.batch_sizes, hx, params, *options)
    out = pad_packed_sequence(PackedSequence(data, packed.batch_sizes, order, restore), total_length=len(x))[0]
    return out, [s.index_select(1, restore) for s in states]
