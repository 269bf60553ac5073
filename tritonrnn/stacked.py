"""StackedRNN: a deep recurrent stack of any cells, mixed, with the regularisers deep stacks need.

Parameters (state_dict keys), for layer k and direction suffix "" (forward) or "_reverse":
``layers.{k}.weight_ih{suffix}`` [G*H, I], ``layers.{k}.weight_hh{suffix}`` [G*H, H],
``layers.{k}.bias_ih{suffix}``, ``layers.{k}.bias_hh{suffix}`` [G*H]: torch.nn's layout and gate
order (LSTM i, f, g, o; GRU r, z, n), so ``weight_ih_l{k}`` of a torch.nn module loads as
``layers.{k}.weight_ih`` unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from tritonrnn import dropout as _dropout
from tritonrnn import functional
from tritonrnn._plan import CELLS
from tritonrnn.modules import check_weight, fx_proxy_of_the_call, refuse_script, repack, type_name, unpack
from tritonrnn.scheduler import StackLayer

State = "Tensor | tuple[Tensor, Tensor]"


class RecurrentLayer(nn.Module):
    """The parameters of one layer of a StackedRNN (it runs inside the stack, not on its own)."""

    def __init__(
        self, cell: str, input_size: int, hidden_size: int, bias: bool, bidirectional: bool, device=None, dtype=None
    ):
        super().__init__()
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.directions = 2 if bidirectional else 1
        gates = CELLS[cell][1] * hidden_size
        factory = dict(device=device, dtype=dtype)
        for suffix in self.suffixes:
            setattr(self, f"weight_ih{suffix}", nn.Parameter(torch.empty(gates, input_size, **factory)))
            setattr(self, f"weight_hh{suffix}", nn.Parameter(torch.empty(gates, hidden_size, **factory)))
            if bias:
                setattr(self, f"bias_ih{suffix}", nn.Parameter(torch.empty(gates, **factory)))
                setattr(self, f"bias_hh{suffix}", nn.Parameter(torch.empty(gates, **factory)))
        self.reset_parameters()

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse")[: self.directions]

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(
        self,
        *,
        weight_drop: float,
        training: bool,
        dtype: torch.dtype | None = None,
        held: _dropout.HeldMasks | None = None,
        name: str = "",
    ) -> StackLayer:
        """The layer as the scheduler takes it, with DropConnect on W_hh (one mask per call, or the mask ``held``
        keeps under ``name`` across calls), cast to ``dtype`` (autocast's) if given. The stack calls the layer module,
        so hooks on it run on every call, as on a torch.nn module: ``prune``'s and the old ``weight_norm``'s recompute
        the weights they own."""
        directions = []
        for suffix in self.suffixes:
            w_ih = getattr(self, f"weight_ih{suffix}")
            w_hh = getattr(self, f"weight_hh{suffix}")
            if self.bias != self._owns(f"bias_ih{suffix}"):
                raise RuntimeError(
                    f"StackedRNN: layers.{name} has bias={self.bias} but {'no ' if self.bias else ''}bias "
                    "parameters; bias is fixed when the stack is built"
                )
            b_ih = getattr(self, f"bias_ih{suffix}") if self.bias else None
            b_hh = getattr(self, f"bias_hh{suffix}") if self.bias else None
            self._check_shapes(name, suffix, (w_ih, w_hh, b_ih, b_hh))
            if weight_drop > 0 and training:
                if held is not None:
                    w_hh = held.drop_weight(f"{name}{suffix}", w_hh, weight_drop)
                else:
                    w_hh = F.dropout(w_hh, weight_drop, training=True)
            weights = (w_ih, w_hh, b_ih, b_hh)
            if dtype is not None:
                weights = tuple(w.to(dtype) if w is not None else None for w in weights)
            directions.append(weights)
        return StackLayer(self.cell, tuple(directions))

    def _owns(self, key: str) -> bool:
        """Whether the layer has the parameter ``key``, without computing it: registered, parametrized, or a plain
        attribute that a hook recomputes (torch.nn.utils.prune's, the old weight_norm's)."""
        return key in self._parameters or key in self.__dict__ or parametrize.is_parametrized(self, key)

    def _check_shapes(self, name: str, suffix: str, weights: tuple) -> None:
        """The weights of one direction against the layer's cell and sizes (a cell or size changed after
        construction, a weight reassigned with another shape or None): the kernels would read them out of bounds."""
        gates = CELLS[self.cell][1] * self.hidden_size
        expected = ((gates, self.input_size), (gates, self.hidden_size), (gates,), (gates,))
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[: 4 if self.bias else 2]
        sizes = f"a {self.cell} layer of input_size={self.input_size}, hidden_size={self.hidden_size}"
        for key, weight, shape in zip(names, weights, expected):
            check_weight(f"StackedRNN: layers.{name}.{key}{suffix}", weight, shape, sizes)

    def extra_repr(self) -> str:
        text = f"{self.cell}, {self.input_size}, {self.hidden_size}"
        text += ", bias=False" if not self.bias else ""
        return text + (", bidirectional=True" if self.directions == 2 else "")


class StackedRNN(nn.Module):
    """A stack of recurrent layers of any cells ("lstm", "gru", "rnn_tanh", "rnn_relu"), run on the kernels.

    Args:
        input_size: features of the input.
        layers: bottom first, (cell, hidden_size) per layer, e.g. ``[("lstm", 256), ("gru", 256)]``.
        dropout: probability of zeroing an element of a layer's output before the next layer reads it
            (not after the last layer), in training only. In [0, 1).
        dropout_mode: "standard" (a fresh mask per element and step, torch.nn's) or "variational" (one mask
            per sequence and unit, reused at every step).
        residual: add each layer's input to its output; every layer's input size must equal its output size.
        batch_first: input and output are [B, T, F] instead of [T, B, F].
        bidirectional: every layer runs both directions; its output is [forward, reverse] (2 * hidden_size).
        weight_drop: DropConnect on every W_hh in training (one mask per forward call, AWD-LSTM, or per
            ``tritonrnn.hold_dropout_masks`` block). In [0, 1).
        bias: layers have the biases b_ih and b_hh.

    ``forward(x, states=None, return_all_layers=False)`` returns ``(output, states)``: output is the top
    layer's sequence [T, B, D*H] (or [B, T, D*H] with batch_first), or with ``return_all_layers`` the list
    of every layer's output (before inter-layer dropout, after the residual sum); ``states`` holds one
    final state per layer: ``(h, c)`` for LSTM layers, ``h`` otherwise, each [D, B, H] (D = 2 when
    bidirectional). ``states`` given to forward has the same structure; unbatched input [T, F] takes and
    returns [D, H] states. A PackedSequence input gives PackedSequence outputs (in its layout) and each
    sequence's own final states, in the batch's original order.
    """

    def __init__(
        self,
        input_size: int,
        layers: Sequence[tuple[str, int]],
        dropout: float = 0.0,
        dropout_mode: str = "standard",
        residual: bool = False,
        batch_first: bool = False,
        bidirectional: bool = False,
        weight_drop: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size should be a positive integer, got {input_size!r}")
        # As torch.nn's constructor checks bias and batch_first (a truthy "no" would build biases).
        for option, value in (("bias", bias), ("residual", residual), ("batch_first", batch_first),
                              ("bidirectional", bidirectional)):  # fmt: skip
            if type(value) is not bool:
                raise TypeError(f"{option} should be of type bool, got: {type_name(value)}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"StackedRNN: dtype should be a floating-point dtype, got {dtype}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise ValueError(f"layers should be a non-empty list of (cell, hidden_size) pairs, got {layers!r}")
        # The probabilities as given, before float() would take a string; the rest at the end (_check_attributes).
        _dropout.check_probability("dropout", dropout)
        _dropout.check_probability("weight_drop", weight_drop)
        if dropout > 0 and len(layers) == 1:
            warnings.warn(  # torch.nn's warning for the same case
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"more than one layer, but got dropout={dropout} and 1 layer", stacklevel=2,
            )  # fmt: skip
        directions = 2 if bidirectional else 1
        modules = []
        size = input_size
        for index, spec in enumerate(layers):
            if not isinstance(spec, (tuple, list)) or len(spec) != 2:
                raise ValueError(f"layer {index}: expected a (cell, hidden_size) pair, got {spec!r}")
            cell, hidden = spec
            if cell not in CELLS:
                raise ValueError(f"layer {index}: unknown cell {cell!r}; expected one of {sorted(CELLS)}")
            if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
                raise ValueError(f"layer {index}: hidden_size should be a positive integer, got {hidden!r}")
            modules.append(RecurrentLayer(cell, size, hidden, bias, bidirectional, device=device, dtype=dtype))
            size = directions * hidden
        self.layers = nn.ModuleList(modules)
        self.input_size = input_size
        self.output_size = size
        self.dropout = float(dropout)
        self.dropout_mode = dropout_mode
        self.residual = residual
        self.batch_first = batch_first
        self.bidirectional = bidirectional
        self.weight_drop = float(weight_drop)
        self._check_attributes()

    def _check_attributes(self) -> None:
        """The options forward reads, checked at construction and again at every call (they are attributes a user
        can set in between): a residual sum over unequal sizes would read the input with the output's width."""
        _dropout.check_probability("dropout", self.dropout)
        _dropout.check_mode(self.dropout_mode)
        _dropout.check_probability("weight_drop", self.weight_drop)
        if not type(self.residual) is type(self.batch_first) is type(self.bidirectional) is bool:
            for option in ("residual", "batch_first", "bidirectional"):
                value = getattr(self, option)
                if type(value) is not bool:
                    raise TypeError(f"StackedRNN: {option} should be of type bool, got: {type_name(value)}")
        directions = 2 if self.bidirectional else 1
        width = self.input_size
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, RecurrentLayer):
                raise TypeError(
                    f"layers.{index} is a {type(layer).__name__}, not one of the stack's RecurrentLayers; the layers "
                    "are fixed when the stack is built"
                )
            if type(layer.bias) is not bool:
                raise TypeError(f"layers.{index}: bias should be of type bool, got: {type_name(layer.bias)}")
            # The cell and sizes a layer's weights are checked against at the call (RecurrentLayer.forward).
            if layer.cell not in CELLS:
                raise ValueError(f"layers.{index}: unknown cell {layer.cell!r}; expected one of {sorted(CELLS)}")
            if layer.input_size != width:
                source = "the stack's input_size" if index == 0 else f"layer {index - 1} outputs"
                raise RuntimeError(
                    f"layers.{index} ({layer.cell}) reads {layer.input_size} features, but {source} {width}; the "
                    "sizes are fixed when the stack is built"
                )
            width = directions * layer.hidden_size
            if layer.directions != directions:
                raise ValueError(
                    f"bidirectional={bool(self.bidirectional)}, but layer {index} ({layer.cell}) was built with "
                    f"{layer.directions} direction(s); bidirectional is fixed when the stack is built"
                )
            if self.residual and layer.input_size != directions * layer.hidden_size:
                raise ValueError(
                    f"residual=True: layer {index} ({layer.cell}) reads {layer.input_size} features but outputs "
                    f"{directions * layer.hidden_size}; a residual connection needs them equal"
                )

    def __prepare_scriptable__(self):
        refuse_script(self, "torch.export (a stack refuses torch.jit.trace too)")

    def forward(
        self, x: Tensor, states: Sequence[State] | None = None, return_all_layers: bool = False
    ) -> tuple[Tensor | list[Tensor], list[State]]:
        traced = fx_proxy_of_the_call(self, x, states, return_all_layers=return_all_layers)
        if traced is not None:
            return traced
        self._check_attributes()
        packed, lengths = None, None
        if isinstance(x, PackedSequence):
            # Sequences of different lengths: each row keeps its state past its end (time-major, original order).
            packed = x
            x, lengths = unpack(packed)
        if not isinstance(x, Tensor):
            raise TypeError(f"StackedRNN: expected the input to be a Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"StackedRNN: Expected input to be 2D or 3D, got {x.dim()}D instead")
        if x.layout != torch.strided:
            raise RuntimeError(f"StackedRNN: expected a dense input tensor, got layout {x.layout}")
        # A parameter, not the attribute: a parametrized weight_ih would be computed once more per call.
        weight = next(self.layers[0].parameters())
        dtype = weight.dtype
        if not dtype.is_floating_point:
            raise TypeError(f"StackedRNN: the parameters are {dtype}; the stack runs floating-point dtypes only")
        autocast = functional.autocast_dtype(x)
        if autocast is not None:
            # Like torch.nn's recurrent layers under autocast: input, states and weights in the autocast dtype.
            dtype = autocast
            x = x.to(dtype)
            if isinstance(states, (list, tuple)):
                states = [functional.autocast_cast(s, dtype) for s in states]
        if not x.is_floating_point() or x.dtype != dtype:
            raise ValueError(f"StackedRNN: input dtype {x.dtype} does not match the parameters' {dtype}")
        if x.device != weight.device:
            raise RuntimeError(
                f"StackedRNN: input is on {x.device} but the parameters are on {weight.device}; move one of them"
            )
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}"
            )
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first and packed is None:
            x = x.transpose(0, 1)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        h0, c0 = self._initial_states(states, x, batched)
        self._check_parameters(x, dtypes=autocast is None)  # under autocast each layer is cast, not its device
        # Set by tritonrnn.hold_dropout_masks: masks kept from call to call (truncated BPTT).
        held = getattr(self, "_held_masks", None)
        layers = [
            layer(weight_drop=self.weight_drop, training=self.training, dtype=autocast, held=held, name=str(index))
            for index, layer in enumerate(self.layers)
        ]
        ys, h_n, c_n = functional.stack_unchecked(
            x,
            layers,
            h0,
            c0,
            dropout=self.dropout,
            dropout_mode=self.dropout_mode,
            residual=self.residual,
            training=self.training,
            lengths=lengths,
            held_masks=held,
        )

        def arrange(y: Tensor) -> Tensor | PackedSequence:
            if packed is not None:
                return repack(y, packed)
            if not batched:
                return y.squeeze(1)
            return y.transpose(0, 1) if self.batch_first else y

        def state(h: Tensor) -> Tensor:
            return h if batched else h.squeeze(1)

        final = [(state(h), state(c)) if c is not None else state(h) for h, c in zip(h_n, c_n)]
        output = [arrange(y) for y in ys] if return_all_layers else arrange(ys[-1])
        return output, final

    def _check_parameters(self, x: Tensor, dtypes: bool = True) -> None:
        """Every parameter on the input's device and (``dtypes``) in its dtype (a layer converted on its own, say)."""
        for name, p in self.named_parameters():
            if (dtypes and p.dtype != x.dtype) or p.device != x.device:
                error = ValueError if dtypes and p.dtype != x.dtype else RuntimeError  # torch.nn's error types
                raise error(
                    f"StackedRNN: {name} is {p.dtype} on {p.device}, but the input and layers.0 are {x.dtype} on "
                    f"{x.device}; convert the whole stack (model.to(...))"
                )

    def _initial_states(
        self, states: Sequence[State] | None, x: Tensor, batched: bool
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per layer h0 [D, B, H] and c0 (LSTM layers) from the user's states, checked against each layer."""
        batch = x.size(1)
        directions = 2 if self.bidirectional else 1
        if states is None:
            h0, c0 = [], []
            for layer in self.layers:
                zeros = x.new_zeros(directions, batch, layer.hidden_size)
                h0.append(zeros)
                c0.append(zeros if layer.cell == "lstm" else None)
            return h0, c0
        # As the modules: the wrong kind of object a TypeError, the wrong number of states a ValueError.
        if not isinstance(states, (list, tuple)):
            raise TypeError(
                f"states should be a list with one state per layer ({len(self.layers)}), got {type(states).__name__}"
            )
        if len(states) != len(self.layers):
            raise ValueError(
                f"states should be a list with one state per layer ({len(self.layers)}), got {len(states)} entries"
            )
        h0, c0 = [], []
        expected = (directions, batch) if batched else (directions,)
        for index, (layer, state) in enumerate(zip(self.layers, states)):
            if layer.cell == "lstm":
                if not isinstance(state, (tuple, list)) or len(state) != 2:
                    raise TypeError(f"states[{index}]: layer {index} is an LSTM; its state is a tuple (h, c)")
                pair = tuple(state)
            else:
                if not isinstance(state, Tensor):
                    raise TypeError(f"states[{index}]: layer {index} is {layer.cell}; its state is one tensor h")
                pair = (state,)
            shape = (*expected, layer.hidden_size)
            for name, h in zip(("h", "c"), pair):
                if not isinstance(h, Tensor):
                    raise TypeError(f"states[{index}]: {name} should be a tensor, got {type(h).__name__}")
                if tuple(h.shape) != shape:
                    raise RuntimeError(f"states[{index}]: expected {name} of size {list(shape)}, got {list(h.shape)}")
                if h.dtype != x.dtype or h.device != x.device:
                    raise RuntimeError(
                        f"states[{index}]: {name} is {h.dtype} on {h.device}, the input {x.dtype} on {x.device}"
                    )
            pair = tuple(h if batched else h.unsqueeze(1) for h in pair)
            h0.append(pair[0])
            c0.append(pair[1] if len(pair) == 2 else None)
        return h0, c0

    def extra_repr(self) -> str:
        options = [f"input_size={self.input_size}"]
        for name, default in (("dropout", 0.0), ("dropout_mode", "standard"), ("residual", False),
                              ("batch_first", False), ("bidirectional", False), ("weight_drop", 0.0)):  # fmt: skip
            value = getattr(self, name)
            if value != default:
                options.append(f"{name}={value!r}")
        return ", ".join(options)
