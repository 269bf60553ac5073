"""Bad input raises a Python exception that names the problem, as torch.nn does."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import tritonrnn


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
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()
