"""Drop-in replacements for torch.nn.LSTM, GRU and RNN.

They subclass the torch.nn modules, so constructor, parameter names, initialisation, state_dict,
``flatten_parameters`` and ``isinstance`` checks are torch.nn's own; only ``forward`` changes, plus
one keyword: ``dropout_mode`` ("standard", torch's, or "variational": one mask per sequence and unit).
Packed sequences run on the kernels with each sequence's length. Under torch.autocast the kernels run in
autocast's dtype (input, states and weights cast to it, as torch.nn casts them for cuDNN; the parameters get
their gradients through the cast). What the kernels cannot hold (sizes too large for the GPU) goes to torch.nn's
implementation, logged once; with variational dropout in training (which torch.nn has not), each layer goes to torch's
own RNN op between tritonrnn's masks (tritonrnn/native.py).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_leaves

from tritonrnn import dropout as _dropout
from tritonrnn import functional
from tritonrnn._plan import capturing, interpret_mode, log_once, on_device
from tritonrnn.layer_run import Variant
from tritonrnn.scheduler import StackLayer


def unpack(packed: PackedSequence) -> tuple[Tensor, Tensor]:
    """A PackedSequence as a padded time-major batch in its original order, and the lengths (int32, on its device)."""
    if capturing(packed.data.device):
        # pad_packed_sequence and the lengths' copy wait for the device, which a capture forbids (a cryptic CUDA
        # error otherwise).
        raise RuntimeError(
            "tritonrnn: a PackedSequence input cannot be captured in a CUDA graph: unpacking it reads its lengths on "
            "the host; capture a padded batch instead"
        )
    padded, lengths = pad_packed_sequence(packed)
    return padded, lengths.to(device=padded.device, dtype=torch.int32)


def repack(out: Tensor, like: PackedSequence) -> PackedSequence:
    """A padded time-major output [T, B, F] (original batch order) packed in the layout of ``like``."""
    if like.sorted_indices is not None:
        out = out.index_select(1, like.sorted_indices.to(out.device))
    present = torch.arange(out.size(1))[None, :] < like.batch_sizes[:, None]  # [T, B]: packed order is time-major
    return PackedSequence(out[present.to(out.device)], like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def refuse_script(module: nn.Module, alternatives: str = "torch.export or torch.jit.trace") -> None:
    """torch.jit.script calls this on every module it compiles: a clear error instead of TorchScript's failure
    somewhere inside tritonrnn's Python, naming what does work for this module."""
    raise RuntimeError(
        f"torch.jit.script does not support tritonrnn's {type(module).__name__}: TorchScript cannot compile its "
        f"Triton kernels' host code (and is deprecated); use {alternatives}"
    )


def fx_proxy_of_the_call(module: nn.Module, *args, **kwargs) -> torch.fx.Proxy | None:
    """Under torch.fx.symbolic_trace (an argument is a Proxy): the call as one ``call_module`` node, which the traced
    GraphModule runs by calling the module. torch.fx records torch.nn's modules so, as leaves; ours live outside
    torch.nn, so the tracer would run their forward on Proxies, whose Python it cannot follow. Else None."""
    if not is_fx_symbolic_tracing():  # a flag: nothing more on the path of every call
        return None
    proxies = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.fx.Proxy)]
    if not proxies:
        return None
    tracer = proxies[0].tracer
    if module is tracer.root:
        return None  # the module traced itself: torch.fx fails on its forward, as on torch.nn's
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def check_weight(what: str, weight: Tensor | None, shape: tuple[int, ...], sizes: str) -> None:
    """A weight against the shape its module's options call for (``sizes`` names them): the kernels would read a
    weight of another shape with the wrong sizes."""
    if weight is None:
        raise TypeError(f"{what} is None; expected a tensor")
    if weight.shape != shape:
        raise RuntimeError(f"{what} has shape {tuple(weight.shape)}, expected {shape} for {sizes}")


def _parameter_shapes(*options) -> dict[str, tuple[int, ...]]:
    """torch.nn's parameters of a module built with these options (mode, input_size, hidden_size, proj_size,
    num_layers, bias, bidirectional), in its order (``_flat_weights_names``): their shapes. Kept per options in a
    plain dict (torch.compile warns on an lru_cache it traces through)."""
    shapes = _PARAMETER_SHAPES.get(options)
    if shapes is None:
        shapes = _PARAMETER_SHAPES[options] = _shapes_of(*options)
    return shapes


_PARAMETER_SHAPES: dict[tuple, dict[str, tuple[int, ...]]] = {}


def _shapes_of(
    mode: str, input_size: int, hidden_size: int, proj_size: int, num_layers: int, bias: bool, bidirectional: bool
) -> dict[str, tuple[int, ...]]:
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1) * hidden_size
    width = proj_size or hidden_size
    directions = 2 if bidirectional else 1
    shapes = {}
    for k in range(num_layers):
        for suffix in ("", "_reverse")[:directions]:
            shapes[f"weight_ih_l{k}{suffix}"] = (gates, input_size if k == 0 else directions * width)
            shapes[f"weight_hh_l{k}{suffix}"] = (gates, width)
            if bias:
                shapes[f"bias_ih_l{k}{suffix}"] = shapes[f"bias_hh_l{k}{suffix}"] = (gates,)
            if proj_size > 0:
                shapes[f"weight_hr_l{k}{suffix}"] = (proj_size, hidden_size)
    return shapes


def type_name(value) -> str:
    """``int``, ``numpy.bool``: a type named as torch's argument errors name it."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _modes_of(module: nn.RNNBase) -> tuple[str, ...]:
    """The modes torch.nn's class of ``module`` runs (its forward reads ``mode`` only to choose RNN's nonlinearity)."""
    if isinstance(module, nn.LSTM):
        return ("LSTM",)
    if isinstance(module, nn.GRU):
        return ("GRU",)
    return ("RNN_TANH", "RNN_RELU")


class _TritonRNNBase(nn.RNNBase):
    """forward() on tritonrnn's kernels; everything else inherited from torch.nn."""

    def __init__(self, *args, dropout_mode: str = "standard", **kwargs):
        super().__init__(*args, **kwargs)
        # torch.nn has validated dropout itself (it allows p = 1, which zeroes the inputs of upper layers).
        _dropout.check_mode(dropout_mode)
        self.dropout_mode = dropout_mode

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.dropout_mode == "standard" else f"{text}, dropout_mode={self.dropout_mode!r}"

    def __prepare_scriptable__(self):
        refuse_script(self)

    def _unsupported(self, input, dtype: torch.dtype | None = None) -> str | None:
        """Why torch.nn's implementation has to run this call: the kernels cannot run this layer configuration here
        (too large for the GPU, in ``dtype`` under autocast), or torch.jit.trace records the call; or None.

        torch.nn runs cuDNN, on its flattened weights (in fp16 and fp32). Not handed over: variational dropout
        (torch.nn has none; each layer then runs torch's own op between tritonrnn's masks, tritonrnn/native.py) and
        float64 (a checking precision, which keeps tritonrnn's dropout masks: on a GPU the reference runs it).
        """
        if torch.compiler.is_compiling():
            return None  # no compiles and timings inside a traced graph; tritonrnn::layer falls back inside
        variational = self.training and self.dropout > 0 and self.dropout_mode == "variational"
        if torch.jit.is_tracing():
            # torch.jit.trace records torch.nn's one operator per module, valid at any length; a trace of the kernels
            # or of the reference's loop would not be, and torch.nn's operator has no variational dropout.
            if variational:
                raise NotImplementedError(
                    f"tritonrnn: torch.jit.trace cannot record {type(self).__name__} in training with "
                    "dropout_mode='variational' (a trace records torch.nn's operator, which has no variational "
                    "dropout); trace the module in eval mode, or use torch.export.export"
                )
            return "a call traced by torch.jit.trace"
        batch = None
        if isinstance(input, PackedSequence):
            input, batch = input.data, int(input.batch_sizes[0])
        if not isinstance(input, Tensor) or input.dim() not in (2, 3) or input.dtype == torch.float64:
            return None
        dtype = dtype or input.dtype
        if not (input.device.type == "cuda" or (input.device.type == "cpu" and interpret_mode())):
            return None
        if variational:
            return None
        if batch is None:
            batch = input.size(0 if self.batch_first else 1) if input.dim() == 3 else 1
        variant = Variant(directions=2 if self.bidirectional else 1, proj=self.proj_size)
        # The input's device current: this is the layer's first plan, where it is tuned (timed on the current
        # device) and compiled to check that it fits (for the current device's architecture).
        with on_device(input.device):
            plan = functional.kernel_plan(self.mode.lower(), self.hidden_size, batch, dtype, input.device, variant)
        return f"hidden_size={self.hidden_size} in {dtype}: {plan}" if isinstance(plan, str) else None

    def _check_devices(self, input: Tensor, hidden: tuple[Tensor, ...]) -> None:
        for weight in self._flat_weights:  # every one: a weight reassigned by the user can sit anywhere
            if input.device != weight.device:
                raise RuntimeError(
                    f"Input and parameter tensors are not at the same device, found input tensor at {input.device} "
                    f"and parameter tensor at {weight.device}"
                )
        for h in hidden:
            if h.device != input.device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor at {input.device} "
                    f"and hidden tensor at {h.device}"
                )
            if h.dtype != input.dtype:
                raise RuntimeError(f"hidden state dtype ({h.dtype}) does not match input dtype ({input.dtype})")

    def _check_attributes(self) -> None:
        """What forward reads from attributes a user can set after construction, checked at every call: the
        dropout_mode, and the parameters against the sizes and options (a layer count, bias, direction or size
        changed, a weight reassigned with another shape or None): the kernels would read them with the wrong sizes.
        The options' types as torch.nn's op checks them (a float size would pass the shape check, 4.0 == 4)."""
        _dropout.check_mode(self.dropout_mode)
        # One test of the usual types first (the loop below costs microseconds a call); the loop names what differs.
        usual = type(self.input_size) is type(self.hidden_size) is type(self.num_layers) is type(self.proj_size) is int
        if not (usual and type(self.bias) is type(self.bidirectional) is bool and type(self.dropout) in (float, int)):
            self._check_option_types()
        name, modes = type(self).__name__, _modes_of(self)
        if self.mode not in modes:
            raise ValueError(f"{name}: mode must be {' or '.join(modes)}, got {self.mode!r}")
        expected = _parameter_shapes(
            self.mode, self.input_size, self.hidden_size, self.proj_size, self.num_layers, self.bias, self.bidirectional
        )  # fmt: skip
        if tuple(expected) != tuple(self._flat_weights_names):
            raise RuntimeError(
                f"{name}: num_layers={self.num_layers}, bias={self.bias}, bidirectional={self.bidirectional} and "
                f"proj_size={self.proj_size} call for the parameters {list(expected)}, the module has "
                f"{list(self._flat_weights_names)}; these options are fixed when the module is built"
            )
        sizes = f"input_size={self.input_size}, hidden_size={self.hidden_size}, proj_size={self.proj_size}"
        for (key, shape), weight in zip(expected.items(), self._flat_weights):
            check_weight(f"{name}: parameter {key}", weight, shape, sizes)

    def _check_option_types(self) -> None:
        """The options' types as torch.nn's op takes them (numpy integers and a tensor dropout too)."""
        name = type(self).__name__
        for option in ("input_size", "hidden_size", "num_layers", "proj_size"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: {option} should be of type int, got: {type_name(value)}")
        for option in ("bias", "bidirectional"):
            if type(getattr(self, option)) is not bool:  # torch.nn's op refuses a truthy 1 or numpy bool too
                raise TypeError(f"{name}: {option} should be of type bool, got: {type_name(getattr(self, option))}")
        if not isinstance(self.dropout, (numbers.Real, Tensor)):  # read before the probability's own check
            raise TypeError(f"{name}: dropout should be a number, got {self.dropout!r}")

    def _check_dropout(self) -> None:
        """torch.nn's op checks the probability where it applies it: in training, between layers, after the input's
        checks."""
        p = self.dropout
        if self.training and self.num_layers > 1 and p != 0 and not 0 <= p <= 1:
            raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")

    def _check_dtypes(self, dtype: torch.dtype) -> None:
        """Input and every parameter in one dtype, where nothing casts them (a reassigned weight may differ)."""
        first = self._flat_weights[0].dtype
        if dtype != first:
            raise ValueError(
                f"RNN input dtype ({dtype}) does not match weight dtype ({first}). Convert input: "
                f"input.to({first}), or convert model: model.to({dtype})"
            )
        for name, weight in zip(self._flat_weights_names, self._flat_weights):
            if weight.dtype != first:
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {name} is {weight.dtype} but {self._flat_weights_names[0]} is "
                    f"{first}; the parameters must share one dtype (convert the module: model.to(dtype))"
                )

    def _layers(self, dtype: torch.dtype | None = None) -> list[StackLayer]:
        """The stack as the scheduler takes it: per layer, one weight tuple per direction (cast to ``dtype``)."""
        cell = self.mode.lower()
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        names += ["weight_hr"] if self.proj_size > 0 else []
        # The tensors forward's _update_flat_weights just read, as torch.nn's forward uses them: a parametrized weight
        # (weight_norm, spectral_norm) is computed once per call, and spectral_norm's power iteration steps once.
        flat = dict(zip(self._flat_weights_names, self._flat_weights))
        layers = []
        for k in range(self.num_layers):
            directions = []
            for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                weights = [flat[f"{name}_l{k}{suffix}"] for name in names]
                if dtype is not None:
                    weights = [w.to(dtype) for w in weights]
                if not self.bias:
                    weights[2:2] = [None, None]
                directions.append(tuple(weights))
            layers.append(StackLayer(cell, tuple(directions)))
        return layers

    def forward(self, input, hx=None):  # noqa: A002 - torch.nn's argument name
        traced = fx_proxy_of_the_call(self, input, hx)
        if traced is not None:
            return traced
        # First, as torch.nn does: parameters replaced since the last call (functional_call, fx) are read fresh.
        self._update_flat_weights()
        self._check_attributes()
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(input, PackedSequence) and isinstance(input, Tensor) and input.dim() not in (2, 3):
            # torch.nn's first check, before the dtypes'
            noun = "" if self.mode in ("LSTM", "GRU") else " tensor"
            name = self.mode if noun == "" else "RNN"
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{noun} instead")
        if isinstance(data, Tensor) and data.layout != torch.strided:
            raise RuntimeError(f"{type(self).__name__}: expected a dense input tensor, got layout {data.layout}")
        dtype = functional.autocast_dtype(data) if isinstance(data, Tensor) else None
        if (
            dtype is not None
            and data.device.type == "cpu"
            and (
                self.mode == "GRU" or (self.mode == "LSTM" and isinstance(input, PackedSequence) and not self.proj_size)
            )
        ):
            # CPU autocast does not cast torch.nn's GRU nor its LSTM on packed input without projections (its LSTM and
            # RNN otherwise take autocast's dtype): these run in the input's dtype, the weights cast to it where theirs
            # differs. (Its LSTM with projections runs ATen's composite cells, whose c stays in the input's dtype:
            # c_n float32 where ours comes out in autocast's dtype, as on a GPU.)
            dtype = None if data.dtype == self._flat_weights[0].dtype else data.dtype
        reason = self._unsupported(input, dtype)
        if reason is not None:
            log_once(f"tritonrnn.{type(self).__name__}: {reason} runs on torch.nn's implementation")
            return super().forward(input, hx)
        if dtype is not None:
            # torch.autocast: like torch.nn's cuDNN layers, input and states (and, in _run, the weights) in the
            # autocast dtype; the outputs come out in it.
            input, hx = input.to(dtype), functional.autocast_cast(hx, dtype)
        elif isinstance(data, Tensor):
            # torch.nn's check_input skips this test whenever autocast is on, for the cast its cuDNN layers make; a
            # tensor autocast leaves alone (float64) meets weights of another dtype: torch's error, not a GEMM's.
            self._check_dtypes(data.dtype)
        is_lstm = self.mode == "LSTM"
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, is_lstm, autocast=dtype is not None)
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        batch = input.size(batch_dim)
        hidden = self._zero_hidden(input, batch, is_lstm) if hx is None else self._hidden_tuple(hx, is_lstm, is_batched)
        self.check_forward_args(input, hidden if is_lstm else hidden[0], None)
        self._check_devices(input, hidden)
        if input.size(1 - batch_dim) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        self._check_dropout()

        x = input.transpose(0, 1) if self.batch_first else input
        out, h_n, c_n = self._run(x, hidden, is_lstm, autocast=dtype is not None)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not is_batched:
            out = out.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return out, ((h_n, c_n) if is_lstm else h_n)

    def _zero_hidden(self, input: Tensor, batch: int, is_lstm: bool) -> tuple[Tensor, ...]:
        shape = (self.num_layers * (2 if self.bidirectional else 1), batch)
        h0 = torch.zeros(*shape, self.proj_size or self.hidden_size, dtype=input.dtype, device=input.device)
        c0 = torch.zeros(*shape, self.hidden_size, dtype=input.dtype, device=input.device)
        return (h0, c0) if is_lstm else (h0,)

    def _run(self, x: Tensor, hidden: tuple[Tensor, ...], is_lstm: bool, lengths: Tensor | None = None, autocast=False):
        """The stack on time-major x: (output of the top layer, h_n, c_n or None). ``autocast``: x is already in the
        autocast dtype, and the weights are cast to it (functional.stack runs with autocast off)."""
        directions = 2 if self.bidirectional else 1
        h0 = hidden[0].split(directions)
        c0 = hidden[1].split(directions) if is_lstm else [None] * self.num_layers
        ys, h_n, c_n = functional.stack_unchecked(
            x, self._layers(x.dtype if autocast else None), h0, c0, dropout=self.dropout,
            dropout_mode=self.dropout_mode, training=self.training, lengths=lengths,
            held_masks=getattr(self, "_held_masks", None),  # set by tritonrnn.hold_dropout_masks
        )  # fmt: skip
        # One layer's states are its own outputs already: no copy.
        cat = (lambda states: states[0]) if self.num_layers == 1 else torch.cat
        return ys[-1], cat(h_n), (cat(c_n) if is_lstm else None)

    def _forward_packed(self, packed: PackedSequence, hx, is_lstm: bool, autocast: bool):
        """A PackedSequence: padded, run with each sequence's length (rows keep their state past their end), packed
        again in the input's own layout. States are in the batch's original order, as torch.nn's."""
        data, batch_sizes = packed.data, packed.batch_sizes
        hidden = self._zero_hidden(data, int(batch_sizes[0]), is_lstm) if hx is None else self._hidden_tuple(
            hx, is_lstm, True
        )  # fmt: skip
        self.check_forward_args(data, hidden if is_lstm else hidden[0], batch_sizes)
        self._check_devices(data, hidden)
        self._check_dropout()
        padded, lengths = unpack(packed)
        out, h_n, c_n = self._run(padded, hidden, is_lstm, lengths, autocast)
        return repack(out, packed), ((h_n, c_n) if is_lstm else h_n)

    def _hidden_tuple(self, hx, is_lstm: bool, is_batched: bool) -> tuple[Tensor, ...]:
        """hx as a tuple of [L, B, H] tensors, with torch.nn's errors for the wrong structure."""
        if is_lstm:
            if isinstance(hx, Tensor) and not is_batched and hx.dim() == 3 and hx.size(0) == 2:
                hx = tuple(hx.unbind(0))  # torch.nn takes hx[0], hx[1] of unbatched states stacked in one tensor
            if not isinstance(hx, (tuple, list)):
                raise TypeError("LSTM: hx must be a tuple (h_0, c_0) of tensors")
            if len(hx) != 2:
                raise RuntimeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {len(hx)}")
            hidden = tuple(hx)
            dims = f"({hidden[0].dim()}-D, {hidden[1].dim()}-D) tensors"
            if is_batched and (hidden[0].dim() != 3 or hidden[1].dim() != 3):
                raise RuntimeError(f"For batched 3-D input, hx and cx should also be 3-D but got {dims}")
            if not is_batched and (hidden[0].dim() != 2 or hidden[1].dim() != 2):
                raise RuntimeError(f"For unbatched 2-D input, hx and cx should also be 2-D but got {dims}")
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{type(self).__name__}: hx must be a tensor")
            hidden = (hx,)
            if is_batched and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            if not is_batched and hx.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
        if not is_batched:
            hidden = tuple(h.unsqueeze(1) for h in hidden)
        return hidden


class LSTM(_TritonRNNBase, nn.LSTM):
    """torch.nn.LSTM on tritonrnn's kernels (same arguments, parameters and returns)."""


class GRU(_TritonRNNBase, nn.GRU):
    """torch.nn.GRU on tritonrnn's kernels (same arguments, parameters and returns)."""


class RNN(_TritonRNNBase, nn.RNN):
    """torch.nn.RNN (nonlinearity "tanh" or "relu") on tritonrnn's kernels."""
