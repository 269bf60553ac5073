"""Bad input raises a Python exception that names the problem, as torch.nn does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE
from torch import nn

import tritonrnn
from tritonrnn.scheduler import StackLayer


def lstm(**kwargs):
    return tritonrnn.LSTM(4, 6, num_layers=2, **kwargs).to(DEVICE)


def gru(**kwargs):
    return tritonrnn.GRU(4, 6, num_layers=2, **kwargs).to(DEVICE)


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize(
    "call,error,match",
    [
        pytest.param(lambda: lstm()(x(5, 3, 7)), RuntimeError, "input_size. Expected 4, got 7", id="feature-size"),
        pytest.param(lambda: lstm()(x(5)), ValueError, "Expected input to be 2D or 3D, got 1D", id="1d-input"),
        pytest.param(lambda: lstm()(x(2, 5, 3, 4)), ValueError, "got 4D", id="4d-input"),
        pytest.param(
            lambda: gru()(x(5, 3, 4), x(2, 2, 6)), RuntimeError, r"Expected hidden size \(2, 3, 6\)", id="hx-batch"
        ),
        pytest.param(
            lambda: gru()(x(5, 3, 4), x(3, 3, 6)), RuntimeError, r"\(2, 3, 6\), got \[3, 3, 6\]", id="hx-layers"
        ),
        pytest.param(lambda: gru()(x(5, 3, 4), x(2, 3, 5)), RuntimeError, r"got \[2, 3, 5\]", id="hx-hidden"),
        pytest.param(
            lambda: lstm()(x(5, 3, 4), (x(2, 3, 6), x(2, 3, 5))), RuntimeError, r"hidden\[1\] size", id="cx-hidden"
        ),
        pytest.param(lambda: lstm()(x(5, 3, 4), x(2, 3, 6)), TypeError, r"tuple \(h_0, c_0\)", id="lstm-hx-not-tuple"),
        pytest.param(
            lambda: lstm()(x(5, 3, 4), (x(2, 6), x(2, 3, 6))),
            RuntimeError,
            r"batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors",
            id="lstm-hx-dims",
        ),
        pytest.param(
            lambda: lstm()(x(5, 3, 4), (x(2, 3, 6), x(2, 6))),
            RuntimeError,
            r"batched 3-D input, hx and cx should also be 3-D but got \(3-D, 2-D\) tensors",
            id="lstm-cx-dims",
        ),
        pytest.param(
            lambda: lstm()(x(5, 4), (x(2, 1, 6), x(2, 6))),
            RuntimeError,
            r"unbatched 2-D input, hx and cx should also be 2-D but got \(3-D, 2-D\) tensors",
            id="lstm-unbatched-hx",
        ),
        pytest.param(
            lambda: lstm()(x(5, 4), (x(2, 6), x(2, 1, 6))),
            RuntimeError,
            r"unbatched 2-D input, hx and cx should also be 2-D but got \(2-D, 3-D\) tensors",
            id="lstm-unbatched-cx",
        ),
        # torch.nn fails inside ("'tuple' object has no attribute 'dim'"): a GRU given an LSTM's (h, c).
        pytest.param(
            lambda: gru()(x(5, 3, 4), (x(2, 3, 6), x(2, 3, 6))), TypeError, "GRU: hx must be a tensor", id="gru-hx-pair"
        ),
        pytest.param(lambda: gru()(x(5, 3, 4), x(3, 6)), RuntimeError, "should also be 3-D but got 2-D", id="hx-dims"),
        pytest.param(
            lambda: gru()(x(5, 4), x(2, 1, 6)), RuntimeError, "should also be 2-D but got 3-D", id="unbatched-hx"
        ),
        pytest.param(
            lambda: lstm()(x(5, 3, 4, dtype=torch.float64)), ValueError, "does not match weight dtype", id="input-dtype"
        ),
        pytest.param(
            lambda: gru()(x(5, 3, 4), x(2, 3, 6, dtype=torch.float64)),
            RuntimeError,
            "hidden state dtype",
            id="hx-dtype",
        ),
        pytest.param(
            lambda: gru()(torch.randn(5, 3, 4, device="meta")),
            RuntimeError,
            "not at the same device",
            id="input-device",
        ),
        pytest.param(
            lambda: gru()(x(5, 3, 4), torch.randn(2, 3, 6, device="meta")),
            RuntimeError,
            "not at the same device",
            id="hx-device",
        ),
        pytest.param(
            lambda: gru()(x(0, 3, 4)), RuntimeError, "sequence length to be larger than 0", id="empty-sequence"
        ),
        pytest.param(
            lambda: tritonrnn.RNN(4, 6, nonlinearity="sigmoid"), ValueError, "Unknown nonlinearity", id="nonlin"
        ),
        pytest.param(
            lambda: tritonrnn.GRU(4, 6, dropout=1.5), ValueError, "dropout should be a number", id="dropout>1"
        ),
        pytest.param(
            lambda: tritonrnn.GRU(4, 6, dropout=-0.1), ValueError, "dropout should be a number", id="dropout<0"
        ),
        pytest.param(lambda: tritonrnn.LSTM(4, 0), ValueError, "hidden_size must be greater than zero", id="hidden0"),
        pytest.param(
            lambda: lstm()(x(5, 3, 4), (x(2, 3, 6),) * 3),
            RuntimeError,
            r"hx must be a tuple \(h_0, c_0\) of two tensors, got 3",
            id="lstm-hx-three",
        ),
        pytest.param(
            lambda: gru()(x(5, 3, 4).to_sparse()),
            RuntimeError,
            "GRU: expected a dense input tensor, got layout torch.sparse_coo",
            id="sparse-input",
        ),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def stack(layers=(("lstm", 6), ("gru", 6)), **kwargs):
    return tritonrnn.StackedRNN(4, list(layers), **kwargs).to(DEVICE)


def states(*shapes):
    return [tuple(x(*s) for s in shape) if isinstance(shape[0], tuple) else x(*shape) for shape in shapes]


@pytest.mark.parametrize(
    "call,error,match",
    [
        pytest.param(lambda: stack([("lstm", 6), ("gruu", 6)]), ValueError, r"layer 1: unknown cell 'gruu'", id="cell"),
        pytest.param(
            lambda: tritonrnn.StackedRNN(0, [("gru", 6)]), ValueError, "input_size should be a positive", id="input0"
        ),
        pytest.param(
            lambda: tritonrnn.StackedRNN(4.0, [("gru", 6)]), ValueError, "positive integer, got 4.0", id="input-float"
        ),
        pytest.param(
            lambda: tritonrnn.StackedRNN(True, [("gru", 6)]), ValueError, "positive integer, got True", id="input-bool"
        ),
        pytest.param(lambda: stack([]), ValueError, "non-empty list", id="no-layers"),
        pytest.param(lambda: stack([("lstm",)]), ValueError, r"layer 0: expected a \(cell, hidden_size\)", id="spec"),
        pytest.param(lambda: stack([("lstm", 0)]), ValueError, "layer 0: hidden_size should be a positive", id="h0"),
        pytest.param(
            lambda: stack([("lstm", 4), ("gru", 5)], residual=True),
            ValueError,
            r"layer 1 \(gru\) reads 4 features but outputs 5",
            id="residual-sizes",
        ),
        pytest.param(
            lambda: stack([("lstm", 4)], residual=True, bidirectional=True),
            ValueError,
            "layer 0 .* reads 4 features but outputs 8",
            id="residual-bidirectional",
        ),
        pytest.param(lambda: stack(dropout=1.0), ValueError, r"dropout should be a number in range \[0, 1\)", id="p=1"),
        pytest.param(lambda: stack(dropout=-0.2), ValueError, "dropout should be a number", id="p<0"),
        pytest.param(lambda: stack(dropout="0.1"), ValueError, "dropout should be a number", id="p-str"),
        pytest.param(lambda: stack(dropout_mode="zoneout"), ValueError, "dropout_mode should be one of", id="mode"),
        pytest.param(lambda: stack(weight_drop=1.0), ValueError, r"weight_drop should be a number", id="weight-drop"),
        pytest.param(lambda: stack()(x(5, 3, 7)), RuntimeError, "Expected 4, got 7", id="feature-size"),
        pytest.param(lambda: stack()(x(5, 3, 4, dtype=torch.float64)), ValueError, "input dtype", id="dtype"),
        pytest.param(lambda: stack()(x(5)), ValueError, "got 1D", id="1d"),
        pytest.param(
            lambda: stack()(torch.randn(5, 3, 4, device="meta")),
            RuntimeError,
            "StackedRNN: input is on meta but the parameters are on",
            id="input-device",
        ),
        pytest.param(lambda: stack()(x(0, 3, 4)), RuntimeError, "larger than 0", id="empty"),
        pytest.param(
            lambda: stack()(x(5, 3, 4), states(((1, 3, 6), (1, 3, 6)))),
            ValueError,
            r"one state per layer \(2\), got 1 entries",
            id="states-length",
        ),
        pytest.param(lambda: stack()(x(5, 3, 4), x(2, 3, 6)), TypeError, "one state per layer", id="states-not-a-list"),
        pytest.param(
            lambda: stack()(x(5, 3, 4), states((1, 3, 6), (1, 3, 6))),
            TypeError,
            r"states\[0\]: layer 0 is an LSTM; its state is a tuple \(h, c\)",
            id="lstm-state-structure",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4), states(((1, 3, 6), (1, 3, 6)), ((1, 3, 6), (1, 3, 6)))),
            TypeError,
            r"states\[1\]: layer 1 is gru; its state is one tensor",
            id="gru-state-structure",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4), states(((1, 3, 6), (1, 3, 5)), (1, 3, 6))),
            RuntimeError,
            r"states\[0\]: expected c of size \[1, 3, 6\], got \[1, 3, 5\]",
            id="state-size",
        ),
        pytest.param(
            lambda: stack(bidirectional=True)(x(5, 3, 4), states(((1, 3, 6), (1, 3, 6)), (1, 3, 6))),
            RuntimeError,
            r"expected h of size \[2, 3, 6\]",
            id="state-directions",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4), [(x(1, 3, 6), None), x(1, 3, 6)]),
            TypeError,
            r"states\[0\]: c should be a tensor, got NoneType",
            id="state-not-a-tensor",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4), states(((1, 3, 6), (1, 3, 6)), (1, 3, 6)) + [x(1, 3, 6)]),
            ValueError,
            r"one state per layer \(2\), got 3 entries",
            id="states-too-many",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4), [(x(1, 3, 6), x(1, 3, 6)), x(1, 3, 6, dtype=torch.float64)]),
            RuntimeError,
            r"states\[1\]: h is torch.float64 on .*, the input torch.float32",
            id="state-dtype",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4), [(x(1, 3, 6), torch.randn(1, 3, 6, device="meta")), x(1, 3, 6)]),
            RuntimeError,
            r"states\[0\]: c is torch.float32 on meta, the input torch.float32 on",
            id="state-device",
        ),
        pytest.param(lambda: stack(bias=None), TypeError, "bias should be of type bool, got: NoneType", id="bias-none"),
        pytest.param(lambda: stack(bias="no"), TypeError, "bias should be of type bool, got: str", id="bias-str"),
        pytest.param(
            lambda: stack([("lstm", 4)], residual="yes"),
            TypeError,
            "residual should be of type bool",
            id="residual-str",
        ),
        pytest.param(lambda: stack(batch_first=1), TypeError, "batch_first should be of type bool", id="batch-first"),
        pytest.param(
            lambda: stack(bidirectional=None),
            TypeError,
            "bidirectional should be of type bool",
            id="bidirectional-none",
        ),
        pytest.param(
            lambda: stack(dtype=torch.complex64),
            TypeError,
            "dtype should be a floating-point dtype",
            id="complex-dtype",
        ),
        pytest.param(
            lambda: stack()(x(5, 3, 4).to_sparse()),
            RuntimeError,
            "StackedRNN: expected a dense input tensor, got layout torch.sparse_coo",
            id="sparse-input",
        ),
    ],
)
def test_stacked_rnn_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _with_mode(module, mode):
    module.dropout_mode = mode
    return module.train()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: stack(dropout=0.5), id="stacked"),
        pytest.param(lambda: tritonrnn.GRU(4, 6, num_layers=2, dropout=0.5).to(DEVICE), id="gru"),
    ],
)
def test_dropout_mode_set_after_construction_is_checked_at_forward(make):
    """A typo assigned to the attribute later must not run silently as standard dropout."""
    model = _with_mode(make(), "Variational")
    with pytest.raises(ValueError, match="dropout_mode should be one of .* got 'Variational'"):
        model(x(5, 3, 4))
    _with_mode(model, "variational")(x(5, 3, 4))  # the right spelling runs


@pytest.mark.parametrize("p", [1.5, -0.1, float("nan")])
def test_dropout_set_after_construction_is_checked_like_torch(p):
    """torch.nn's op checks the probability where it applies it (training, between layers), so a value assigned
    later fails there; it used to run as p = 1 (1.5, NaN) or as no dropout (-0.1). StackedRNN checks at every call."""
    for module in (nn.GRU(4, 6, num_layers=2), tritonrnn.GRU(4, 6, num_layers=2).to(DEVICE)):
        module.dropout = p
        module.eval()(x(5, 3, 4).to(next(module.parameters()).device))  # not applied in eval: no error, as torch.nn
        with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1, but got"):
            module.train()(x(5, 3, 4).to(next(module.parameters()).device))
    model = stack()
    for name in ("dropout", "weight_drop"):
        setattr(model, name, p)
        with pytest.raises(ValueError, match=f"{name} should be a number in range"):
            model(x(5, 3, 4))
        setattr(model, name, 0.0)


def _reassigned(name, make):
    module = tritonrnn.GRU(4, 6, num_layers=2).to(DEVICE)
    setattr(module, name, make(getattr(module, name)))
    return module


@pytest.mark.parametrize(
    "module,error,match",
    [
        pytest.param(
            lambda: _reassigned("weight_hh_l1", lambda w: nn.Parameter(w.detach().double())),
            RuntimeError,
            r"parameter weight_hh_l1 is torch.float64 but weight_ih_l0 is torch.float32",
            id="dtype",
        ),
        pytest.param(
            lambda: _reassigned("bias_hh_l0", lambda w: None),
            TypeError,
            "bias_hh_l0 is None; expected a tensor",
            id="none",
        ),
        pytest.param(
            lambda: _reassigned("weight_hh_l1", lambda w: nn.Parameter(w.detach().to("meta"))),
            RuntimeError,
            "Input and parameter tensors are not at the same device",
            id="device",
        ),
        pytest.param(
            lambda: _reassigned("weight_hh_l1", lambda w: nn.Parameter(w.detach()[:, :5])),
            RuntimeError,
            r"parameter weight_hh_l1 has shape \(18, 5\), expected \(18, 6\)",
            id="shape",
        ),
    ],
)
def test_every_reassigned_weight_is_checked(module, error, match):
    """A weight the user reassigned (from numpy, say) is checked as the first one is: its dtype, its presence and its
    device. Only the first was: the kernels failed inside Triton, the CPU op ran with one bias or a float64 weight."""
    with pytest.raises(error, match=match):
        module()(x(5, 3, 4))


@pytest.mark.parametrize(
    "change,match",
    [
        pytest.param(dict(num_layers=1), r"num_layers=1, bias=True, bidirectional=False .* fixed", id="num_layers"),
        pytest.param(dict(bias=False), r"bias=False, bidirectional=False .* fixed", id="bias"),
        pytest.param(dict(bidirectional=True), r"bidirectional=True and proj_size=0 .* fixed", id="bidirectional"),
        pytest.param(dict(hidden_size=5), r"weight_ih_l0 has shape \(18, 4\), expected \(15, 4\)", id="hidden"),
    ],
)
def test_module_options_set_after_construction_are_checked(change, match):
    """The layer count, bias, directions and sizes are fixed by the parameters built for them; set later, the kernels
    ran with a layer fewer, without the biases, or read the weights with the wrong sizes. torch.nn's op raises
    ("Expected more weights"); so do ours, naming what differs."""
    module = tritonrnn.GRU(4, 6, num_layers=2).to(DEVICE)
    for name, value in change.items():
        setattr(module, name, value)
    with pytest.raises(RuntimeError, match=match):
        module(x(5, 3, 4))


@pytest.mark.parametrize(
    "make,name,value,error,match",
    [
        pytest.param(tritonrnn.GRU, "hidden_size", 6.0, TypeError, "GRU: hidden_size should be of type int, got: float",
                     id="hidden-float"),
        pytest.param(tritonrnn.GRU, "num_layers", True, TypeError, "num_layers should be of type int, got: bool",
                     id="layers-bool"),
        pytest.param(tritonrnn.LSTM, "bidirectional", 1, TypeError, "bidirectional should be of type bool, got: int",
                     id="bidirectional-int"),
        pytest.param(tritonrnn.LSTM, "bidirectional", np.bool_(False), TypeError, "got: numpy.bool",
                     id="bidirectional-numpy"),
        pytest.param(tritonrnn.RNN, "mode", "nope", ValueError, "RNN: mode must be RNN_TANH or RNN_RELU, got 'nope'",
                     id="rnn-mode"),
        pytest.param(tritonrnn.LSTM, "mode", "GRU", ValueError, "LSTM: mode must be LSTM, got 'GRU'", id="lstm-mode"),
        pytest.param(tritonrnn.GRU, "dropout", "0.5", TypeError, "GRU: dropout should be a number, got '0.5'",
                     id="dropout-str"),
    ],
)  # fmt: skip
def test_module_options_of_the_wrong_type_set_after_construction_are_refused(make, name, value, error, match):
    """Set after construction, torch.nn's op refuses these where it reads them (an "invalid combination of
    arguments", an assertion for RNN's mode); ours named them after Triton's or Python's internals (a float size
    passed the shape check, 6.0 == 6, and failed on ``bit_length``; a str dropout failed on ``>``)."""
    module = make(4, 6, num_layers=2).to(DEVICE)
    setattr(module, name, value)
    with pytest.raises(error, match=match):
        module(x(5, 3, 4))


@pytest.mark.parametrize("make", [tritonrnn.GRU, tritonrnn.LSTM])
def test_values_torch_nn_accepts_after_construction_run(make):
    """The other side of the checks above: numpy integers and a tensor dropout are taken, as torch.nn's op takes them,
    and RNN's mode chooses its nonlinearity (torch.nn's forward reads it)."""
    module = make(4, 6, num_layers=2).to(DEVICE)
    module.num_layers, module.dropout = np.int64(2), torch.tensor(0.25)
    module.train()(x(5, 3, 4))
    rnn = tritonrnn.RNN(4, 6).to(DEVICE)
    rnn.mode = "RNN_RELU"
    assert rnn(x(5, 3, 4))[0].min() >= 0


def test_a_bad_dropout_is_named_after_the_input_like_torch():
    """torch.nn's op checks the dropout probability where it applies it, after the input's checks."""
    for module in (nn.GRU(4, 6, num_layers=2), tritonrnn.GRU(4, 6, num_layers=2).to(DEVICE)):
        module.dropout = 1.5
        device = next(module.parameters()).device
        with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
            module.train()(torch.randn(5, 3, 7, device=device))


def test_a_one_dimensional_input_is_named_before_its_dtype_like_torch():
    for module in (nn.RNN(4, 6), tritonrnn.RNN(4, 6).to(DEVICE)):
        device = next(module.parameters()).device
        with pytest.raises(ValueError, match="RNN: Expected input to be 2D or 3D, got 1D tensor instead"):
            module(torch.randn(5, dtype=torch.float64, device=device))


@pytest.mark.parametrize(
    "change,match",
    [
        pytest.param(
            dict(residual=True), r"residual=True: layer 1 \(gru\) reads 4 features but outputs 5", id="residual"
        ),
        pytest.param(dict(bidirectional=True), r"layer 0 \(lstm\) was built with 1 direction", id="bidirectional"),
    ],
)
def test_stack_options_set_after_construction_are_checked(change, match):
    """residual set later on layers of unequal sizes: the kernels read the input with the output's width (other rows'
    features, silently); bidirectional set later: states of two directions for layers of one."""
    model = stack([("lstm", 4), ("gru", 5)])
    for name, value in change.items():
        setattr(model, name, value)
    with pytest.raises(ValueError, match=match):
        model(x(5, 3, 4))


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(lambda m: setattr(m.layers[0], "cell", "gru"), RuntimeError,
                     r"layers.0.weight_ih has shape \(24, 4\), expected \(18, 4\) for a gru layer", id="lstm-to-gru"),
        pytest.param(lambda m: setattr(m.layers[1], "cell", "rnn_tanh"), RuntimeError,
                     r"layers.1.weight_ih has shape \(18, 6\), expected \(6, 6\)", id="gru-to-rnn"),
        pytest.param(lambda m: setattr(m.layers[0], "cell", "gruu"), ValueError, r"layers.0: unknown cell 'gruu'",
                     id="unknown-cell"),
        pytest.param(lambda m: setattr(m.layers[1], "hidden_size", 5), RuntimeError,
                     r"layers.1.weight_ih has shape \(18, 6\), expected \(15, 6\)", id="hidden-size"),
        pytest.param(lambda m: setattr(m.layers[1], "input_size", 5), RuntimeError,
                     r"layers.1 \(gru\) reads 5 features, but layer 0 outputs 6", id="layer-input-size"),
        pytest.param(lambda m: setattr(m, "input_size", 5), RuntimeError,
                     r"layers.0 \(lstm\) reads 4 features, but the stack's input_size 5", id="stack-input-size"),
        pytest.param(lambda m: setattr(m.layers[1], "weight_hh", nn.Parameter(torch.randn(18, 5, device=DEVICE))),
                     RuntimeError, r"layers.1.weight_hh has shape \(18, 5\), expected \(18, 6\)", id="weight"),
        pytest.param(lambda m: setattr(m.layers[1], "bias_hh", None), TypeError, "layers.1.bias_hh is None",
                     id="bias-none"),
        pytest.param(lambda m: setattr(m.layers[1], "bias", False), RuntimeError,
                     "layers.1 has bias=False but bias parameters", id="bias-off"),
        pytest.param(lambda m: delattr(m.layers[1], "bias_ih"), RuntimeError,
                     "layers.1 has bias=True but no bias parameters", id="bias-gone"),
        pytest.param(lambda m: setattr(m.layers[1], "bias", 1), TypeError,
                     "layers.1: bias should be of type bool, got: int", id="bias-int"),
        pytest.param(lambda m: m.layers.append(nn.Linear(6, 6)), TypeError,
                     "layers.2 is a Linear, not one of the stack's RecurrentLayers", id="foreign-layer"),
        pytest.param(lambda m: setattr(m, "batch_first", 1), TypeError,
                     "StackedRNN: batch_first should be of type bool, got: int", id="batch-first-int"),
        pytest.param(lambda m: m.to(torch.complex64), TypeError,
                     "the parameters are torch.complex64; the stack runs floating-point dtypes only", id="complex"),
    ],
)  # fmt: skip
def test_stack_layers_changed_after_construction_are_refused(change, error, match):
    """A layer's cell or sizes changed, or a weight reassigned with another shape, after the stack was built: the
    kernels would read the weights with the wrong sizes (a crash or other rows' values, silently), so the call
    names what does not fit."""
    model = stack()
    change(model)
    with pytest.raises(error, match=match):
        model(x(5, 3, model.input_size))


def test_numpy_scalars_are_accepted_as_probabilities_like_torch():
    """A probability read from a config file as a numpy scalar: torch.nn takes it, so does StackedRNN."""
    numpy = pytest.importorskip("numpy")
    nn.LSTM(4, 6, num_layers=2, dropout=numpy.float32(0.25))
    model = stack(dropout=numpy.float32(0.25), weight_drop=numpy.float64(0.1))
    assert model.dropout == 0.25 and isinstance(model.dropout, float)
    with pytest.raises(ValueError, match="dropout should be a number"):
        stack(dropout=torch.tensor(0.25))  # a tensor is not a number here (nor in torch.nn)


def test_dropout_on_a_one_layer_stack_warns_like_torch():
    with pytest.warns(UserWarning, match="dropout after all but last recurrent layer"):
        nn.GRU(4, 6, num_layers=1, dropout=0.5)
    with pytest.warns(UserWarning, match="dropout after all but last recurrent layer"):
        stack([("gru", 6)], dropout=0.5)


@pytest.mark.parametrize(
    "triton_version, numpy_version, refused",
    [("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False), ("4.0.0", "2.4.0", False)],
)
def test_interpreter_refuses_triton_numpy_pair_that_fails(monkeypatch, triton_version, numpy_version, refused):
    """Triton <= 3.6's interpreter fails inside every kernel on numpy >= 2.4: a clear error up front instead."""
    import numpy
    import triton

    from tritonrnn import _plan

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    _plan.check_interpreter.cache_clear()
    try:
        if refused:
            with pytest.raises(RuntimeError, match="numpy<2.4 or triton>=3.7"):
                _plan.check_interpreter()
        else:
            _plan.check_interpreter()
    finally:
        _plan.check_interpreter.cache_clear()


def test_a_forced_persistent_grid_the_gpu_cannot_hold_is_refused(forced_plan, monkeypatch):
    """force_plan's persistent grids must be resident at once (else the grid barrier would wait for ever, or the
    cooperative launch fail with a CUDA error): both directions' grids count where they launch together."""
    from tritonrnn import _plan

    monkeypatch.setattr(_plan, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    for directions, together in ((1, True), (2, False)):  # H=1120: 70 programs a direction
        forced_plan(block_h=16, persistent=True, directions_together=together)
        plan = _plan.plan_layer("lstm", 1120, 16, torch.bfloat16, cuda, directions)
        assert plan.num_programs == 70 and plan.persistent
    forced_plan(block_h=16, persistent=True, directions_together=True)
    with pytest.raises(ValueError, match="a persistent grid of 140 programs would not all be resident"):
        _plan.plan_layer("lstm", 1120, 16, torch.bfloat16, cuda, 2)


def test_a_forced_persistent_grid_of_several_programs_is_refused_under_the_interpreter(forced_plan, monkeypatch):
    """Under the interpreter a launch's programs run one after another: a forced persistent grid of several programs
    would wait at its grid barrier for ever, unless the tests' concurrent interpreter runs them in threads."""
    from tritonrnn import _plan

    cpu = torch.device("cpu")
    forced_plan(block_h=16, persistent=True)
    assert _plan.plan_layer("gru", 16, 3, torch.float32, cpu).num_programs == 1  # one program: no barrier to wait at
    with pytest.raises(ValueError, match="a persistent grid of several programs deadlocks under the interpreter"):
        _plan.plan_layer("gru", 32, 3, torch.float32, cpu)
    monkeypatch.setattr(_plan, "PROGRAMS_AT_ONCE", True)
    assert _plan.plan_layer("gru", 32, 3, torch.float32, cpu).num_programs == 2
    monkeypatch.setattr(_plan, "PROGRAMS_AT_ONCE", False)
    forced_plan(block_h=16, persistent=False)
    assert _plan.plan_layer("gru", 32, 3, torch.float32, cpu).num_programs == 2


@pytest.mark.parametrize("registered", [False, True], ids=["unknown", "in-CELLS-without-math"])
def test_the_reference_refuses_an_unknown_cell(monkeypatch, registered):
    """A cell the reference has no math for raises, also one added to the kernels' table (CELLS) alone: it must not
    run with h left unchanged at every step."""
    from tritonrnn import _plan, reference

    if registered:
        monkeypatch.setitem(_plan.CELLS, "gruu", (3, 3, 4))
    weights = x(18, 4), x(18, 6), x(18), x(18)
    with pytest.raises(ValueError, match="unknown cell 'gruu'"):
        reference.layer_forward("gruu", x(5, 3, 4), x(3, 6), None, *weights)


def test_triton_interpret_set_after_import_runs_torchs_op_not_a_crash():
    """Triton makes a kernel interpreted or compiled where it is defined. TRITON_INTERPRET=1 set after tritonrnn's
    import used to send CPU tensors to compiled kernels ("0 active drivers"); the CPU runs torch's op then, as before
    it was set, and says it is not interpreting."""
    if torch.cuda.is_available():
        pytest.skip("the CPU answer only")
    import os
    import subprocess
    import sys

    script = (
        "import os, torch, tritonrnn\n"
        "from tritonrnn import _plan\n"
        "m, x = tritonrnn.GRU(3, 4), torch.randn(2, 2, 3)\n"
        "want = m(x)[0]\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "print(_plan.interpret_mode(), torch.equal(m(x)[0], want))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["False", "True"], result.stderr


def _functional_call(change=lambda args: None):
    """A valid functional.stack call (an LSTM layer both ways, then a GRU layer without biases), changed by
    ``change``, which edits the arguments dict in place."""

    def t(*shape):
        return torch.randn(*shape, device=DEVICE)

    lstm_dir = lambda: [t(16, 4), t(16, 4), t(16), t(16)]  # noqa: E731
    args = dict(
        x=t(5, 3, 4),
        layers=[
            StackLayer("lstm", [lstm_dir(), lstm_dir()]),
            StackLayer("gru", [[t(12, 8), t(12, 4), None, None]] * 2),
        ],
        h0=[t(2, 3, 4), t(2, 3, 4)],
        c0=[t(2, 3, 4), None],
    )
    change(args)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("x", "layers", "h0", "c0")}
    return tritonrnn.functional.stack(args["x"], args["layers"], args["h0"], args["c0"], **kwargs)


def _set(path, value):
    """A change that sets args[path[0]][path[1]]... to value."""

    def change(args):
        target = args
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "change,error,match",
    [
        pytest.param(_set(["x"], x(5, 4)), ValueError, r"x should be \[T, B, I\]", id="x-2d"),
        pytest.param(_set(["x"], x(0, 3, 4)), RuntimeError, "sequence length to be larger than 0", id="x-empty"),
        pytest.param(_set(["x"], x(5, 3, 4).to(torch.float64)), TypeError, "w_ih is torch.float32, x is torch.float64",
                     id="x-dtype"),
        pytest.param(_set(["layers", 1], ("gruu", None)), ValueError, r"layers\[1\]: unknown cell 'gruu'", id="cell"),
        pytest.param(_set(["layers", 0, 1, 0], x(16, 4)[:3]), TypeError, r"each direction is \(w_ih, w_hh, b_ih",
                     id="weights-short"),
        pytest.param(_set(["layers", 1, 1, 0, 1], x(12, 3)), RuntimeError,
                     r"w_hh has shape \(12, 3\), expected \(12, 4\)", id="w_hh-width"),
        pytest.param(_set(["layers", 1, 1, 0, 0], x(12, 4)), RuntimeError,
                     r"w_ih has shape \(12, 4\), expected \(12, 8\)", id="w_ih-chain"),
        pytest.param(_set(["layers", 0, 1, 1, 2], None), ValueError, "give both biases b_ih and b_hh, or neither",
                     id="one-bias"),
        pytest.param(_set(["layers", 0, 1, 1], [x(16, 4), x(16, 4), None, None]), ValueError,
                     "biases in one direction only", id="bias-one-direction"),
        pytest.param(_set(["layers", 1], StackLayer("gru", [[x(12, 8), x(12, 4), None, None]] * 3)), ValueError,
                     r"one weight tuple per direction \(1 or 2\), got 3", id="three-directions"),
        pytest.param(_set(["layers", 0], StackLayer("gru", [[x(16, 4), x(16, 4), x(16), x(16)]] * 2)), ValueError,
                     "w_hh has 16 rows, not a multiple of a gru's 3 gates", id="cell-of-other-weights"),
        pytest.param(_set(["layers", 1, 1, 0], [x(12, 8), x(12, 4), None, None, x(2, 4)]), ValueError,
                     "a w_hr .projection. is for LSTM layers only", id="w_hr-on-gru"),
        pytest.param(_set(["c0", 0], None), TypeError, r"c0\[0\] should be a Tensor", id="lstm-c0-none"),
        pytest.param(_set(["c0", 1], x(2, 3, 4)), ValueError, r"c0\[1\] should be None: layer 1 is gru", id="gru-c0"),
        pytest.param(_set(["c0", 0], x(2, 3, 2)), RuntimeError, r"c0\[0\] has shape \(2, 3, 2\), expected \(2, 3, 4\)",
                     id="c0-size"),
        pytest.param(_set(["h0", 1], x(2, 2, 4)), RuntimeError, r"h0\[1\] has shape \(2, 2, 4\)", id="h0-batch"),
        pytest.param(_set(["h0"], [x(2, 3, 4)]), ValueError, "h0 has 1 entries for 2 layers", id="h0-short"),
        pytest.param(_set(["lengths"], torch.tensor([2], device=DEVICE)), ValueError,
                     r"lengths has shape \(1,\), expected \(3,\)", id="lengths-short"),
        pytest.param(_set(["lengths"], torch.tensor([2, 6, 1], device=DEVICE)), ValueError,
                     r"lengths should be in \[0, T=5\], got values in \[1, 6\]", id="lengths-beyond-t"),
        pytest.param(_set(["lengths"], torch.tensor([2.0, 1.0, 1.0], device=DEVICE)), TypeError,
                     "lengths should be integers", id="lengths-float"),
        pytest.param(_set(["residual"], True), ValueError, r"residual=True: layers\[1\] reads 8 features but outputs 8|"
                     r"residual=True: layers\[0\] reads 4 features but outputs 8", id="residual-width"),
        pytest.param(_set(["dropout_mode"], "Variational"), ValueError, "dropout_mode should be one of", id="mode"),
        pytest.param(_set(["dropout"], 1.5), ValueError, r"dropout should be a number in \[0, 1\]", id="dropout"),
        pytest.param(_set(["held_masks"], {}), TypeError, "held_masks should be a tritonrnn.dropout.HeldMasks",
                     id="held-masks"),
    ],
)  # fmt: skip
def test_functional_stack_checks_its_arguments(change, error, match):
    """functional.stack takes plain tensors: a shape that does not fit was read out of bounds (a crash, glibc's
    "corrupted size", or a silently wrong answer: a strided or short lengths, one bias dropped, an LSTM's c0 taken
    from h0); now each is a clear error naming the argument. The valid call runs."""
    _functional_call()
    with pytest.raises(error, match=match):
        _functional_call(change)
