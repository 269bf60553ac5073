"""StackedRNN and the stack scheduler: mixed cells, inter-layer dropout, weight drop, residual, all-layer outputs.

The kernels (interpreter on CPU, real on GPU) run the stack; the expected values come from a composition
written here of ``reference.layer_forward`` (one direction of one layer), with the dropout masks the
kernels draw materialised by ``tritonrnn.dropout.mask``. Everything in float64 unless said otherwise.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl
from conftest import DEVICE
from helpers import TOLERANCE, CountCalls, composed_reference, flat, loss_weights, random_hx, rel_err, run, states_to
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tritonrnn
from tritonrnn import _plan, functional, layer_run, reference, scheduler, wavefront
from tritonrnn import dropout as tdropout

MIXED = [("lstm", 5), ("gru", 4), ("rnn_tanh", 6), ("rnn_relu", 3)]
real_layer = functional._layer  # the layer-by-layer path, for tests that forbid it in one run and need it in another
# What the kernels themselves run in here: float64 under the interpreter; on a GPU (which has no float64 kernels)
# IEEE float32, with its tolerance.
KERNEL_DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32


def make_stack(layers, input_size=3, seed=0, **kwargs) -> tritonrnn.StackedRNN:
    torch.manual_seed(seed)
    return tritonrnn.StackedRNN(input_size, layers, **kwargs).double().to(DEVICE)


def random_states(model, batch, generator):
    states = []
    D = 2 if model.bidirectional else 1
    for layer in model.layers:
        h = torch.randn(D, batch, layer.hidden_size, dtype=torch.float64, generator=generator).to(DEVICE)
        c = torch.randn(D, batch, layer.hidden_size, dtype=torch.float64, generator=generator).to(DEVICE)
        states.append((h, c) if layer.cell == "lstm" else h)
    return states


def stack_training_step(model, x) -> list[torch.Tensor]:
    """Every layer's output, the final states and every gradient of one training step (dropout seed fixed)."""
    xr = x.clone().requires_grad_()
    torch.manual_seed(1)
    outs, states = model(xr, return_all_layers=True)
    loss = sum((o * o.detach().cos()).sum() for o in outs) + sum(t.sum() for t in flat(states))
    return [*outs, *flat(states), *torch.autograd.grad(loss, [xr, *model.parameters()])]


def assert_matches(model, x, states, expected_fn, return_all=True):
    """Outputs, final states and the gradients of x, the initial states and every parameter, vs expected_fn."""
    x = x.detach().clone().requires_grad_()
    states = [tuple(t.detach().clone().requires_grad_() for t in s) if isinstance(s, tuple)
              else s.detach().clone().requires_grad_() for s in states]  # fmt: skip
    leaves = [x, *flat(states), *model.parameters()]
    outs, finals = model(x, states, return_all_layers=return_all)
    outs = outs if return_all else [outs]
    ref_outs, ref_finals = expected_fn(x, states)
    ref_outs = ref_outs if return_all else ref_outs[-1:]
    gen = torch.Generator().manual_seed(99)
    cotangents = [torch.randn(t.shape, dtype=torch.float64, generator=gen).to(DEVICE) for t in outs + flat(finals)]

    def loss(tensors):
        return sum((t * w).sum() for t, w in zip(tensors, cotangents))

    grads = torch.autograd.grad(loss(outs + flat(finals)), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(loss(ref_outs + flat(ref_finals)), leaves, allow_unused=True)
    tol = TOLERANCE[torch.float64]
    for k, (a, b) in enumerate(zip(outs + flat(finals), ref_outs + flat(ref_finals))):
        assert a.shape == b.shape and rel_err(a, b) < tol, k
    names = ["x", *[f"state{k}" for k in range(len(flat(states)))], *[n for n, _ in model.named_parameters()]]
    for name, a, b in zip(names, grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) < tol, name


# --- mixed stacks, all-layer outputs, residual, bidirectional --------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_mixed_stack_matches_a_composition_of_reference_layers(bidirectional):
    gen = torch.Generator().manual_seed(1)
    model = make_stack(MIXED, bidirectional=bidirectional)
    x = torch.randn(6, 4, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 4, gen)
    assert_matches(model, x, states, lambda x, s: composed_reference(model, x, s))


def test_all_layer_outputs_and_residual():
    gen = torch.Generator().manual_seed(2)
    model = make_stack([("gru", 6), ("lstm", 6), ("rnn_tanh", 6)], input_size=6, residual=True)
    x = torch.randn(5, 3, 6, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 3, gen)
    assert_matches(model, x, states, lambda x, s: composed_reference(model, x, s))
    outs, _ = model(x, states, return_all_layers=True)
    top, _ = model(x, states)
    assert len(outs) == 3 and torch.equal(outs[-1], top)


def test_bidirectional_residual_stack():
    gen = torch.Generator().manual_seed(3)
    model = make_stack([("lstm", 4), ("gru", 4)], input_size=8, residual=True, bidirectional=True)
    x = torch.randn(4, 2, 8, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 2, gen)
    assert_matches(model, x, states, lambda x, s: composed_reference(model, x, s))


def test_batch_first_unbatched_and_default_states():
    model = make_stack(MIXED[:2], batch_first=True, bidirectional=True)
    x = torch.randn(3, 5, 3, dtype=torch.float64, device=DEVICE)
    out, states = model(x)
    zeros = [(torch.zeros(2, 3, 5, dtype=torch.float64, device=DEVICE),) * 2,
             torch.zeros(2, 3, 4, dtype=torch.float64, device=DEVICE)]  # fmt: skip
    ref, ref_states = composed_reference(model, x.transpose(0, 1), zeros)
    torch.testing.assert_close(out, ref[-1].transpose(0, 1))
    assert out.shape == (3, 5, 8) and states[0][0].shape == (2, 3, 5) and states[1].shape == (2, 3, 4)
    single, single_states = model(x[1])  # unbatched [T, F]
    torch.testing.assert_close(single, out[1])
    assert single_states[0][1].shape == (2, 5)
    torch.testing.assert_close(single_states[1], states[1][:, 1])


def stack_state_from_torch(module: nn.RNNBase) -> dict[str, torch.Tensor]:
    """A torch.nn module's state_dict under StackedRNN's names: weight_ih_l{k}[_reverse] -> layers.{k}.weight_ih..."""
    renamed = {}
    for name, value in module.state_dict().items():
        base, rest = name.rsplit("_l", 1)
        k, _, reverse = rest.partition("_")
        renamed[f"layers.{k}.{base}{'_' + reverse if reverse else ''}"] = value
    return renamed


def test_state_dict_names_and_torch_checkpoint():
    """Parameter names are documented; a torch.nn.LSTM checkpoint loads by renaming weight_ih_l{k} -> layers.{k}."""
    model = tritonrnn.StackedRNN(3, [("lstm", 5), ("lstm", 5)], bidirectional=True).double()
    assert "layers.1.weight_hh_reverse" in model.state_dict()
    torch.manual_seed(0)
    theirs = nn.LSTM(3, 5, num_layers=2, bidirectional=True).double()
    model.load_state_dict(stack_state_from_torch(theirs), strict=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    out, states = model.to(DEVICE)(x.to(DEVICE))
    ref, (h, c) = theirs(x)
    torch.testing.assert_close(out.cpu(), ref)
    torch.testing.assert_close(torch.cat([s[1] for s in states]).cpu(), c)


def test_initialisation_like_torch():
    model = tritonrnn.StackedRNN(3, [("gru", 16)])
    bound = 1 / 16**0.5
    for p in model.parameters():
        assert p.abs().max() <= bound and p.std() > bound / 4


# --- dropout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpreter", ["kernels", "torch"] if DEVICE.type == "cpu" else ["kernels"])
@pytest.mark.parametrize("p", [0.3, 0.7])
@pytest.mark.parametrize("mode", ["standard", "variational"])
def test_mask_keep_rate_and_scale(p, mode, interpreter, monkeypatch):
    """Kept elements are scaled by 1/(1-p); the keep rate is 1-p within 5 binomial standard deviations. On the CPU
    also without the interpreter (torch's generator: plain CPU training, ONNX export, vmap)."""
    if interpreter == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    drop = tdropout.draw(p, mode, DEVICE)
    mask = tdropout.mask(drop, 8, 64, 100, DEVICE).cpu()
    assert mask.shape == ((1 if mode == "variational" else 8), 64, 100)
    scale = torch.tensor(1.0, dtype=torch.float32) / (1 - torch.tensor(p, dtype=torch.float32))
    assert torch.all((mask == 0) | (mask == scale))
    kept = (mask != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p)) / mask.numel()) ** 0.5


def test_masks_standard_fresh_per_step_variational_constant_over_time():
    standard = tdropout.mask(tdropout.draw(0.5, "standard", DEVICE), 6, 16, 32, DEVICE)
    assert not torch.equal(standard[0], standard[1])
    # Each (step, row) its own draws: with offsets that ran into each other's, row b at step t + 1 would repeat row
    # b + 1 at step t. Independent halves agree about half the time.
    assert (standard[1:, :-1] == standard[:-1, 1:]).float().mean() < 0.75
    variational = tdropout.mask(tdropout.draw(0.5, "variational", DEVICE), 6, 16, 32, DEVICE)
    assert variational.shape[0] == 1  # never a [T, B, H] mask
    rows = variational[0]
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]  # different across sequences
    assert 0 < (rows != 0).sum() < rows.numel()


def test_kernels_read_the_seed_when_they_run():
    """The seed lives in a device tensor the kernels read at run time (a replayed CUDA graph draws a new one into
    it), not a launch argument fixed when the call was made or captured."""
    drop = tdropout.draw(0.5, "standard", DEVICE)
    before = tdropout.mask(drop, 3, 4, 32, DEVICE)
    drop.seed.add_(1)
    after = tdropout.mask(drop, 3, 4, 32, DEVICE)
    assert not torch.equal(before, after)
    again = tdropout.LayerDropout(0.5, False, drop.seed.clone())
    assert torch.equal(after, tdropout.mask(again, 3, 4, 32, DEVICE))


@pytest.mark.parametrize("mode", ["standard", "variational"])
def test_kernels_apply_the_materialised_mask(mode):
    """The next layer's input the kernel writes is exactly y * mask (both directions, residual on)."""
    torch.manual_seed(0)
    T, B, H = 5, 3, 4
    x = torch.randn(T, B, 2 * H, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(2, B, H, dtype=torch.float64, device=DEVICE)
    layer = tritonrnn.StackedRNN(2 * H, [("gru", H)], bidirectional=True).double().to(DEVICE).layers[0]
    drop = tdropout.draw(0.4, mode, DEVICE)
    y, z, _, _ = functional._layer("gru", x, h0, None, layer(weight_drop=0.0, training=False).weights, True, drop)
    expected = y * tdropout.mask(drop, T, B, 2 * H, DEVICE).double()
    assert torch.equal(z, expected)
    ry, rz, _, _ = reference.layer("gru", x, h0, None, layer(weight_drop=0.0, training=False).weights, True, drop)
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, rz, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["standard", "variational"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_dropout_stack_gradients_under_the_same_masks(mode, bidirectional):
    """Training mode: outputs, states and every gradient equal the composition applying the same masks."""
    gen = torch.Generator().manual_seed(4)
    model = make_stack(MIXED, dropout=0.4, dropout_mode=mode, bidirectional=bidirectional)
    x = torch.randn(5, 3, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 3, gen)

    def expected(x, states):
        torch.manual_seed(7)  # the seeds the model drew: one per inter-layer dropout, bottom first
        draws = [tdropout.draw(0.4, mode, DEVICE) for _ in model.layers[:-1]]
        widths = [layer.directions * layer.hidden_size for layer in model.layers]
        masks = [tdropout.mask(d, 5, 3, w, DEVICE).double() for d, w in zip(draws, widths)] + [None]
        return composed_reference(model, x, states, masks)

    torch.manual_seed(7)
    assert_matches(model, x, states, expected)


def test_same_seed_same_masks_eval_mode_no_dropout():
    model = make_stack([("lstm", 8), ("lstm", 8), ("gru", 8)], dropout=0.5)
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(1)
    a, _ = model(x)
    torch.manual_seed(1)
    b, _ = model(x)
    c, _ = model(x)  # the generator moved on: other masks
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    plain = make_stack([("lstm", 8), ("lstm", 8), ("gru", 8)])
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x)[0], plain(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["standard", "variational"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
def test_dropout_saves_one_seed_per_layer_and_no_mask(mode, bidirectional):
    """The masks are drawn again in backward from their seed: a training step with dropout saves for backward what
    the same step without dropout saves, plus one [1] int64 seed per layer that has dropout after it (no [T, B, H]
    mask, no second copy of a layer's output)."""
    layers = [("lstm", 5), ("gru", 4), ("lstm", 3)]

    def saved_for_backward(model):
        saved = []
        x = torch.randn(6, 2, 3, dtype=KERNEL_DTYPE, device=DEVICE, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                      lambda t: t):  # fmt: skip
            model(x)
        return sorted(saved, key=str)

    kwargs = dict(bidirectional=bidirectional, dropout_mode=mode)
    plain = saved_for_backward(make_stack(layers, **kwargs).to(KERNEL_DTYPE))
    dropped = saved_for_backward(make_stack(layers, dropout=0.3, **kwargs).to(KERNEL_DTYPE).train())
    seeds = [((1,), torch.int64)] * (len(layers) - 1)
    assert dropped == sorted(plain + seeds, key=str)
    module = tritonrnn.LSTM(3, 5, num_layers=3, dropout=0.3, **kwargs).to(DEVICE, KERNEL_DTYPE)
    assert saved_for_backward(module.train()) == sorted(saved_for_backward(module.eval()) + seeds, key=str)


def test_no_dropout_after_the_last_layer():
    """A one-layer stack in training with dropout = 0.9 is deterministic: nothing follows the last layer."""
    model = make_stack([("gru", 6)], dropout=0.9)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(model(x)[0], composed_reference(model, x, random_states_zero(model, 2))[0][-1])


def random_states_zero(model, batch):
    D = 2 if model.bidirectional else 1
    return [(torch.zeros(D, batch, layer.hidden_size, dtype=torch.float64, device=DEVICE),) * 2
            if layer.cell == "lstm" else torch.zeros(D, batch, layer.hidden_size, dtype=torch.float64, device=DEVICE)
            for layer in model.layers]  # fmt: skip


@pytest.mark.parametrize("mode", ["standard", "variational"])
def test_torch_modules_train_with_dropout_on_the_kernels(mode):
    """tritonrnn.LSTM with dropout in training equals torch.nn.LSTM's math under the masks the kernels drew."""
    torch.manual_seed(0)
    ours = tritonrnn.LSTM(3, 5, num_layers=3, dropout=0.3, dropout_mode=mode).double().to(DEVICE)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.manual_seed(11)
    out, (h, c) = ours(x)
    torch.manual_seed(11)
    masks = [tdropout.mask(tdropout.draw(0.3, mode, DEVICE), 4, 2, 5, DEVICE).double() for _ in range(2)]
    ref, layer_in = None, x
    for k in range(3):
        ws = [getattr(ours, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        zeros = torch.zeros(2, 5, dtype=torch.float64, device=DEVICE)
        ref, _, _ = reference.layer_forward("lstm", layer_in, zeros, zeros, *ws)
        layer_in = ref * masks[k] if k < 2 else ref
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = list(ours.parameters())
    grads = torch.autograd.grad(out.sum(), [x, *params])
    ref_grads = torch.autograd.grad(ref.sum(), [x, *params])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- weight drop -----------------------------------------------------------------------------------


def test_weight_drop_gradients_reach_the_raw_weights():
    gen = torch.Generator().manual_seed(5)
    model = make_stack([("lstm", 6), ("gru", 5)], weight_drop=0.5, bidirectional=True)
    x = torch.randn(4, 3, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 3, gen)

    def expected(x, states):
        torch.manual_seed(8)  # one DropConnect mask per W_hh and call, layers bottom first, forward direction first
        w_hh = [[F.dropout(getattr(layer, f"weight_hh{s}"), 0.5) for s in layer.suffixes] for layer in model.layers]
        return composed_reference(model, x, states, w_hh=w_hh)

    torch.manual_seed(8)
    assert_matches(model, x, states, expected)
    model.eval()  # no weight drop outside training
    torch.testing.assert_close(model(x, states)[0], composed_reference(model, x, states)[0][-1])


def test_weight_drop_draws_a_new_mask_per_call():
    model = make_stack([("rnn_tanh", 8)], weight_drop=0.5)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=DEVICE)
    assert not torch.equal(model(x)[0], model(x)[0])


# --- precision and plans -----------------------------------------------------------------------------


def test_mixed_bfloat16_stack_against_float64():
    gen = torch.Generator().manual_seed(6)
    model = make_stack([("lstm", 24), ("gru", 24)], input_size=8, dropout=0.3, dropout_mode="variational")
    x = torch.randn(9, 4, 8, dtype=torch.float64, generator=gen).to(DEVICE)
    torch.manual_seed(3)
    exact, _ = model(x)
    low = tritonrnn.StackedRNN(8, [("lstm", 24), ("gru", 24)], dropout=0.3, dropout_mode="variational")
    low = low.to(device=DEVICE, dtype=torch.bfloat16)
    low.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    out, _ = low(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, exact) < TOLERANCE[torch.bfloat16]


def test_split_grid_stack(forced_plan):
    forced_plan(block_h=16, persistent=False, directions_together=False)
    gen = torch.Generator().manual_seed(7)
    model = make_stack([("lstm", 20), ("gru", 33)], dropout=0.2, bidirectional=True)
    x = torch.randn(3, 2, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 2, gen)

    def expected(x, states):
        torch.manual_seed(9)
        masks = [tdropout.mask(tdropout.draw(0.2, "standard", DEVICE), 3, 2, 40, DEVICE).double(), None]
        return composed_reference(model, x, states, masks)

    torch.manual_seed(9)
    assert_matches(model, x, states, expected)


def test_autocast_runs_in_the_autocast_dtype():
    model = tritonrnn.StackedRNN(4, [("gru", 8)]).to(DEVICE)
    x = torch.randn(3, 2, 4, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, states = model(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, model(x)[0]) < TOLERANCE[torch.bfloat16]


# --- layer wavefront ---------------------------------------------------------------------------------


def run_all(model, x, states, seed=1):
    """Every output, final state and gradient (x, initial states, parameters) of one training call."""
    x = x.detach().clone().requires_grad_()
    states = [tuple(t.detach().clone().requires_grad_() for t in s) if isinstance(s, tuple)
              else s.detach().clone().requires_grad_() for s in states]  # fmt: skip
    torch.manual_seed(seed)
    outs, finals = model(x, states, return_all_layers=True)
    gen = torch.Generator().manual_seed(5)
    tensors = outs + flat(finals)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=gen).to(DEVICE)).sum() for t in tensors)
    grads = torch.autograd.grad(loss, [x, *flat(states), *model.parameters()])
    return [t.detach() for t in tensors] + list(grads)


@pytest.mark.parametrize("chunk", [2, 3])
@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(dropout=0.3), id="dropout"),
        pytest.param(dict(dropout=0.3, dropout_mode="variational"), id="variational"),
        pytest.param(dict(residual=True), id="residual"),
    ],
)
def test_wavefront_equals_layer_by_layer(chunk, options, monkeypatch):
    """Chunks of layers interleaved in time give what whole layers give: outputs, states, every gradient."""
    gen = torch.Generator().manual_seed(8)
    layers = [("lstm", 6), ("gru", 6), ("rnn_relu", 6)] if options.get("residual") else MIXED
    model = make_stack(layers, input_size=6 if options.get("residual") else 3, **options).to(KERNEL_DTYPE)
    x = torch.randn(7, 3, model.input_size, dtype=torch.float64, generator=gen).to(DEVICE, KERNEL_DTYPE)
    states = [tuple(t.to(KERNEL_DTYPE) for t in s) if isinstance(s, tuple) else s.to(KERNEL_DTYPE)
              for s in random_states(model, 3, gen)]  # fmt: skip
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "0")
    expected = run_all(model, x, states)
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", str(chunk))
    monkeypatch.setattr(functional, "_layer", None)  # the layer-by-layer path must not be taken
    actual = run_all(model, x, states)
    for k, (a, b) in enumerate(zip(actual, expected)):
        # float64: the same arithmetic; float32 (GPU): the input GEMM over chunks rounds unlike one GEMM.
        assert a.shape == b.shape and rel_err(a, b) < (1e-12 if KERNEL_DTYPE == torch.float64 else 1e-5), k


def test_wavefront_backward_forms_each_layers_weight_gradients_once(monkeypatch):
    """The GEMMs and reductions that give a layer's weight gradients run once per layer and backward."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "2")
    calls = []
    real = wavefront.LayerRun.grads

    def counted(self):
        calls.append(id(self))
        return real(self)

    monkeypatch.setattr(wavefront.LayerRun, "grads", counted)
    model = make_stack(MIXED, input_size=3).to(KERNEL_DTYPE)
    x = torch.randn(5, 2, 3, device=DEVICE, dtype=KERNEL_DTYPE, requires_grad=True)
    model(x)[0].sum().backward()
    assert len(calls) == len(MIXED) == len(set(calls))


def test_wavefront_lstm_module_with_projection_matches_torch(monkeypatch):
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "2")
    monkeypatch.setattr(functional, "_layer", None)
    torch.manual_seed(0)
    ours = tritonrnn.LSTM(3, 6, num_layers=3, proj_size=4).to(DEVICE, KERNEL_DTYPE)
    theirs = nn.LSTM(3, 6, num_layers=3, proj_size=4).double()
    theirs.load_state_dict(ours.state_dict())
    assert_module_matches_torch(ours, theirs, torch.randn(5, 2, 3, dtype=torch.float64), KERNEL_DTYPE)


def test_wavefront_leaves_bidirectional_stacks_and_short_sequences_layer_by_layer(monkeypatch):
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "2")
    calls = []
    real = functional._layer
    monkeypatch.setattr(functional, "_layer", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    make_stack(MIXED[:2], bidirectional=True)(torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE))
    make_stack(MIXED[:2])(torch.randn(2, 2, 3, dtype=torch.float64, device=DEVICE))  # T <= one chunk
    assert calls == ["lstm", "gru", "lstm", "gru"]


def test_wavefront_is_off_by_default_and_1_means_64_step_chunks(monkeypatch):
    """README: off by default until measured on a GPU; 1 runs the stream wavefront in 64-step chunks."""
    monkeypatch.delenv("TRITONRNN_WAVEFRONT", raising=False)
    assert wavefront.wavefront_setting() == 0 and wavefront.wavefront_chunk() == 0
    for value, setting, chunk in [("", 0, 0), ("0", 0, 0), ("1", 64, 64), (" 7 ", 7, 7), ("fused", "fused", 0)]:
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", value)
        assert (wavefront.wavefront_setting(), wavefront.wavefront_chunk()) == (setting, chunk), value


@pytest.mark.parametrize("value", ["yes", "²"])  # "²" passes str.isdigit, not int()
def test_wavefront_switch_rejects_nonsense(monkeypatch, value):
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", value)
    with pytest.raises(ValueError, match="TRITONRNN_WAVEFRONT should be 0, 1, a number"):
        make_stack(MIXED[:2])(torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE))


# --- one launch for a stack of equal layers (TRITONRNN_WAVEFRONT=fused) ------------------------------

# float64 runs the stack kernel under the interpreter only; the GPU tier tests it in float32 and bfloat16.
cpu_only = pytest.mark.skipif(DEVICE.type == "cuda", reason="float64 kernels: interpreter only (GPU: test_gpu.py)")


def expected_with_masks(model, p, mode, steps, batch):
    """composed_reference under the masks the model draws after torch.manual_seed(7)."""

    def expected(x, states):
        masks = None
        if p:
            torch.manual_seed(7)
            draws = [tdropout.draw(p, mode, DEVICE) for _ in model.layers[:-1]]
            masks = [tdropout.mask(d, steps, batch, layer.hidden_size, DEVICE).double()
                     for d, layer in zip(draws, model.layers)] + [None]  # fmt: skip
        return composed_reference(model, x, states, masks)

    return expected


@cpu_only
@pytest.mark.parametrize("return_all", [True, False], ids=["all-layers", "top"])
@pytest.mark.parametrize(
    "cell,hidden,options",
    [
        pytest.param("lstm", 6, dict(), id="lstm"),
        pytest.param("gru", 5, dict(dropout=0.4), id="gru-dropout"),
        pytest.param("rnn_tanh", 3, dict(dropout=0.4, dropout_mode="variational"), id="tanh-variational"),
        pytest.param("rnn_relu", 7, dict(bias=False), id="relu-nobias"),
        pytest.param("lstm", 4, dict(dropout=0.3, dropout_mode="variational", bias=False), id="lstm-var-nobias"),
    ],
)
def test_fused_stack_matches_a_composition_of_reference_layers(cell, hidden, options, return_all, fused_only):
    """Three equal layers in one launch: outputs, final states and every gradient against the reference layers."""
    gen = torch.Generator().manual_seed(21)
    model = make_stack([(cell, hidden)] * 3, **options)
    x = torch.randn(5, 3, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 3, gen)
    expected = expected_with_masks(model, options.get("dropout", 0.0), options.get("dropout_mode", "standard"), 5, 3)
    torch.manual_seed(7)
    assert_matches(model, x, states, expected, return_all)


@cpu_only
@pytest.mark.parametrize("steps,batch,layers", [(1, 1, 2), (6, 2, 4)])
def test_fused_stack_split_grid_and_odd_sizes(steps, batch, layers, forced_plan, fused_only):
    """Two programs per layer (H = 20 in slices of 16) meeting at every wavefront step; T = 1, B = 1, 4 layers."""
    forced_plan(block_h=16, persistent=False)
    gen = torch.Generator().manual_seed(22)
    model = make_stack([("lstm", 20)] * layers, input_size=7, dropout=0.2)
    x = torch.randn(steps, batch, 7, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, batch, gen)
    torch.manual_seed(7)
    assert_matches(model, x, states, expected_with_masks(model, 0.2, "standard", steps, batch))


@cpu_only
@pytest.mark.parametrize("permuted", [False, True], ids=["chunks_first", "permuted"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_stack_reduction_in_chunks(cell, permuted, forced_plan, fused_only, monkeypatch):
    """Both reductions of every layer (over its h, and over the layer below's output) in four chunks, a 3-D dot
    (kernels/recurrent._dot_k), two programs a layer, dropout between the layers: float64 against the reference
    layers with the same masks. The backward's weight tiles in either form (WEIGHT_CHUNKS_PERMUTED: by Triton
    version on the GPU, so both here)."""
    from tritonrnn import fused_stack
    from tritonrnn.kernels import recurrent

    monkeypatch.setattr(recurrent, "WEIGHT_CHUNKS_PERMUTED", tl.constexpr(permuted))

    constants = fused_stack._constants
    chunks = []
    monkeypatch.setattr(fused_stack, "_constants", lambda *args: chunks.append(constants(*args)["K_SPLIT"]) or
                        constants(*args))  # fmt: skip
    forced_plan(block_h=16, k_split=4, persistent=False)
    gen = torch.Generator().manual_seed(24)
    model = make_stack([(cell, 20)] * 3, input_size=7, dropout=0.2)
    x = torch.randn(6, 2, 7, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 2, gen)
    torch.manual_seed(7)
    assert_matches(model, x, states, expected_with_masks(model, 0.2, "standard", 6, 2))
    assert chunks and set(chunks) == {4}


@cpu_only
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_stack_over_several_batch_tiles(cell, fused_only, monkeypatch):
    """A batch of 37 rows in tiles of 32 (the stack kernel's loop over batch tiles, which a GPU runs from B=17 and
    the other fused tests, at B <= 6, never do): float64 against the reference layers with the same masks.
    (A mutation audit: with every tile at row 0 the other tests passed.)"""
    from tritonrnn import fused_stack

    plan_of = fused_stack.fused_plan
    tiles = []
    monkeypatch.setattr(fused_stack, "fused_plan", lambda *a: tiles.append(plan_of(*a).block_b) or plan_of(*a))
    gen = torch.Generator().manual_seed(21)
    model = make_stack([(cell, 6)] * 3, dropout=0.3)
    x = torch.randn(5, 37, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 37, gen)
    torch.manual_seed(7)
    assert_matches(model, x, states, expected_with_masks(model, 0.3, "standard", 5, 37))
    assert tiles and all(block_b < 37 for block_b in tiles), tiles


@cpu_only
def test_fused_stack_with_weight_rows_read_every_step(forced_plan, fused_only):
    """16 of H=40 reduction rows held, the rest read every step (the stack kernel's streamed loop, for W_hh and the
    layer below's W_ih; GPU plans hold every row, so only a forced plan runs it): float64 against the reference.
    (A mutation audit: the streamed W_ih rows reading the layer's own h passed the other tests.)"""
    forced_plan(block_k=16, block_ks=16)
    gen = torch.Generator().manual_seed(21)
    model = make_stack([("gru", 40)] * 3, dropout=0.3)
    x = torch.randn(5, 3, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 3, gen)
    torch.manual_seed(7)
    assert_matches(model, x, states, expected_with_masks(model, 0.3, "standard", 5, 3))


@cpu_only
@pytest.mark.parametrize("module,cls", [(tritonrnn.LSTM, nn.LSTM), (tritonrnn.GRU, nn.GRU)], ids=["lstm", "gru"])
def test_fused_stack_module_matches_torch(module, cls, fused_only):
    torch.manual_seed(0)
    ours = module(3, 6, num_layers=3, batch_first=True).double().to(DEVICE)
    theirs = cls(3, 6, num_layers=3, batch_first=True).double()
    theirs.load_state_dict(ours.state_dict())
    assert_module_matches_torch(ours, theirs, torch.randn(2, 5, 3, dtype=torch.float64), torch.float64)


def assert_module_matches_torch(ours, theirs, x, dtype) -> None:
    """ours (in dtype, on DEVICE) against torch.nn's float64 module with the same weights, random initial states given:
    the output, every final state and the gradients of the input, the initial states and every parameter, under
    random cotangents on the output and every state."""
    gen = torch.Generator().manual_seed(5)
    hx = random_hx(theirs, x.shape[0 if theirs.batch_first else 1], gen)
    with torch.no_grad():
        out, states = theirs(x, hx)
    states = states if isinstance(states, tuple) else (states,)
    weights = loss_weights(out.shape, [t.shape for t in states], gen)
    got, want = run(ours, x.to(DEVICE, dtype), states_to(hx, DEVICE, dtype), weights), run(theirs, x, hx, weights)
    assert list(got[2]) == list(want[2]) and len(got[1]) == len(want[1]) == len(states)
    for name, a, b in [("output", got[0], want[0]), *zip(["h_n", "c_n"], got[1], want[1]),
                       *((name, got[2][name], want[2][name]) for name in want[2])]:  # fmt: skip
        assert rel_err(a.cpu(), b) < TOLERANCE[dtype], name


@pytest.mark.parametrize(
    "cell,options,split",
    [
        pytest.param("lstm", dict(dropout=0.3), False, id="lstm-dropout-one-launch"),
        pytest.param("gru", dict(dropout=0.3, dropout_mode="variational"), False, id="gru-variational-one-launch"),
        pytest.param("rnn_tanh", dict(), False, id="tanh-one-launch"),
        pytest.param("lstm", dict(dropout=0.3), True, id="lstm-dropout-split"),
        pytest.param("gru", dict(), True, id="gru-split"),
    ],
)
def test_fused_stack_tagged_is_bitwise_the_barrier(cell, options, split, fused_only, forced_plan, monkeypatch):
    """Layers decoupled (tagged words within a layer, step counts between layers) give the grid barrier's bits,
    float32: in one launch (one program a layer: the interpreter runs the layers in order) and split over three
    programs a layer, one wavefront step a launch."""
    from tritonrnn import fused_stack

    if split:
        forced_plan(block_h=16, persistent=False)
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(5, [(cell, 40)] * 3, **options).to(DEVICE)
    x = torch.randn(6, 3, 5, device=DEVICE)
    results = []
    for exchange in ("barrier", "tagged"):
        monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
        plan = fused_stack.fused_plan([cell] * 3, [40] * 3, 3, torch.float32, DEVICE, 0)
        assert plan.tagged == (exchange == "tagged")
        if DEVICE.type == "cpu":
            assert plan.persistent == (exchange == "tagged" and not split)
        results.append(stack_training_step(model, x))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_fused_stack_bfloat16_against_float64(exchange, fused_only, monkeypatch):
    """bf16 through the stack kernel (the upper layers' input products inside the loop): outputs and every parameter
    gradient against the same stack in float64 (the stack kernel under the interpreter, checked against the
    reference above; the reference on a GPU), with dropout under the same masks."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    assert_stack_matches_float64("lstm", torch.bfloat16, 9, 4, 23, monkeypatch, dropout=0.3, dropout_mode="variational")


def assert_stack_matches_float64(cell, dtype, steps, batch, seed, monkeypatch, **options):
    """Three layers of ``cell`` (H=24, input 8) through the stack kernel in ``dtype`` against the same stack in
    float64 run layer by layer, under the same dropout masks: the output and every parameter gradient."""
    gen = torch.Generator().manual_seed(seed)
    exact = make_stack([(cell, 24)] * 3, input_size=8, **options)
    low = tritonrnn.StackedRNN(8, [(cell, 24)] * 3, **options).to(device=DEVICE, dtype=dtype)
    low.load_state_dict(exact.state_dict())
    x = torch.randn(steps, batch, 8, dtype=torch.float64, generator=gen).to(DEVICE)
    results = []
    for model, run_dtype in ((low, dtype), (exact, torch.float64)):
        monkeypatch.setattr(functional, "_layer", None if run_dtype == dtype else real_layer)
        torch.manual_seed(3)
        out, _ = model(x.to(run_dtype))
        results.append([out, *torch.autograd.grad(out.double().square().sum(), list(model.parameters()))])
    for a, b in zip(*results):
        assert rel_err(a.double(), b) < TOLERANCE[dtype]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize(
    "plan", [{}, dict(block_h=16, persistent=False), dict(block_h=16, k_split=2, persistent=False)],
    ids=["one-program", "split", "chunks"],
)  # fmt: skip
def test_fused_stack_float32_forward_on_transposed_weights(cell, plan, fused_only, forced_plan, monkeypatch):
    """float32 without TF32: the stack kernel's forward reads every layer's W_hh and W_ih transposed
    (layer_run.weights_transposed, forced here whatever the Triton version; the backward reads them as they are):
    outputs and every parameter gradient against the same stack in float64, with dropout under the same masks."""
    from tritonrnn import fused_stack, layer_run

    monkeypatch.setattr(layer_run, "weights_transposed", lambda cell, dtype, *plan: dtype == torch.float32)
    monkeypatch.setattr(fused_stack, "weights_transposed", layer_run.weights_transposed)
    launched = []
    launch = fused_stack.launch_kernel

    def recording(kernel, grid, device, **kwargs):
        if kernel.__name__ == "stack_fwd_kernel" and kwargs["w_hh"].dtype == torch.float32:
            launched.append((kwargs.get("W_T"), kwargs["w_hh"].shape, kwargs["w_ih"].shape))
        return launch(kernel, grid, device, **kwargs)

    monkeypatch.setattr(fused_stack, "launch_kernel", recording)
    forced_plan(**plan)
    assert_stack_matches_float64(cell, torch.float32, 7, 3, 31, monkeypatch, dropout=0.3)
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    assert launched and all(entry == (True, (3, 24, gates * 24), (2, 24, gates * 24)) for entry in launched)


@pytest.mark.fallback
def test_fused_stack_leaves_other_stacks_layer_by_layer_and_says_why(monkeypatch, caplog):
    """Mixed cells, bidirectional, residual, a projection: not for the stack kernel; they run layer by layer, each
    reason logged once."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    calls = []
    real = functional._layer
    monkeypatch.setattr(functional, "_layer", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE)
    with caplog.at_level("WARNING", logger="tritonrnn"):
        make_stack([("gru", 9), ("lstm", 9)])(x)
        make_stack([("gru", 9), ("lstm", 9)])(x)
        make_stack([("gru", 10), ("gru", 10)], bidirectional=True)(x)
        make_stack([("gru", 3), ("gru", 3)], residual=True)(x)
        tritonrnn.LSTM(3, 6, num_layers=2, proj_size=2).double().to(DEVICE)(x)
    assert calls == ["gru", "lstm"] * 2 + ["gru", "gru"] * 2 + ["lstm", "lstm"]
    reasons = [r.getMessage() for r in caplog.records if "TRITONRNN_WAVEFRONT=fused" in r.getMessage()]
    assert len(reasons) == 4, reasons
    assert "differ in cell or hidden size" in reasons[0] and "bidirectional" in reasons[1]
    assert "residual connections" in reasons[2] and "projection (proj_size)" in reasons[3]


@pytest.mark.fallback
def test_fused_stack_leaves_layers_with_and_without_biases_layer_by_layer(monkeypatch, caplog):
    """functional.stack takes a bias per layer: the stack kernel has one flag for all (it dropped the upper layers'
    biases when the bottom layer had none); such a stack runs layer by layer, as the reference computes it."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    gen = torch.Generator().manual_seed(3)

    def weights(bias):
        w = [torch.randn(shape, dtype=torch.float64, generator=gen).to(DEVICE) for shape in ((18, 6), (18, 6))]
        return (
            *w,
            *([torch.randn(18, dtype=torch.float64, generator=gen).to(DEVICE) for _ in "ih"] if bias else [None, None]),
        )

    x = torch.randn(4, 2, 6, dtype=torch.float64, generator=gen).to(DEVICE)
    h0 = [torch.randn(1, 2, 6, dtype=torch.float64, generator=gen).to(DEVICE) for _ in range(2)]
    for biases in ((False, True), (True, False)):
        layers = [scheduler.StackLayer("gru", (weights(bias),)) for bias in biases]
        with caplog.at_level("WARNING", logger="tritonrnn"):
            got = functional.stack(x, layers, h0, [None, None])
        expected = scheduler.run_stack(x, layers, h0, [None, None])
        for a, b in zip([*got[0], *got[1]], [*expected[0], *expected[1]], strict=True):
            torch.testing.assert_close(a, b)
    assert any("some of its layers have biases and some not" in r.getMessage() for r in caplog.records)


def test_functional_stack_reads_strided_lengths_and_lengths_of_0(monkeypatch):
    """Lengths as a strided view (every other entry of a longer tensor), of another integer dtype, or 0 (the row keeps
    its initial state): the kernels read them as int32 in a row, which the view was not (they read the wrong rows'
    lengths). Against the reference, both directions."""
    gen = torch.Generator().manual_seed(4)
    shapes = ((16, 5), (16, 4), (16,), (16,))
    w = [tuple(torch.randn(shape, dtype=torch.float64, generator=gen).to(DEVICE) for shape in shapes) for _ in "fr"]
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    h0 = [torch.randn(2, 3, 4, dtype=torch.float64, generator=gen).to(DEVICE)]
    c0 = [torch.randn(2, 3, 4, dtype=torch.float64, generator=gen).to(DEVICE)]
    layers = [scheduler.StackLayer("lstm", tuple(w))]
    for dtype in (torch.int32, torch.int64):
        lengths = torch.tensor([4, 9, 0, 9, 2, 9], dtype=dtype, device=DEVICE)[::2]
        assert not lengths.is_contiguous()
        got = functional.stack(x, layers, h0, c0, lengths=lengths)
        expected = scheduler.run_stack(x, layers, h0, c0, lengths=lengths.contiguous().to(torch.int32))
        for a, b in zip([*got[0], *got[1], *got[2]], [*expected[0], *expected[1], *expected[2]], strict=True):
            torch.testing.assert_close(a, b)


class _ZeroFills(TorchDispatchMode):
    """The number of elements of each tensor of zeros made while the mode is on (not the tests' NaN poison of the
    buffers the kernels fill: conftest.py)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("zeros", "zeros_like", "new_zeros", "zero_"):
            self.numels.append(out.numel())
        return out


def take_stack_path(path: str, monkeypatch) -> None:
    """Make a stack run layer by layer ("layers"), on the wavefront's streams ("streams") or as one launch ("fused")."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", {"layers": "0", "streams": "2", "fused": "fused"}[path])
    if path != "layers":
        monkeypatch.setattr(functional, "_layer", None)  # the stack-wide path, not layer by layer
        monkeypatch.setattr(functional, "_wavefront_stack", None if path == "fused" else functional._wavefront_stack)


@pytest.mark.parametrize("path", ["layers", "streams", "fused"])
def test_backward_fills_no_gradient_for_outputs_the_loss_does_not_reach(path, monkeypatch):
    """A loss on the top layer's output alone: autograd hands None, not tensors of zeros, for what it does not reach
    (each layer's saved gate values, the lower layers' outputs in the stack-wide paths, h_n and c_n), so the backward
    fills nothing of a layer's output size; the gradients stay right (against the layer-by-layer float64 path)."""
    T, B, H = 6, 3, 8
    model = make_stack([("lstm", H)] * 3, input_size=H).to(KERNEL_DTYPE)
    x = torch.randn(T, B, H, dtype=KERNEL_DTYPE, device=DEVICE, requires_grad=True)
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "0")
    expected = torch.autograd.grad(model(x)[0].sum(), [x, *model.parameters()])
    take_stack_path(path, monkeypatch)
    out, _ = model(x)
    with _ZeroFills() as fills:
        grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    assert fills.numels and max(fills.numels) < T * B * H, fills.numels
    for a, b in zip(grads, expected):
        assert rel_err(a, b) < (1e-12 if KERNEL_DTYPE == torch.float64 else 1e-5)


class _Gemms(TorchDispatchMode):
    """The output shape of each matrix product run while the mode is on."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm"):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("path", ["layers", "streams", "fused"])
def test_inputs_that_want_no_gradient_cost_no_gemm(path, monkeypatch):
    """Data without requires_grad and frozen weights (layer 0's all, layer 1's W_ih): backward runs no GEMM for
    them (dL/dx [T*B, I] of the data, dL/dW_ih [4H, I] of layer 0, dL/dW_ih of layer 1: three [4H, H] products are
    left, layer 1's W_hh and layer 2's two; no dL/dx of layer 1, whose input wants none), nor layer 0's recurrence
    where the path can leave it out (all but the fused stack's one launch), and the gradients that remain equal
    those of the all-trainable model."""
    T, B, I, H = 6, 3, 5, 8
    model = make_stack([("lstm", H)] * 3, input_size=I).to(KERNEL_DTYPE)
    x = torch.randn(T, B, I, dtype=KERNEL_DTYPE, device=DEVICE)
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "0")
    expected = dict(zip(dict(model.named_parameters()), torch.autograd.grad(model(x)[0].sum(), model.parameters())))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not (name.startswith("layers.0.") or name == "layers.1.weight_ih"))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    take_stack_path(path, monkeypatch)
    out, _ = model(x)
    backward_runs = set()
    steps = layer_run.LayerRun.backward_steps

    def recorded(run, t0, t1):
        backward_runs.add(id(run))
        return steps(run, t0, t1)

    monkeypatch.setattr(layer_run.LayerRun, "backward_steps", recorded)
    with _Gemms() as gemms:
        grads = torch.autograd.grad(out.sum(), [p for _, p in trained])
    assert len(backward_runs) == (0 if path == "fused" else 2)
    assert not any(I in shape for shape in gemms.shapes), gemms.shapes
    assert gemms.shapes.count((4 * H, H)) == 3, gemms.shapes
    # dL/dx of the upper layers, in rows (the streams' chunks run it by chunks): layer 2's alone, none fused (there the
    # kernel forms it).
    dx_rows = sum(shape[0] for shape in gemms.shapes if shape[-1] == H and shape[0] != 4 * H)
    assert dx_rows == (0 if path == "fused" else T * B), gemms.shapes
    assert [name for name, _ in trained] == [f"layers.{k}.{w}" for k, w in
        [(1, "weight_hh"), (1, "bias_ih"), (1, "bias_hh"), (2, "weight_ih"), (2, "weight_hh"), (2, "bias_ih"),
         (2, "bias_hh")]]  # fmt: skip
    for (name, _), grad in zip(trained, grads, strict=True):
        assert rel_err(grad, expected[name]) < (1e-12 if KERNEL_DTYPE == torch.float64 else 1e-5), name


@pytest.mark.parametrize("frozen", ["layers.1.", "layers.0.", "layers.0. with h0"], ids=["middle", "bottom", "h0"])
@pytest.mark.parametrize("input_grad", [False, True], ids=["data", "input-grad"])
def test_wavefront_backward_through_frozen_layers_equals_layer_by_layer(frozen, input_grad, monkeypatch):
    """On streams, a frozen layer between trained ones still carries the gradient down, and frozen layers at the
    bottom run no backward unless the input or their initial state wants a gradient: every gradient equals the
    layer-by-layer path's."""
    model = make_stack(MIXED[:3], input_size=3).to(KERNEL_DTYPE)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(frozen.split()[0]))
    x = torch.randn(6, 2, 3, dtype=KERNEL_DTYPE, device=DEVICE, requires_grad=input_grad)
    states = random_states(model, 2, torch.Generator().manual_seed(3))
    states = [tuple(t.to(KERNEL_DTYPE) for t in s) if k == 0 else s.to(KERNEL_DTYPE) for k, s in enumerate(states)]
    h0 = states[0][0].requires_grad_(frozen.endswith("h0"))
    wanted = [x] * input_grad + [h0] * h0.requires_grad + [p for p in model.parameters() if p.requires_grad]
    results = []
    for path in ("layers", "streams"):
        take_stack_path(path, monkeypatch)
        out, finals = model(x, states)
        results.append(torch.autograd.grad(out.square().sum() + flat(finals)[0].sum(), wanted))
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) < (1e-12 if KERNEL_DTYPE == torch.float64 else 1e-5)


def test_outputs_backward_does_not_read_can_be_changed_in_place_on_streams(monkeypatch):
    """The stack on streams saves what its backward reads alone: the final states and a residual stack's top output
    (its own buffer) can be changed in place before backward, as layer by layer (resetting a state, say), with the
    same gradients."""
    model = make_stack([("lstm", 4), ("lstm", 4)], input_size=4, residual=True).to(KERNEL_DTYPE)
    x = torch.randn(6, 2, 4, dtype=KERNEL_DTYPE, device=DEVICE, requires_grad=True)
    results = []
    for path in ("layers", "streams"):
        take_stack_path(path, monkeypatch)
        out, states = model(x)
        out.mul_(2)
        for state in flat(states):
            state.zero_()
        results.append(torch.autograd.grad(out.sum(), [x, *model.parameters()]))
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) < (1e-12 if KERNEL_DTYPE == torch.float64 else 1e-5)


@pytest.mark.parametrize("path", ["layers", "streams", "fused"])
def test_backward_frees_the_forwards_buffers_unless_the_graph_is_retained(path, monkeypatch):
    """A retained graph backpropagates twice, bit for bit; one that is not retained frees what the forward kept for
    backward, so that a training loop's output, alive into the next step, holds no more than its own memory (of the
    kernels' buffers, only the one it is a view of); a further backward is torch's error."""
    made = []
    make = _plan.empty_buffer

    def tracked(*args, **kwargs):
        buffer = make(*args, **kwargs)
        made.append(weakref.ref(buffer))
        return buffer

    monkeypatch.setattr(_plan, "empty_buffer", tracked)
    T, B, H = 6, 3, 8
    model = make_stack([("lstm", H)] * 3, input_size=H).to(KERNEL_DTYPE)
    x = torch.randn(T, B, H, dtype=KERNEL_DTYPE, device=DEVICE, requires_grad=True)
    take_stack_path(path, monkeypatch)
    out, _ = model(x)
    first = torch.autograd.grad(out.sum(), [x, *model.parameters()], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out.sum(), [x])
    del first, second
    gc.collect()
    alive = [buffer for buffer in (ref() for ref in made) if buffer is not None]
    assert made and alive, path
    assert all(b.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for b in alive), [
        b.shape for b in alive
    ]


# --- sequences of different lengths ------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_packed_batch_equals_each_sequence_alone(bidirectional):
    """A PackedSequence of unsorted lengths: outputs and final states equal running each sequence on its own, and the
    parameter gradients of the summed loss equal the sum of the sequences' gradients."""
    model = make_stack(MIXED, input_size=3, bidirectional=bidirectional, residual=False)
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randn(n, 3, dtype=torch.float64, generator=gen).to(DEVICE) for n in (3, 6, 1, 4)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    out, states = model(packed)
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
    padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(out)
    grads = torch.autograd.grad(out.data.square().sum(), list(model.parameters()))
    expected_grads = [torch.zeros_like(p) for p in model.parameters()]
    for i, seq in enumerate(seqs):
        alone, alone_states = model(seq)  # unbatched [T, F]
        torch.testing.assert_close(padded[: len(seq), i], alone, rtol=1e-12, atol=1e-12)
        for state, single in zip(flat(states), flat(alone_states)):
            torch.testing.assert_close(state[:, i], single, rtol=1e-12, atol=1e-12)
        for acc, g in zip(expected_grads, torch.autograd.grad(alone.square().sum(), list(model.parameters()))):
            acc += g
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_packed_batch_through_the_wavefront(monkeypatch):
    model = make_stack(MIXED[:3], input_size=3, dropout=0.3)
    gen = torch.Generator().manual_seed(12)
    seqs = [torch.randn(n, 3, dtype=torch.float64, generator=gen).to(DEVICE) for n in (7, 2, 5)]
    packed = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    results = []
    layer = functional._layer
    for chunk in ("0", "2"):
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", chunk)
        monkeypatch.setattr(functional, "_layer", layer if chunk == "0" else None)  # the streams, not layer by layer
        torch.manual_seed(3)
        out, states = model(packed)
        results.append([out.data, *flat(states), *torch.autograd.grad(out.data.sum(), list(model.parameters()))])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-12


def residual_step_on_kernels_and_reference(x, layers, h0, c0, lengths, dropout, mode, inputs, seed):
    """A training step of scheduler.run_stack with residual sums, dropout and lengths, on the kernels' layers and on
    the reference's under the same seed: for each, every layer's output and final state and the gradients of
    ``inputs`` under a loss on all of them."""
    results = []
    for layer_fn in (functional._layer, reference.layer):
        torch.manual_seed(seed)
        ys, h_n, c_n = scheduler.run_stack(x, layers, h0, c0, dropout=dropout, dropout_mode=mode, residual=True,
                                           training=True, lengths=lengths, layer_fn=layer_fn)  # fmt: skip
        outs = ys + h_n + [c for c in c_n if c is not None]
        loss = sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum() for o in outs
        )
        results.append(outs + list(torch.autograd.grad(loss, inputs)))
    return results


@pytest.mark.parametrize("mode", ["standard", "variational"])
def test_every_feature_at_once_matches_the_reference(mode, forced_plan):
    """Bidirectional, residual, dropout and different lengths together, on a split grid launched step by step:
    the kernels against the reference layers under the same seeds, outputs, states and every gradient."""
    forced_plan(block_h=16, persistent=False, directions_together=False)
    model = make_stack([("lstm", 20), ("gru", 20), ("rnn_tanh", 20)], input_size=40, residual=True,
                       bidirectional=True)  # fmt: skip
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(6, 5, 40, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()
    lengths = torch.tensor([6, 1, 4, 6, 2], dtype=torch.int32, device=DEVICE)
    states = random_states(model, 5, gen)
    h0 = [(s[0] if isinstance(s, tuple) else s).requires_grad_() for s in states]
    c0 = [s[1] if isinstance(s, tuple) else None for s in states]
    layers = [layer(weight_drop=0.0, training=True) for layer in model.layers]
    inputs = [x, *h0, *model.parameters()]
    results = residual_step_on_kernels_and_reference(x, layers, h0, c0, lengths, 0.4, mode, inputs, seed=21)
    for k, (a, b) in enumerate(zip(*results)):
        assert rel_err(a, b) < 1e-11, k


@pytest.mark.parametrize("mode", ["standard", "variational"])
def test_residual_sums_over_projected_lstm_layers_match_the_reference(mode):
    """functional.stack's layers may carry an LSTM projection (w_hr): with residual=True the projection's kernels
    add the layer's input and, in backward, hand dL/dy to it. LSTM (P=5), GRU, LSTM (P=5), each two directions of
    5 units, dropout and different lengths: outputs, states and every gradient against the reference layers."""
    gen = torch.Generator().manual_seed(29)

    def rand(*shape):
        return (torch.randn(*shape, dtype=KERNEL_DTYPE, generator=gen) * 0.4).to(DEVICE).requires_grad_()

    sizes = [("lstm", 9, 5), ("gru", 5, 0), ("lstm", 7, 5)]  # (cell, hidden, proj_size): every output 2 x 5 wide
    layers, h0, c0, params = [], [], [], []
    for cell, H, P in sizes:
        gates = {"lstm": 4, "gru": 3}[cell]
        directions = []
        for _ in range(2):
            w = [rand(gates * H, 10), rand(gates * H, P or H), rand(gates * H), rand(gates * H)]
            directions.append(tuple(w + ([rand(P, H)] if P else [])))
            params += directions[-1]
        layers.append(scheduler.StackLayer(cell, tuple(directions)))
        h0.append(rand(2, 4, P or H))
        c0.append(rand(2, 4, H) if cell == "lstm" else None)
    x = rand(6, 4, 10)
    lengths = torch.tensor([6, 2, 5, 1], dtype=torch.int32, device=DEVICE)
    inputs = [x, *h0, *[c for c in c0 if c is not None], *params]
    results = residual_step_on_kernels_and_reference(x, layers, h0, c0, lengths, 0.3, mode, inputs, seed=22)
    bound = 1e-11 if KERNEL_DTYPE == torch.float64 else TOLERANCE
    for k, (a, b) in enumerate(zip(*results)):
        assert rel_err(a, b) < bound, k


@pytest.mark.fallback
@pytest.mark.parametrize("wavefront", ["fused", "2"])
def test_stack_wide_backward_refuses_double_backward_clearly(wavefront, monkeypatch):
    """The fused stack and the stack on streams cannot serve create_graph=True: a clear error naming the switch."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", wavefront)
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(3, [("gru", 4), ("gru", 4)]).double().to(DEVICE)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward.*TRITONRNN_WAVEFRONT"):
        torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "0")
    (gx,) = torch.autograd.grad(model(x)[0].square().sum(), x, create_graph=True)  # layer by layer: it can
    assert gx.requires_grad


@pytest.mark.fallback
@pytest.mark.parametrize("wavefront", ["fused", "2"])
def test_stack_wide_backward_refuses_batched_gradients_clearly(wavefront, monkeypatch):
    """Nor can they read the older vmap's batched gradients (is_grads_batched=True, jacobian(vectorize=True)): a
    clear error naming the switch; layer by layer, the reference's backward serves them."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", wavefront)
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(3, [("gru", 4), ("gru", 4)]).double().to(DEVICE)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cotangents = torch.randn(2, 5, 2, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="no batched backward.*TRITONRNN_WAVEFRONT"):
        torch.autograd.grad(model(x)[0], x, cotangents, is_grads_batched=True)
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "0")
    (got,) = torch.autograd.grad(model(x)[0], x, cotangents, is_grads_batched=True)
    out = model(x)[0]
    want = torch.stack([torch.autograd.grad(out, x, v, retain_graph=True)[0] for v in cotangents])
    torch.testing.assert_close(got, want)


def test_hooks_on_a_layer_run_every_call_so_prune_and_weight_norm_train_like_torch():
    """prune and the old torch.nn.utils.weight_norm recompute the weight they own in a forward pre-hook of the module
    holding it: on layers.k, as on a torch.nn module, it runs on every call, so training follows the weights."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    theirs = nn.LSTM(3, 5, num_layers=2).double()
    ours = tritonrnn.StackedRNN(3, [("lstm", 5), ("lstm", 5)]).double()
    ours.load_state_dict(stack_state_from_torch(theirs), strict=True)
    prune.l1_unstructured(ours.layers[1], "weight_hh", amount=0.4)
    prune.l1_unstructured(theirs, "weight_hh_l1", amount=0.4)
    prune.l1_unstructured(ours.layers[1], "bias_ih", amount=0.4)  # a bias too: an attribute, no longer a parameter
    prune.l1_unstructured(theirs, "bias_ih_l1", amount=0.4)
    with pytest.warns(FutureWarning, match="weight_norm"):
        nn.utils.weight_norm(ours.layers[0], "weight_ih")
    with pytest.warns(FutureWarning, match="weight_norm"):
        nn.utils.weight_norm(theirs, "weight_ih_l0")
    ours = ours.to(DEVICE)
    calls = []
    ours.layers[0].register_forward_hook(lambda module, args, out: calls.append(out.cell))
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs)]
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for step in range(3):  # each step starts from the weights the last one's update left
        got, want = ours(x.to(DEVICE))[0], theirs(x)[0]
        torch.testing.assert_close(got.cpu(), want, msg=lambda m, step=step: f"step {step}: {m}")
        for out, optimiser in zip((got, want), optimisers):
            optimiser.zero_grad()
            out.square().sum().backward()
            optimiser.step()
    assert calls == ["lstm"] * 3
    names = {"layers.0.weight_ih_g": "weight_ih_l0_g", "layers.0.weight_ih_v": "weight_ih_l0_v",
             "layers.1.weight_hh_orig": "weight_hh_l1_orig", "layers.1.bias_ih_orig": "bias_ih_l1_orig"}  # fmt: skip
    ours_params, theirs_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name, their_name in names.items():
        torch.testing.assert_close(ours_params[name].cpu(), theirs_params[their_name], msg=name)


def test_parametrized_weights_are_computed_once_per_call():
    """Each parametrized weight or bias of a stack is computed once per forward call (spectral_norm's power
    iteration: one step per call in training), the first layer's weight_ih included; the call's checks of the
    weights compute none."""
    from torch.nn.utils import parametrize

    model = make_stack([("gru", 4), ("lstm", 3)])
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE)
    want = model(x)[0]
    counters = {name: CountCalls() for name in ("weight_ih", "weight_hh", "bias_ih")}
    for name, counter in counters.items():
        parametrize.register_parametrization(model.layers[0], name, counter)
        counter.calls = 0  # registering computes it once: count the call's computations only
    got = model(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert {name: c.calls for name, c in counters.items()} == {"weight_ih": 1, "weight_hh": 1, "bias_ih": 1}


def test_a_layer_converted_on_its_own_is_refused_by_name():
    """One layer moved to another dtype than the rest: a chain of torch.nn modules refuses the other layers' output
    there (a ValueError); so does the stack, naming the layer, instead of silently casting that layer's weights."""
    model = tritonrnn.StackedRNN(3, [("gru", 4), ("rnn_tanh", 3)]).float().to(DEVICE)
    model.layers[1].double()
    x = torch.randn(5, 2, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"layers\.1\.weight_ih is torch\.float64.*convert the whole stack"):
        model(x)
    model.float()
    assert model(x)[0].dtype == torch.float32
    model.layers[1].to("meta")  # a device no input is on: torch.nn's error type for a device, a RuntimeError
    with pytest.raises(RuntimeError, match=r"layers\.1\.weight_ih is torch\.float32 on meta"):
        model(x)
    # Under autocast the layers' dtypes are cast, their devices still checked.
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), pytest.raises(RuntimeError, match=r"layers\.1.* on meta"):
        model(x)
