"""Truncated BPTT tools (tritonrnn/tbptt.py): masks held from chunk to chunk, and detaching nested states.

A long batch run in chunks inside ``hold_dropout_masks`` must equal one call over the whole sequence with the
same masks: outputs, final states and every gradient. Run on the kernels (under the interpreter without a GPU)
and on torch's CPU op (CPU tensors without the interpreter).
"""

from __future__ import annotations

import collections
import copy
import threading

import pytest
import torch
from conftest import DEVICE
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import tritonrnn
from tritonrnn import dropout as _dropout
from tritonrnn import functional
from tritonrnn.scheduler import StackLayer

PATHS = ["kernels", "cpu op"]


def dtype_on(device: torch.device) -> torch.dtype:
    """float64 where the path runs it (the CPU paths), else float32 (the kernels on a GPU have no float64)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def close(actual, expected):
    """Bit-level agreement is not promised on a GPU: cuBLAS may pick another GEMM for a chunk's input projection than
    for the whole sequence's, so float32 gets its default tolerance scaled by 10 for the recurrence to carry."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1.3e-5, atol=1e-4)
    else:
        torch.testing.assert_close(actual, expected)


@pytest.fixture(params=PATHS)
def device(request, monkeypatch):
    """Where the models run: the kernels (the GPU, or the CPU under the interpreter), or torch's CPU op."""
    if request.param == "cpu op":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return torch.device("cpu")
    return DEVICE


def stack_model(device):
    torch.manual_seed(1)
    layers = [("lstm", 6), ("gru", 5), ("rnn_tanh", 5)]
    model = tritonrnn.StackedRNN(4, layers, dropout=0.4, dropout_mode="variational", weight_drop=0.3)
    return model.to(device, dtype_on(device))


def lstm_model(device):
    torch.manual_seed(2)
    model = tritonrnn.LSTM(4, 5, num_layers=3, dropout=0.4, dropout_mode="variational", batch_first=True)
    return model.to(device, dtype_on(device))


MODELS = {"StackedRNN": (stack_model, False), "LSTM": (lstm_model, True)}


def flatten(state) -> list[torch.Tensor]:
    """The tensors of a state (a tensor, an LSTM's (h, c) or a StackedRNN's list of them), in order."""
    return [state] if isinstance(state, torch.Tensor) else [t for s in state for t in flatten(s)]


def run_chunks(model, x, sizes, batch_first):
    """Forward over chunks of ``sizes`` steps with the state carried (the graph kept, so gradients reach every
    chunk); returns the whole output, the final state and the gradients of a loss on both."""
    inputs = x.detach().clone().requires_grad_()
    state, outputs = None, []
    for chunk in inputs.split(sizes, dim=1 if batch_first else 0):
        out, state = model(chunk, state)
        outputs.append(out)
    out = torch.cat(outputs, dim=1 if batch_first else 0)
    flat = flatten(state)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    loss = (out * weights).sum() + sum((t * t).sum() for t in flat)
    grads = torch.autograd.grad(loss, [inputs, *model.parameters()])
    return out.detach(), [t.detach() for t in flat], grads


@pytest.mark.parametrize("name", MODELS)
def test_chunks_in_a_hold_equal_one_call(device, name):
    """Inside the block, a sequence run in three chunks (7 = 3 + 3 + 1 steps) gives the output, final states and
    gradients (input and every parameter) of the one call over all 7 steps that drew the masks."""
    make, batch_first = MODELS[name]
    model = make(device).train()
    x = torch.randn(3, 7, 4, dtype=dtype_on(device), device=device)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    with tritonrnn.hold_dropout_masks(model):
        whole = run_chunks(model, x, [7], batch_first)
        chunked = run_chunks(model, x, [3, 3, 1], batch_first)
    close(chunked[0], whole[0])
    for actual, expected in zip(chunked[1] + list(chunked[2]), whole[1] + list(whole[2])):
        close(actual, expected)
    # The masks were applied: in eval mode (no dropout) the output is another.
    with torch.no_grad():
        plain = model.eval()(x)[0]
    assert not torch.allclose(plain, whole[0])


@pytest.mark.parametrize("name", MODELS)
def test_without_a_hold_every_call_draws_new_masks(device, name):
    make, batch_first = MODELS[name]
    model = make(device).train()
    x = torch.randn(3, 7, 4, dtype=dtype_on(device), device=device)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    assert not torch.allclose(run_chunks(model, x, [7], batch_first)[0], run_chunks(model, x, [3, 4], batch_first)[0])
    assert not hasattr(model, "_held_masks")


def test_standard_dropout_is_not_held(device):
    """Standard dropout draws per step: inside the block two calls on the same input still differ."""
    torch.manual_seed(3)
    model = tritonrnn.GRU(4, 5, num_layers=2, dropout=0.5).to(device, dtype_on(device))
    x = torch.randn(6, 2, 4, dtype=dtype_on(device), device=device)
    with tritonrnn.hold_dropout_masks(model), torch.no_grad():
        assert not torch.allclose(model(x)[0], model(x)[0])


def test_a_held_dropconnect_mask_is_applied_to_w_hh(device):
    """The held DropConnect mask: zeros and 1 / (1 - p) in about the proportion p, and the layer runs with W_hh times
    it (a torch.nn RNN given that weight gives the same output) in every call of the block."""
    torch.manual_seed(5)
    model = tritonrnn.StackedRNN(3, [("rnn_tanh", 40)], weight_drop=0.5).to(device, dtype_on(device)).train()
    layer = model.layers[0]
    x = torch.randn(4, 2, 3, dtype=dtype_on(device), device=device)
    with tritonrnn.hold_dropout_masks(model), torch.no_grad():
        first = model(x)[0]
        (mask,) = model._held_masks._weight_masks.values()
        assert set(mask.unique().tolist()) == {0.0, 2.0} and 0.4 < (mask == 0).double().mean() < 0.6
        plain = nn.RNN(3, 40).to(device, dtype_on(device))
        plain.load_state_dict({"weight_ih_l0": layer.weight_ih, "weight_hh_l0": layer.weight_hh * mask,
                               "bias_ih_l0": layer.bias_ih, "bias_hh_l0": layer.bias_hh})  # fmt: skip
        close(first, plain(x)[0])
        torch.testing.assert_close(model(x)[0], first)


def test_each_layer_holds_its_own_dropconnect_mask_at_its_own_p(device):
    """Layers of one W_hh shape hold a mask each (not one shared); a weight_drop changed inside the block draws a mask
    at the new p (scaled 1 / (1 - p)), not the old one's."""
    torch.manual_seed(6)
    model = tritonrnn.StackedRNN(8, [("rnn_tanh", 8)] * 2, weight_drop=0.2).to(device, dtype_on(device)).train()
    x = torch.randn(3, 2, 8, dtype=dtype_on(device), device=device)
    with tritonrnn.hold_dropout_masks(model), torch.no_grad():
        model(x)
        masks = list(model._held_masks._weight_masks.values())
        assert len(masks) == 2 and not torch.equal(*masks)
        model.weight_drop = 0.5
        model(x)
        new = [m for m in model._held_masks._weight_masks.values() if not any(m is old for old in masks)]
        assert len(new) == 2 and all(set(m.unique().tolist()) == {0.0, 2.0} for m in new)


def test_a_held_mask_refuses_another_batch(device):
    model = lstm_model(device).train()
    with tritonrnn.hold_dropout_masks(model):
        model(torch.randn(3, 5, 4, dtype=dtype_on(device), device=device))
        with torch.no_grad():
            model.eval()(torch.randn(2, 5, 4, dtype=dtype_on(device), device=device))  # eval: no masks, any batch
        with pytest.raises(ValueError, match="batch of 3 sequences, this call has 2"):
            model.train()(torch.randn(2, 5, 4, dtype=dtype_on(device), device=device))


def test_data_parallel_replicas_hold_a_batch_and_masks_per_device(monkeypatch):
    """nn.DataParallel shares the store between its replicas (it copies a module's attributes), one a GPU with its
    part of the batch, each called from its own thread: 5 sequences over two GPUs are 3 and 2. Each device holds its
    own batch size and seeds; another batch on the same device is still refused."""
    monkeypatch.setattr(_dropout, "_refuse_capture", lambda device: None)
    monkeypatch.setattr(_dropout, "draw", lambda p, mode, device: _dropout.LayerDropout(p, True, torch.tensor([id(p)])))
    held = _dropout.HeldMasks()
    parts = [(torch.device("cuda", 0), 3), (torch.device("cuda", 1), 2)]
    first = [held.layer_dropout(0, 0.3, device, batch) for device, batch in parts]
    again = [held.layer_dropout(0, 0.3, device, batch) for device, batch in parts]
    assert all(a.seed is b.seed for a, b in zip(first, again)) and first[0].seed is not first[1].seed
    with pytest.raises(ValueError, match="batch of 3 sequences, this call has 2"):
        held.layer_dropout(0, 0.3, torch.device("cuda", 0), 2)


def test_blocks_nest_and_submodules_are_held():
    """A model holding a StackedRNN: the inner block draws its own masks, leaving it gives the outer block's back,
    and leaving the outer block returns to a draw per call."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = stack_model(DEVICE)

        def forward(self, x):
            return self.rnn(x)[0]

    model = Wrapper().train()
    x = torch.randn(5, 2, 4, dtype=dtype_on(DEVICE), device=DEVICE)
    with torch.no_grad(), tritonrnn.hold_dropout_masks(model):
        outer = model(x)
        with tritonrnn.hold_dropout_masks(model.rnn):
            inner = model(x)
            torch.testing.assert_close(model(x), inner)
        assert not torch.allclose(inner, outer)
        torch.testing.assert_close(model(x), outer)
    assert not hasattr(model.rnn, "_held_masks")
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_a_copy_made_in_a_block_holds_nothing(tmp_path):
    """A deep copy or a saved and loaded model (an EMA copy, a checkpoint) made inside the block is not in it."""
    model = stack_model(DEVICE).train()
    x = torch.randn(5, 2, 4, dtype=dtype_on(DEVICE), device=DEVICE)
    with tritonrnn.hold_dropout_masks(model), torch.no_grad():
        torch.save(model, tmp_path / "model.pt")
        copies = [copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)]
        torch.testing.assert_close(model(x)[0], model(x)[0])
    for other in copies:
        with torch.no_grad():
            assert not torch.allclose(other(x)[0], other(x)[0])


def test_functional_stack_takes_a_store():
    """functional.stack with one HeldMasks over two calls: the second chunk continues the first, as one call."""
    torch.manual_seed(4)

    def gru(inputs):
        return StackLayer("gru", ((torch.randn(9, inputs), torch.randn(9, 3), torch.randn(9), torch.randn(9)),))

    layers = [StackLayer(layer.cell, tuple(tuple(w.to(DEVICE) for w in d) for d in layer.weights))
              for layer in (gru(4), gru(3))]  # fmt: skip
    x = torch.randn(6, 2, 4, device=DEVICE)
    h0 = [torch.zeros(1, 2, 3, device=DEVICE)] * 2
    kwargs = dict(dropout=0.5, dropout_mode="variational", training=True, held_masks=_dropout.HeldMasks())
    whole, h_whole, _ = functional.stack(x, layers, h0, [None, None], **kwargs)
    first, h_first, _ = functional.stack(x[:2], layers, h0, [None, None], **kwargs)
    second, h_second, _ = functional.stack(x[2:], layers, h_first, [None, None], **kwargs)
    close(torch.cat([first[-1], second[-1]]), whole[-1])
    for actual, expected in zip(h_second, h_whole):
        close(actual, expected)


def test_hold_refuses_a_model_without_tritonrnn_modules():
    with pytest.raises(ValueError, match="contains no tritonrnn module"):
        with tritonrnn.hold_dropout_masks(nn.LSTM(3, 4)):
            pass
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        with tritonrnn.hold_dropout_masks([tritonrnn.LSTM(3, 4)]):
            pass


def test_detach_states_keeps_the_structure():
    a, b, c = (torch.randn(2, requires_grad=True) * 2 for _ in range(3))
    states = [(a, b), c]
    detached = tritonrnn.detach_states(states)
    assert isinstance(detached, list) and isinstance(detached[0], tuple)
    for got, want in zip([*detached[0], detached[1]], [a, b, c]):
        assert not got.requires_grad and torch.equal(got, want)
    assert tritonrnn.detach_states(None) is None
    with pytest.raises(TypeError, match="expected a tensor"):
        tritonrnn.detach_states({"h": a})
    # A namedtuple keeps its type and fields (it was built from one generator); a PackedSequence is an output,
    # not a state (it was an AssertionError).
    State = collections.namedtuple("State", ["h", "c"])
    detached = tritonrnn.detach_states(State(a, b))
    assert type(detached) is State and not detached.c.requires_grad and torch.equal(detached.h, a)
    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    with pytest.raises(TypeError, match="expected a tensor, or a tuple or list of them .or None., got PackedSequence"):
        tritonrnn.detach_states(packed)


def test_blocks_of_two_threads_on_one_model_are_refused():
    """The held masks live on the modules: a block entered by a second thread while the first's is open, left in the
    other order, restored the first's masks for good (later calls outside any block kept them). Refused now; blocks
    in one thread nest, and the model is free again once the first block is left."""
    model = tritonrnn.StackedRNN(3, [("lstm", 4), ("lstm", 4)], dropout=0.5, dropout_mode="variational")
    errors = []

    def second_block():
        try:
            with tritonrnn.hold_dropout_masks(model):
                pass
        except RuntimeError as error:
            errors.append(str(error))

    with tritonrnn.hold_dropout_masks(model):
        thread = threading.Thread(target=second_block)
        thread.start()
        thread.join()
        with tritonrnn.hold_dropout_masks(model):  # nested in the same thread
            pass
    assert len(errors) == 1 and "held by a block in another thread" in errors[0]
    assert "_held_masks" not in model.__dict__
    thread = threading.Thread(target=second_block)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "_held_masks" not in model.__dict__
