"""Functional API: recurrent stacks on plain tensors (each layer through layer_op's tritonrnn::layer).

Each layer runs as: the input projection of all steps and directions as one GEMM, one persistent
kernel launch for the recurrence of both directions (kernels/recurrent.py), which also writes the
residual sum and the dropped-out input of the next layer; in backward one persistent reverse-time
launch followed by GEMMs and reductions over all steps for the input and weight gradients.
Weights are plain tensors, so weight dropout or any other transform is applied by the caller.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from tritonrnn import layer_op, native, reference, scheduler
from tritonrnn._plan import CELLS, capturing, interpret_mode, log_once, on_device, transform_beyond_grad
from tritonrnn.dropout import HeldMasks, LayerDropout, check_mode
from tritonrnn.fused_stack import fused_stack
from tritonrnn.layer_op import kernel_plan
from tritonrnn.layer_run import _variant
from tritonrnn.wavefront import WavefrontStackFunction, wavefront_chunk, wavefront_setting


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast gives recurrent layers on x's device, or None (autocast off; x float64 or integer).

    torch.nn's cuDNN layers under CUDA autocast cast to float16 whatever dtype autocast was given (ATen's
    cudnn/AutocastRNN.cpp); tritonrnn runs in the dtype autocast was given, float16 or bfloat16.
    """
    kind = x.device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    if not x.is_floating_point() or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(kind)


def autocast_cast(t, dtype: torch.dtype):
    """A tensor (or a tuple or list of them) in ``dtype`` where torch.autocast would cast it: floating, not float64."""
    if isinstance(t, (tuple, list)):
        return type(t)(autocast_cast(u, dtype) for u in t)
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: Sequence[reference.Weights],
    residual: bool = False,
    dropout: LayerDropout | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """One layer on the kernels, or where they cannot run it on torch's own op (tritonrnn/native.py: CPU tensors
    without the interpreter, and layers the kernels cannot hold), ``reference.layer``'s contract."""
    if torch.onnx.is_in_onnx_export():
        # torch.onnx.export records torch's RNN op, which ONNX has (LSTM, GRU; a vanilla RNN as MatMul and its
        # activation); it has no tritonrnn::layer.
        return native.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
    D = len(weights)
    w_hr = [w[4] if len(w) > 4 else None for w in weights]
    plan = None
    if not torch.compiler.is_compiling() and not layer_op.without_data(x):
        # Where the kernels cannot run it, torch's own op (or where that cannot, the reference) under autograd:
        # tritonrnn::layer, which a traced graph calls, would run the reference again for the backward.
        if x.device.type == "cpu" and not interpret_mode():
            return native.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
        transform = transform_beyond_grad()
        if transform is not None:
            log_once(f"tritonrnn: a {cell} layer under {transform} runs the reference (the kernels and torch's RNN op "
                     "have no rule for it)")  # fmt: skip
            return reference.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
        # _variant reads the projection's width from the stacked [D, N, H] form (not one direction's [N, H]).
        variant = _variant(D, residual, dropout, w_hr[0][None] if w_hr[0] is not None else None, lengths)
        plan = layer_op.plan_or_reason(cell, x, weights[0][1], variant)
        if isinstance(plan, str):
            return native.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
    w_ih, w_hh, b_ih, b_hh = (list(t) for t in zip(*(w[:4] for w in weights)))
    if D == 1:
        # No copies for one direction: views of the caller's tensors.
        w_ih, w_hh, b_ih, b_hh, w_hr = w_ih[0], w_hh[0].unsqueeze(0), b_ih[0], b_hh[0], w_hr[0]
        w_hr = w_hr.unsqueeze(0) if w_hr is not None else None
    else:
        w_ih, w_hh = torch.cat(w_ih), torch.stack(w_hh)
        b_ih = torch.cat(b_ih) if b_ih[0] is not None else None
        b_hh = torch.cat(b_hh) if b_hh[0] is not None else None
        w_hr = torch.stack(w_hr) if w_hr[0] is not None else None
    return layer_op.run_layer(
        cell, x.contiguous(), h0.contiguous(), c0.contiguous() if c0 is not None else None, w_ih.contiguous(),
        w_hh.contiguous(), b_ih, b_hh, w_hr.contiguous() if w_hr is not None else None, residual, dropout, lengths,
        plan,
    )  # fmt: skip


def _wavefront_stack(x, layers, h0, c0, residual, lengths, dropouts):
    """The stack through WavefrontStackFunction, or None where it does not apply (then layer by layer). Never under
    torch.compile (the caller's rule): streams and events are not traced."""
    chunk = wavefront_chunk()
    if not chunk or len(layers) < 2 or x.shape[0] <= chunk or any(len(layer.weights) != 1 for layer in layers):
        return None
    if x.device.type == "cpu" and not interpret_mode():
        return None
    specs, tensors = [], []
    for layer, drop, h, c in zip(layers, dropouts, h0, c0):
        w_ih, w_hh, b_ih, b_hh, *rest = layer.weights[0]
        hidden = w_hh.shape[0] // CELLS[layer.cell][1]
        w_hr = rest[0].unsqueeze(0).contiguous() if rest else None
        variant = _variant(1, residual, drop, w_hr, lengths)
        # The layers' grids run at once on their streams: each keeps to its one group of SMs.
        plan = kernel_plan(layer.cell, hidden, x.shape[1], x.dtype, x.device, variant, one_group=True)
        if isinstance(plan, str):
            return None
        specs.append((layer.cell, plan, residual, drop))
        tensors += [h.contiguous(), c.contiguous() if c is not None else None, w_ih.contiguous(),
                    w_hh.unsqueeze(0).contiguous(), b_ih, b_hh, w_hr]  # fmt: skip
    outputs = WavefrontStackFunction.apply(specs, chunk, lengths, x.contiguous(), *tensors)
    L = len(layers)
    return list(outputs[:L]), list(outputs[L : 2 * L]), list(outputs[2 * L :])


def stack(
    x: Tensor,
    layers: Sequence[scheduler.StackLayer],
    h0: Sequence[Tensor],
    c0: Sequence[Tensor | None],
    *,
    dropout: float = 0.0,
    dropout_mode: str = "standard",
    residual: bool = False,
    training: bool = False,
    lengths: Tensor | None = None,
    held_masks: HeldMasks | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """A stack of layers (any cells, one or two directions) on the kernels, on plain tensors.

    Arguments and returns are ``scheduler.run_stack``'s:
    x [T, B, I] time-major; h0[l] [D, B, P_l], c0[l] [D, B, H_l] (c0[l] None for non-LSTM layers);
    layers[l] = StackLayer(cell, ((w_ih, w_hh, b_ih, b_hh[, w_hr]), ...)) in torch.nn's layout and gate order, one
    tuple per direction, biases both or neither (w_hr: an LSTM's projection, torch.nn's weight_hr [P_l, H_l]; h is then
    P_l wide, else P_l = H_l).
    lengths: [B] integers in [0, T], each sequence's length, for a batch of different lengths: rows keep their state
    past their end (so h_n is each sequence's last state) and output zeros there.
    held_masks: a ``dropout.HeldMasks`` shared by the calls that run one batch of sequences in chunks (truncated
    BPTT): variational dropout keeps the masks of the first call (``tritonrnn.hold_dropout_masks`` for modules).
    Returns (every layer's output [T, B, D*P_l], h_n per layer, c_n per layer).

    Every argument is checked against the others (the kernels would read tensors of other shapes out of bounds):
    a clear error names what does not fit. The modules check their own arguments and call ``stack_unchecked``.
    """
    lengths = check_stack_arguments(x, layers, h0, c0, dropout, dropout_mode, lengths, held_masks, residual)
    return stack_unchecked(
        x, layers, h0, c0, dropout=dropout, dropout_mode=dropout_mode, residual=residual, training=training,
        lengths=lengths, held_masks=held_masks,
    )  # fmt: skip


def _require(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    if not condition:
        raise error(f"functional.stack: {message}")


def check_stack_arguments(x, layers, h0, c0, dropout, dropout_mode, lengths, held_masks, residual) -> Tensor | None:
    """functional.stack's arguments against each other; returns lengths as the kernels read them (int32, contiguous,
    on x's device)."""
    _require(isinstance(x, Tensor), f"x should be a Tensor, got {type(x).__name__}", TypeError)
    _require(x.dim() == 3, f"x should be [T, B, I] (time-major), got {x.dim()}-D")
    _require(x.layout == torch.strided, f"x should be a dense tensor, got layout {x.layout}", RuntimeError)
    _require(x.dtype.is_floating_point, f"x should be floating point, got {x.dtype}", TypeError)
    _require(x.shape[0] > 0, "expected sequence length to be larger than 0", RuntimeError)
    T, B = x.shape[:2]
    _require(isinstance(layers, Sequence) and len(layers) > 0, "layers should be a non-empty list of StackLayer")
    for name, states in (("h0", h0), ("c0", c0)):
        _require(isinstance(states, Sequence), f"{name} should be a list, one entry per layer", TypeError)
        _require(len(states) == len(layers), f"{name} has {len(states)} entries for {len(layers)} layers")
    _require(
        isinstance(dropout, numbers.Real) and not isinstance(dropout, bool) and 0 <= dropout <= 1,
        f"dropout should be a number in [0, 1], got {dropout!r}",
    )
    check_mode(dropout_mode)
    _require(
        held_masks is None or isinstance(held_masks, HeldMasks),
        f"held_masks should be a tritonrnn.dropout.HeldMasks, got {type(held_masks).__name__}",
        TypeError,
    )
    directions = None
    width = x.shape[2]
    for index, layer in enumerate(layers):
        where = f"layers[{index}]"
        _require(
            isinstance(layer, tuple) and len(layer) == 2, f"{where} should be a StackLayer(cell, weights)", TypeError
        )
        cell, weights = layer
        _require(cell in CELLS, f"{where}: unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        gates = CELLS[cell][1]
        _require(isinstance(weights, Sequence), f"{where}: weights should be a tuple per direction", TypeError)
        _require(len(weights) in (1, 2), f"{where}: one weight tuple per direction (1 or 2), got {len(weights)}")
        directions = directions or len(weights)
        _require(len(weights) == directions, f"{where} has {len(weights)} direction(s), layers[0] {directions}")
        first = weights[0]
        _require(
            isinstance(first, Sequence) and len(first) in (4, 5) and isinstance(first[1], Tensor),
            f"{where}: each direction is (w_ih, w_hh, b_ih, b_hh[, w_hr])",
            TypeError,
        )
        hidden = first[1].shape[0] // gates
        with_bias = first[2] is not None
        proj = first[4].shape[0] if len(first) == 5 and isinstance(first[4], Tensor) else 0
        out = proj or hidden
        _require(
            hidden > 0 and first[1].shape[0] == gates * hidden,
            f"{where}: w_hh has {first[1].shape[0]} rows, not a multiple of a {cell}'s {gates} gates",
        )
        _require(
            len(first) == 4 or first[4] is None or 0 < proj < hidden,
            f"{where}: w_hr has {proj} rows; a projection has 1 to hidden_size - 1 ({hidden - 1}), as torch.nn's",
        )
        for d, w in enumerate(weights):
            at = f"{where}, direction {d}"
            _require(
                isinstance(w, Sequence) and len(w) == len(first),
                f"{at}: {len(first)} weights as in direction 0",
                TypeError,
            )
            _require(len(w) == 4 or cell == "lstm", f"{at}: a w_hr (projection) is for LSTM layers only, not {cell}")
            _require((w[2] is None) == (w[3] is None), f"{at}: give both biases b_ih and b_hh, or neither")
            _require((w[2] is not None) == with_bias, f"{at}: biases in one direction only")
            _require((len(w) == 5 and w[4] is not None) == (proj > 0), f"{at}: a w_hr in one direction only")
            shapes = {
                "w_ih": (gates * hidden, width),
                "w_hh": (gates * hidden, out),
                "b_ih": (gates * hidden,),
                "b_hh": (gates * hidden,),
                "w_hr": (proj, hidden),
            }
            for name, tensor in zip(shapes, w):
                if tensor is None and name in ("b_ih", "b_hh", "w_hr"):
                    continue
                _require(isinstance(tensor, Tensor), f"{at}: {name} should be a Tensor", TypeError)
                _require(
                    tuple(tensor.shape) == shapes[name],
                    f"{at}: {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}",
                    RuntimeError,
                )
                _require(tensor.dtype == x.dtype, f"{at}: {name} is {tensor.dtype}, x is {x.dtype}", TypeError)
                _require(
                    tensor.device == x.device, f"{at}: {name} is on {tensor.device}, x on {x.device}", RuntimeError
                )
        if residual:
            _require(
                width == directions * out,
                f"residual=True: {where} reads {width} features but outputs {directions * out}",
            )
        for name, state, size in (("h0", h0[index], out), ("c0", c0[index], hidden)):
            if name == "c0" and cell != "lstm":
                _require(state is None, f"c0[{index}] should be None: layer {index} is {cell}, not an LSTM")
                continue
            _require(isinstance(state, Tensor), f"{name}[{index}] should be a Tensor", TypeError)
            _require(
                tuple(state.shape) == (directions, B, size),
                f"{name}[{index}] has shape {tuple(state.shape)}, expected {(directions, B, size)}",
                RuntimeError,
            )
            _require(
                state.dtype == x.dtype and state.device == x.device,
                f"{name}[{index}] is {state.dtype} on {state.device}, x {x.dtype} on {x.device}",
                RuntimeError,
            )
        width = directions * out
    if lengths is None:
        return None
    _require(isinstance(lengths, Tensor), f"lengths should be a Tensor, got {type(lengths).__name__}", TypeError)
    _require(
        not lengths.is_floating_point() and not lengths.is_complex() and lengths.dtype != torch.bool,
        f"lengths should be integers, got {lengths.dtype}",
        TypeError,
    )
    _require(tuple(lengths.shape) == (B,), f"lengths has shape {tuple(lengths.shape)}, expected ({B},)")
    lengths = lengths.to(device=x.device, dtype=torch.int32).contiguous()
    if B > 0 and not torch.compiler.is_compiling() and not capturing(x.device):
        # One wait for the device: a length beyond T would send the reverse direction past the end of x.
        low, high = (int(v) for v in torch.aminmax(lengths))
        _require(0 <= low and high <= T, f"lengths should be in [0, T={T}], got values in [{low}, {high}]")
    return lengths


def stack_unchecked(
    x: Tensor,
    layers: Sequence[scheduler.StackLayer],
    h0: Sequence[Tensor],
    c0: Sequence[Tensor | None],
    *,
    dropout: float = 0.0,
    dropout_mode: str = "standard",
    residual: bool = False,
    training: bool = False,
    lengths: Tensor | None = None,
    held_masks: HeldMasks | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """``stack`` without its checks, for callers that check their own (the modules)."""
    if torch.jit.is_tracing():
        raise NotImplementedError(
            "tritonrnn: torch.jit.trace cannot record StackedRNN or functional.stack (a trace would fix the sequence "
            "length and the launch plan); use torch.export.export, which records each layer as one tritonrnn::layer "
            "operator and takes a dynamic sequence length"
        )
    # The tensors come in the dtype to run (the modules cast them under autocast): autocast off inside, so that the
    # stack's GEMMs are not recast, as torch.nn's cuDNN call runs.
    with _autocast_off(x.device):
        if torch.compiler.is_compiling():
            # Traced: the graph's device, no device switch.
            return _stack(x, layers, h0, c0, dropout, dropout_mode, residual, training, lengths, held_masks)
        # x's device current for everything the stack asks of CUDA (tuning, capture checks, launches).
        with on_device(x.device):
            return _stack(x, layers, h0, c0, dropout, dropout_mode, residual, training, lengths, held_masks)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _stack(x, layers, h0, c0, dropout, dropout_mode, residual, training, lengths, held_masks):
    # Drawn once, whichever path runs: the same seeds with and without the wavefront.
    dropouts = scheduler.layer_dropouts(
        len(layers), dropout, dropout_mode, training, x.device, x.shape[1], held_masks
    )  # fmt: skip
    if x.shape[1] == 0:
        # No sequences: nothing for the kernels to do (their grids and GEMMs would be empty); the reference returns
        # the empty outputs and states, and their empty gradients.
        log_once("tritonrnn: a batch of 0 sequences runs on the reference implementation")
        return scheduler.run_stack(x, layers, h0, c0, residual=residual, lengths=lengths, dropouts=dropouts)
    result = None
    # Compiled, and under a torch.func transform (grad, jacrev, ...), layer by layer: the stack-wide autograd
    # functions are not traced and have no functorch rules; the single layer's op has both (layer_op).
    if (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
        and not layer_op.without_data(x)
    ):
        if wavefront_setting() == "fused":
            result = fused_stack(x, layers, h0, c0, residual, lengths, dropouts)
        if result is None:
            result = _wavefront_stack(x, layers, h0, c0, residual, lengths, dropouts)
    if result is not None:
        return result
    return scheduler.run_stack(
        x, layers, h0, c0, residual=residual, lengths=lengths, dropouts=dropouts, layer_fn=_layer
    )  # fmt: skip
