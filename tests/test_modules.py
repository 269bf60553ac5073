"""The nn.Module front ends: torch.nn compatibility of construction, state_dict, forms and fallbacks."""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import pytest
import torch
from conftest import DEVICE
from helpers import TOLERANCE, CountCalls, make_pair, rel_err
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._pytree import tree_leaves

import tritonrnn
from tritonrnn import _plan

PAIRS = [(tritonrnn.LSTM, nn.LSTM), (tritonrnn.GRU, nn.GRU), (tritonrnn.RNN, nn.RNN)]
CONFIGS = [
    dict(),
    dict(num_layers=3, bias=False, batch_first=True),
    dict(num_layers=2, bidirectional=True, dropout=0.2),
]


@pytest.mark.parametrize("ours_cls,torch_cls", PAIRS, ids=lambda c: c.__name__ if isinstance(c, type) else "")
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_same_parameters_initialisation_and_state_dict(ours_cls, torch_cls, config):
    torch.manual_seed(0)
    ours = ours_cls(7, 11, **config)
    torch.manual_seed(0)
    theirs = torch_cls(7, 11, **config)
    assert isinstance(ours, torch_cls)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), name  # same initialisation from the same seed
    # strict loading in both directions
    theirs.load_state_dict({k: v + 1 for k, v in ours.state_dict().items()}, strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_lstm_proj_size_state_dict():
    ours, theirs = tritonrnn.LSTM(5, 8, proj_size=3, num_layers=2), nn.LSTM(5, 8, proj_size=3, num_layers=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert "weight_hr_l1" in ours.state_dict()


@pytest.mark.parametrize(
    "config,width",
    [(dict(bidirectional=True), 12), (dict(num_layers=2, dropout=0.5), 6), (dict(proj_size=2, num_layers=2), 2)],
    ids=str,
)
def test_bidirectional_training_dropout_and_projection_run_on_the_kernels(config, width, monkeypatch):
    ours = tritonrnn.LSTM(4, 6, **config).double().to(DEVICE)
    assert ours._unsupported(torch.zeros(1, 1, 4)) is None
    monkeypatch.setattr(nn.LSTM, "forward", None)  # torch.nn's implementation must not be reached
    out, _ = ours(torch.randn(3, 2, 4, dtype=torch.float64, device=DEVICE))
    assert out.shape == (3, 2, width)


def test_dropout_mode_keyword():
    m = tritonrnn.GRU(4, 6, num_layers=2, dropout=0.3, dropout_mode="variational")
    assert m.dropout_mode == "variational" and "dropout_mode='variational'" in repr(m)
    assert "dropout_mode" not in repr(tritonrnn.GRU(4, 6))
    assert list(m.state_dict()) == list(nn.GRU(4, 6, num_layers=2).state_dict())
    with pytest.raises(ValueError, match="dropout_mode should be one of"):
        tritonrnn.LSTM(4, 6, dropout_mode="zoneout")


def test_dropout_in_eval_mode_uses_the_kernels():
    """Dropout only acts in training: eval mode matches torch.nn without falling back."""
    torch.manual_seed(0)
    ours, theirs = make_pair("gru", 4, 6, num_layers=2, dropout=0.5)
    ours.eval()
    theirs.eval()
    assert ours._unsupported(torch.zeros(1, 1, 4)) is None
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(ours.to(DEVICE)(x.to(DEVICE))[0].cpu(), theirs(x)[0])


def test_packed_sequence_with_projection_runs_on_the_kernels(monkeypatch):
    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 5, proj_size=2)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 4]))
    ref, (rh, rc) = theirs(packed)
    monkeypatch.setattr(nn.LSTM, "forward", None)  # torch.nn's implementation must not be reached
    out, (h, c) = ours.to(DEVICE)(packed.to(DEVICE))
    torch.testing.assert_close(out.data.cpu(), ref.data)
    torch.testing.assert_close(h.cpu(), rh)
    torch.testing.assert_close(c.cpu(), rc)


def test_returns_have_torch_shapes():
    for cls in (tritonrnn.LSTM, tritonrnn.GRU, tritonrnn.RNN):
        m = cls(3, 4, num_layers=2, batch_first=True).double().to(DEVICE)
        out, state = m(torch.randn(5, 7, 3, dtype=torch.float64, device=DEVICE))
        assert out.shape == (5, 7, 4)
        h = state[0] if cls is tritonrnn.LSTM else state
        assert h.shape == (2, 5, 4)
        out, state = m(torch.randn(7, 3, dtype=torch.float64, device=DEVICE))
        assert out.shape == (7, 4)
        h = state[0] if cls is tritonrnn.LSTM else state
        assert h.shape == (2, 4)


def test_final_state_feeds_the_next_call():
    """Truncated BPTT style: the state returned by one chunk starts the next, and matches one long call."""
    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 5, num_layers=2)
    ours = ours.to(DEVICE)
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    first, state = ours(x[:5].to(DEVICE))
    second, _ = ours(x[5:].to(DEVICE), state)
    ref, _ = theirs(x)
    torch.testing.assert_close(torch.cat([first, second]).cpu(), ref)


def test_unbatched_lstm_state_stacked_in_one_tensor_like_torch():
    """torch.nn.LSTM reads an unbatched hx as hx[0], hx[1], so (h_0, c_0) stacked in one [2, L, H] tensor works
    there: here too, with the same outputs and gradients for the stacked tensor."""
    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 5, num_layers=2)
    ours = ours.to(DEVICE)
    x = torch.randn(6, 3, dtype=torch.float64)
    hx = torch.randn(2, 2, 5, dtype=torch.float64)
    results = []
    for module, device in ((ours, DEVICE), (theirs, torch.device("cpu"))):
        state = hx.to(device).requires_grad_()
        out, (h_n, c_n) = module(x.to(device), state)
        (grad,) = torch.autograd.grad(out.sum() + h_n.sum() + 2 * c_n.sum(), state)
        results.append([t.cpu() for t in (out, h_n, c_n, grad)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="hx must be a tuple"):
        ours(x.to(DEVICE), torch.randn(3, 2, 5, dtype=torch.float64, device=DEVICE))  # not two states


def flat_outputs(result):
    """(output, state) or (output, (h, c)) as a flat list of tensors (a PackedSequence output as its data)."""
    out, state = result
    out = out.data if isinstance(out, PackedSequence) else out
    return [out, *(state if isinstance(state, tuple) else (state,))]


def _autocast_run(module, x, hx, seed, autocast):
    """Outputs, states and gradients (input, hx, parameters) of one training call, optionally under bf16 autocast."""
    x = x.detach().clone().requires_grad_()
    hx = tuple(h.detach().clone().requires_grad_() for h in hx)
    torch.manual_seed(seed)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        tensors = flat_outputs(module(x, hx if len(hx) == 2 else hx[0]))
    gen = torch.Generator().manual_seed(3)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen).to(DEVICE)).sum() for t in tensors)
    grads = torch.autograd.grad(loss, [x, *hx, *module.parameters()])
    return tensors, grads


@pytest.mark.parametrize(
    "cell,config",
    [("lstm", dict(num_layers=2, dropout=0.4)), ("gru", dict(bidirectional=True)), ("lstm", dict(proj_size=3)),
     ("rnn_relu", dict(bias=False, batch_first=True)), ("rnn_tanh", dict(bidirectional=True))],
    ids=str,
)  # fmt: skip
def test_autocast_runs_the_kernels_in_the_autocast_dtype(cell, config, monkeypatch, caplog):
    """Under autocast the float32 module runs the kernels in bf16: exactly what the module converted to bf16 does,
    outputs in bf16, float32 gradients (the bf16 ones, through the cast) for the parameters, input and states."""
    if cell == "gru" and DEVICE.type == "cpu":
        pytest.skip("CPU autocast leaves a GRU in float32 (test_cpu_autocast_casts_what_torch_nn_casts)")
    torch.manual_seed(0)
    ours, _ = make_pair(cell, 5, 6, **config)
    ours = ours.float().train().to(DEVICE)
    explicit = copy.deepcopy(ours).to(torch.bfloat16)
    layers = ours.num_layers * (2 if ours.bidirectional else 1)
    hx = [torch.randn(layers, 2, ours.proj_size or 6)] + ([torch.randn(layers, 2, 6)] if cell == "lstm" else [])
    x = torch.randn(2, 4, 5) if ours.batch_first else torch.randn(4, 2, 5)
    x, hx = x.to(DEVICE), [h.to(DEVICE) for h in hx]
    torch_cls = {"lstm": nn.LSTM, "gru": nn.GRU}.get(cell, nn.RNN)
    monkeypatch.setattr(torch_cls, "forward", None)  # torch.nn's implementation must not be reached
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        tensors, grads = _autocast_run(ours, x, hx, seed=7, autocast=True)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    expected, expected_grads = _autocast_run(explicit, x.bfloat16(), [h.bfloat16() for h in hx], 7, autocast=False)
    for got, want in zip(tensors, expected):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)
    for got, want, param in zip(grads, expected_grads, [x, *hx, *ours.parameters()]):
        assert got.dtype == param.dtype == torch.float32
        assert torch.equal(got, want.float())


def test_autocast_packed_sequence_and_stacked_rnn_match_the_bf16_modules():
    torch.manual_seed(0)
    ours = tritonrnn.RNN(3, 4, num_layers=2).to(DEVICE)
    explicit = copy.deepcopy(ours).to(torch.bfloat16)
    x = torch.randn(5, 3, 3, device=DEVICE)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, h_n = ours(packed)
    want, want_h = explicit(packed.to(torch.bfloat16))
    assert out.data.dtype == h_n.dtype == torch.bfloat16
    assert torch.equal(out.data, want.data) and torch.equal(h_n, want_h)

    stack = tritonrnn.StackedRNN(3, [("lstm", 4), ("gru", 4)]).to(DEVICE)
    explicit = copy.deepcopy(stack).to(torch.bfloat16)
    states = [(torch.randn(1, 3, 4, device=DEVICE), torch.randn(1, 3, 4, device=DEVICE)), torch.randn(1, 3, 4)]
    states[1] = states[1].to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, finals = stack(x, states)
    want, want_finals = explicit(x.bfloat16(), [tuple(s.bfloat16() for s in states[0]), states[1].bfloat16()])
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    for final, want_final in zip([*finals[0], finals[1]], [*want_finals[0], want_finals[1]], strict=True):  # h, c, h
        assert torch.equal(final, want_final)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cpu_autocast_casts_what_torch_nn_casts(cell):
    """CPU autocast takes torch.nn's LSTM and RNN to its dtype and leaves its GRU in float32: ours the same, with
    torch.nn's values to bf16's precision (CUDA autocast casts all three, README: autocast). torch.nn's CPU GRU runs
    its GEMMs in bf16 under autocast inside the float32 op; ours runs float32 throughout."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2)
    ours, theirs = ours.float(), theirs.float()
    x = torch.randn(5, 2, 3)
    expected = torch.float32 if cell == "gru" else torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = flat_outputs(ours(x))
        try:
            want = flat_outputs(theirs(x))
        except RuntimeError as error:
            # oneDNN's bf16 LSTM needs AVX-512 ("could not create a primitive descriptor" on an AVX2-only CPU):
            # torch.nn's float32 result then, to bf16's precision.
            if "primitive descriptor" not in str(error):
                raise
            with torch.autocast("cpu", enabled=False):
                want = [w.to(expected) for w in flat_outputs(theirs(x))]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == expected
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "cell,packed,weights",
    [
        pytest.param("lstm", True, torch.float32, id="lstm-packed"),
        pytest.param("gru", False, torch.bfloat16, id="gru-bf16-weights"),
        pytest.param("gru", True, torch.bfloat16, id="gru-packed-bf16-weights"),
    ],
)
def test_cpu_autocast_leaves_what_torch_nn_leaves(cell, packed, weights):
    """CPU autocast casts neither torch.nn's LSTM on packed input nor its GRU: they run in the input's dtype, float32
    here, even with bf16 weights (which torch.nn's dtype check lets through under autocast). Ours the same: outputs
    and states in float32. torch.nn's ops run their GEMMs in bf16 inside (as its GRU in the test above): the values
    agree to bf16's precision."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2)
    ours, theirs = ours.to(weights), theirs.to(weights)
    x = torch.randn(5, 2, 3)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = flat_outputs(theirs(x))
        got = flat_outputs(ours(x))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpu_autocast_of_an_lstm_with_projections_casts_what_torch_nn_casts(packed):
    """torch.nn's LSTM with projections runs ATen's composite cells on the CPU: autocast casts its GEMMs, so output
    and h_n come out in bf16, packed input too (which its LSTM without projections leaves in float32), and c_n in
    float32 (from the float32 c0). Ours: output and h_n in bf16, c_n in bf16 as on a GPU, to bf16's precision."""
    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 4, proj_size=2, num_layers=2)
    ours, theirs = ours.float(), theirs.float()
    x = torch.randn(5, 2, 3)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = flat_outputs(ours(x)), flat_outputs(theirs(x))
    assert [g.dtype for g in got] == [torch.bfloat16] * 3
    assert [w.dtype for w in want] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_autocast_float64_input_is_not_cast():
    """torch.autocast leaves float64 alone: a float32 module given float64 input under autocast is a dtype error."""
    ours = tritonrnn.LSTM(3, 4).to(DEVICE)
    message = r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\)"
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), pytest.raises(ValueError, match=message):
        ours(torch.randn(2, 1, 3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match=message):  # torch.nn's own check, without autocast
        ours(torch.randn(2, 1, 3, dtype=torch.float64, device=DEVICE))


@pytest.mark.fallback
def test_autocast_asks_the_plan_for_the_autocast_dtype(monkeypatch, caplog):
    """A layer too large for the kernels in the autocast dtype goes to torch.nn, which applies autocast itself. (An
    RNN: torch.nn's CPU LSTM has no bf16 on a CPU without AVX-512.)"""
    asked = []

    def kernel_plan(cell, hidden, batch, dtype, device, variant):
        asked.append(dtype)
        return "does not fit this GPU"

    monkeypatch.setattr(tritonrnn.functional, "kernel_plan", kernel_plan)
    torch.manual_seed(0)
    ours = tritonrnn.RNN(4, 6).to(DEVICE)
    theirs = nn.RNN(4, 6).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4, device=DEVICE)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, _ = ours(x)
        ref, _ = theirs(x)
    assert asked == [torch.bfloat16]
    torch.testing.assert_close(out, ref)
    assert any("torch.bfloat16: does not fit" in r.getMessage() for r in caplog.records)


@pytest.mark.fallback
def test_layer_too_large_for_the_kernels_runs_on_torch_nn(monkeypatch, caplog):
    """Where the kernels cannot hold a layer (decided on the GPU by compiling them), the modules hand the call to
    torch.nn (cuDNN on a GPU), logged once; variational dropout, which torch.nn lacks, stays on tritonrnn."""
    monkeypatch.setattr(tritonrnn.functional, "kernel_plan", lambda *args, **kwargs: "does not fit this GPU")
    torch.manual_seed(0)
    ours, theirs = make_pair("gru", 4, 6, num_layers=2)
    ours, theirs = ours.float().to(DEVICE), theirs.float().to(DEVICE)
    x = torch.randn(5, 3, 4, device=DEVICE)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        for _ in range(2):
            torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "hidden_size=6 in torch.float32: does not fit this GPU" in messages[0]
    assert ours._unsupported(x.double()) is None  # float64 stays on the reference: same dropout masks


@pytest.mark.fallback
def test_variational_dropout_the_kernels_cannot_hold_runs_on_torchs_op_with_the_same_masks(monkeypatch, caplog):
    """torch.nn has no variational dropout, so a layer the kernels cannot hold stays on tritonrnn and runs torch's own
    op between tritonrnn's masks (logged once), which are the kernels': under one seed, the kernels' outputs, states
    and gradients."""
    torch.manual_seed(0)
    ours = tritonrnn.GRU(4, 6, num_layers=2, dropout=0.5, dropout_mode="variational").float().to(DEVICE).train()
    x = torch.randn(5, 3, 4, device=DEVICE)

    def train_step():
        torch.manual_seed(1)
        xr = x.clone().requires_grad_()
        out, h_n = ours(xr)
        grads = torch.autograd.grad(out.square().sum() + h_n.sum(), [xr, *ours.parameters()])
        return [out, h_n, *grads]

    want = train_step()
    monkeypatch.setattr(tritonrnn.layer_op, "plan_layer", lambda *args: "does not fit this GPU")
    monkeypatch.setattr(tritonrnn.layer_run.LayerRun, "__init__", None)  # the kernels must not be reached
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        got = [train_step() for _ in range(2)][-1]
    for name, a, b in zip(["output", "h_n", "input", *dict(ours.named_parameters())], got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "does not fit this GPU" in messages[0], messages
    with torch.no_grad():  # and dropout was applied: eval mode (no dropout) gives another output
        assert not torch.allclose(ours.eval()(x)[0], got[0])


class _Tagger(nn.Module):
    """A model around the recurrent layers, as a user compiles it."""

    def __init__(self, rnn: nn.Module, width: int):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Linear(3, 4), rnn, nn.Linear(width, 2)

    def forward(self, x):
        out, _ = self.rnn(torch.tanh(self.embed(x)))
        return self.head(out).sum(-1)


@pytest.mark.parametrize(
    "rnn,width,fullgraph",
    [
        (lambda: tritonrnn.LSTM(4, 5, num_layers=2, bidirectional=True), 10, False),
        (lambda: tritonrnn.LSTM(4, 5, num_layers=2, bidirectional=True), 10, True),
        (lambda: tritonrnn.GRU(4, 5, num_layers=2, dropout=0.3, dropout_mode="variational"), 5, True),
        (lambda: tritonrnn.StackedRNN(4, [("gru", 5), ("lstm", 6)], dropout=0.4, weight_drop=0.2), 6, True),
    ],
    ids=["LSTM", "LSTM-fullgraph", "GRU-dropout-fullgraph", "StackedRNN-fullgraph"],
)
def test_torch_compile_matches_eager_and_runs_the_kernels(rnn, width, fullgraph, monkeypatch):
    """torch.compile of a model holding our layers: each layer is one tritonrnn::layer node (fullgraph=True works;
    torch.nn's RNN classes, ours included, need Dynamo's allow_rnn). Same outputs and gradients as eager (dropout
    under the same seeds: aot_eager runs torch's generator as eager does), the kernels still run."""
    from tritonrnn import layer_run

    torch.manual_seed(0)
    model = _Tagger(rnn(), width).double().to(DEVICE)
    x = torch.randn(6, 3, 3, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(1)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    calls = []
    forward_steps = layer_run.LayerRun.forward_steps
    monkeypatch.setattr(layer_run.LayerRun, "forward_steps", lambda *a: calls.append(1) or forward_steps(*a))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=fullgraph):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
        torch.manual_seed(1)
        got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch._dynamo.reset()
    assert len(calls) == 2  # both layers ran on the kernels
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_under_autocast_runs_the_kernels(monkeypatch):
    """fullgraph compile of a float32 LSTM called under bf16 autocast: the kernels run (in bf16), and outputs and
    float32 parameter gradients equal eager's under autocast."""
    from tritonrnn import layer_run

    torch.manual_seed(0)
    model = _Tagger(tritonrnn.LSTM(4, 5, num_layers=2), 5).to(DEVICE)
    x = torch.randn(6, 3, 3, device=DEVICE)
    results = []
    calls = []
    forward_steps = layer_run.LayerRun.forward_steps
    monkeypatch.setattr(layer_run.LayerRun, "forward_steps", lambda *a: calls.append(1) or forward_steps(*a))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                out = run(x)
            results.append([out, *torch.autograd.grad(out.float().square().sum(), list(model.parameters()))])
    torch._dynamo.reset()
    assert len(calls) == 4  # two layers, eager then compiled
    assert results[0][0].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.fallback
def test_torch_compile_of_a_layer_the_kernels_cannot_hold(monkeypatch):
    """Compiled, a layer the kernels cannot hold runs the reference inside tritonrnn::layer and again in its
    backward: outputs and gradients equal eager's (where the reference runs under autograd)."""
    from tritonrnn import layer_op, layer_run

    monkeypatch.setattr(layer_op, "plan_layer", lambda *args: "forced fallback")
    monkeypatch.setattr(layer_run.LayerRun, "__init__", None)  # the kernels must not be reached
    torch.manual_seed(0)
    model = _Tagger(tritonrnn.StackedRNN(4, [("lstm", 5), ("gru", 6)], dropout=0.3, bidirectional=True), 12)
    model = model.double().to(DEVICE)
    x = torch.randn(6, 3, 3, dtype=torch.float64, device=DEVICE)
    results = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(1)
        out = run(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "cell,directions,options",
    [
        ("lstm", 1, dict()),
        ("gru", 2, dict(p_drop=0.3)),
        ("rnn_tanh", 1, dict(residual=True, lengths=True, p_drop=0.5, variational=True)),
        ("lstm", 2, dict(proj=3, lengths=True, p_drop=0.3)),
        ("gru", 1, dict(frozen=True, p_drop=0.3)),
        pytest.param("lstm", 1, dict(fallback=True, p_drop=0.2), marks=pytest.mark.fallback),
        pytest.param("lstm", 2, dict(fallback=True, frozen=True, proj=2), marks=pytest.mark.fallback),
        pytest.param("rnn_relu", 2, dict(fallback=True, lengths=True), marks=pytest.mark.fallback),
        pytest.param("lstm", 2, dict(fallback=True, proj=3, residual=True), marks=pytest.mark.fallback),
        pytest.param("gru", 1, dict(misfit=True, p_drop=0.3), marks=pytest.mark.fallback),
        pytest.param("lstm", 1, dict(native=True, proj=2), marks=pytest.mark.fallback),
        pytest.param("gru", 2, dict(native=True, lengths=True), marks=pytest.mark.fallback),
    ],
    ids=str,
)
def test_layer_op_passes_torch_library_opcheck(cell, directions, options, monkeypatch):
    """tritonrnn::layer's schema, fake shapes, autograd registration and compiled forward and backward agree with
    its real runs, on the kernels and on the fallback (whose backward runs the layer again): where the device,
    dtype or hidden size rule the kernels out ("fallback"; "native": CPU tensors without the interpreter), the outputs
    leave out the kernels' buffers, which the fallback's backward never reads; where only the GPU's compile check
    would ("misfit", which the fake shapes cannot know), they keep them, as zeros. "frozen": inputs without grad,
    whose gradients the backward leaves out."""
    from tritonrnn import _plan, layer_op

    if options.get("fallback"):
        monkeypatch.setattr(layer_op, "plan_layer", lambda *args: "forced fallback")
    if options.get("misfit"):
        monkeypatch.setattr(layer_op, "kernel_plan", lambda *args: "forced misfit")
    if options.get("native"):
        if DEVICE.type != "cpu":
            pytest.skip("torch's CPU op: CPU tensors")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    _plan._logged.clear()
    gen = torch.Generator().manual_seed(0)
    G = _plan.CELLS[cell][1]
    T, B, H, P, D = 5, 3, 4, options.get("proj", 0), directions
    N = P or H
    I = D * N if options.get("residual") else 2

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()

    args = (
        rand(T, B, I), rand(D, B, N), rand(D, B, H) if cell == "lstm" else None, rand(D * G * H, I),
        rand(D, G * H, N), rand(D * G * H), rand(D * G * H), rand(D, N, H) if P else None,
        torch.tensor([5, 2, 4], dtype=torch.int32, device=DEVICE) if options.get("lengths") else None,
        torch.tensor([7], dtype=torch.int64, device=DEVICE) if options.get("p_drop") else None,
        cell, options.get("residual", False), options.get("p_drop", 0.0), options.get("variational", False), True,
        False,
    )  # fmt: skip
    if options.get("frozen"):  # data and a frozen W_ih: the backward gives neither a gradient
        args = (args[0].detach(), *args[1:3], args[3].detach(), *args[4:])
    torch.library.opcheck(torch.ops.tritonrnn.layer.default, args)
    hseq, y, _, h_n, _, saved, mseq = torch.ops.tritonrnn.layer(*args)
    kept = not (options.get("fallback") or options.get("native"))
    n_saved = _plan.CELLS[cell][2]  # none for the plain RNN, whose backward needs only hseq
    assert saved.shape == ((D, T, B, n_saved * H) if kept and n_saved else (0,))
    assert mseq.shape == ((D, T, B, H) if kept and P else (0,))
    writes_y = D > 1 or options.get("residual") or options.get("lengths")
    assert hseq.shape == ((D, T + 1, B, N) if kept or not writes_y else (0,))
    output = y if writes_y else hseq[0, 1:]
    assert output.shape == (T, B, D * N) and h_n.shape == (D, B, N) and output.isfinite().all()


def test_layer_backward_op_takes_the_calls_of_older_compiled_graphs():
    """tritonrnn::layer_backward as a backward graph compiled (and cached) by the version before ``needs`` calls it:
    every gradient, as with all needed; with some not needed, those are empty and the others the same. torch.compile's
    caches do not key on a custom op's schema (pytorch/pytorch#144344), so its arguments grow by defaults alone."""
    gen = torch.Generator().manual_seed(0)
    T, B, I, H = 4, 2, 3, 5

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).to(DEVICE)

    inputs = [rand(T, B, I), rand(1, B, H), rand(1, B, H), rand(4 * H, I), rand(1, 4 * H, H), rand(4 * H), rand(4 * H)]
    options = ("lstm", False, 0.0, False)  # cell, residual, p_drop, variational
    hseq, _, _, _, _, saved, mseq = torch.ops.tritonrnn.layer(*inputs, None, None, None, *options, True, False)
    grads = (rand(1, T + 1, B, H), None, None, rand(1, B, H), None)
    args = (*grads, *inputs, None, None, None, hseq, saved, mseq, *options, False)
    old = torch.ops.tritonrnn.layer_backward(*args)
    assert len(old) == 8 and [g.numel() > 0 for g in old] == [True] * 7 + [False]  # no w_hr
    some = [True, False, True, False, True, True, False, False]
    for needs, expected in (([True] * 8, old), (some, [g if need else None for g, need in zip(old, some)])):
        for got, want in zip(torch.ops.tritonrnn.layer_backward(*args, needs), expected, strict=True):
            assert got.numel() == 0 if want is None else torch.equal(got, want)


# --- the tensors' device is the current one at every launch ---------------------------------------


class _DeviceGuards:
    """Stands in for _plan.on_device: records which device each entered guard names."""

    def __init__(self):
        self.entered: list[torch.device] = []

    @contextlib.contextmanager
    def __call__(self, device):
        self.entered.append(device)
        try:
            yield
        finally:
            self.entered.pop()


class _GuardedLaunch:
    """A kernel whose launches check that a guard for ``device`` is the innermost entered one."""

    def __init__(self, name, kernel, guards, device, launched):
        self.name, self.kernel, self.guards, self.device, self.launched = name, kernel, guards, device, launched

    def __getitem__(self, grid):
        assert self.guards.entered and self.guards.entered[-1] == self.device, (self.name, self.guards.entered)
        self.launched.add(self.name)
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.mark.parametrize("fused_stack_too", [False, True], ids=["layers", "fused-stack"])
def test_every_kernel_launch_makes_the_tensors_device_current(fused_stack_too, monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': forward and backward kernels, the stack kernel
    and the dropout mask each launch inside a guard for the input's device (cuda:1 while cuda:0 is current would
    otherwise run on the wrong GPU), and so does the modules' first plan (tuning and fit checks run there). On the
    CPU the guards are no-ops; here they are recorded."""
    from tritonrnn import dropout, functional, fused_stack, layer_run, modules

    guards, launched = _DeviceGuards(), set()
    for module in (functional, layer_run, fused_stack, dropout, modules):
        monkeypatch.setattr(module, "on_device", guards)
    real_plan = functional.kernel_plan

    def guarded_plan(*args, **kwargs):
        # A plan can be where the layer is tuned (timed on the current device) and compiled to check it fits.
        assert guards.entered and guards.entered[-1] == DEVICE, ("kernel_plan", guards.entered)
        launched.add("kernel_plan")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(functional, "kernel_plan", guarded_plan)
    for module, name in [(layer_run, "rnn_fwd_kernel"), (layer_run, "rnn_bwd_kernel"),
                         (layer_run, "lstm_proj_fwd_kernel"), (layer_run, "lstm_proj_bwd_kernel"),
                         (fused_stack, "stack_fwd_kernel"), (fused_stack, "stack_bwd_kernel"),
                         (dropout, "dropout_mask_kernel")]:  # fmt: skip
        guarded = _GuardedLaunch(name, getattr(module, name), guards, DEVICE, launched)
        monkeypatch.setattr(module, name, guarded)
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, device=DEVICE, requires_grad=True)
    models = [tritonrnn.LSTM(3, 5, num_layers=2, dropout=0.5), tritonrnn.LSTM(3, 5, proj_size=2)]
    if fused_stack_too:
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
        models = [tritonrnn.GRU(3, 5, num_layers=2, dropout=0.5)]
    for model in models:
        out, _ = model.to(DEVICE).train()(x)
        torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    dropout.mask(dropout.LayerDropout(0.5, False, torch.tensor([3], device=DEVICE)), 2, 2, 4, DEVICE)
    assert not guards.entered
    expected = {"stack_fwd_kernel", "stack_bwd_kernel"} if fused_stack_too else {
        "rnn_fwd_kernel", "rnn_bwd_kernel", "lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel"}  # fmt: skip
    assert launched == expected | {"dropout_mask_kernel", "kernel_plan"}


# --- degenerate arguments torch.nn accepts ---------------------------------------------------------


@pytest.mark.fallback
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_of_zero_sequences_gives_empty_results_like_torch(cell, batch_first):
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), dtype=torch.float64, requires_grad=True)
    ours = ours.to(DEVICE)
    got, want = ours(x.to(DEVICE)), theirs(x)
    for a, b in zip(flat_outputs(got), flat_outputs(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # Gradients through the (empty) outputs and the final states: zeros, as torch.nn's.
    for module, result in ((ours, got), (theirs, want)):
        loss = sum(t.sum() for t in flat_outputs(result))
        grads = torch.autograd.grad(loss, [x, *module.parameters()], allow_unused=True)
        assert all(g is None or not g.any() for g in grads)

    stack = tritonrnn.StackedRNN(3, [(cell, 4), ("gru", 4)], batch_first=batch_first, dropout=0.3).double().to(DEVICE)
    out, states = stack(x.to(DEVICE))
    assert out.shape == ((0, 5, 4) if batch_first else (5, 0, 4))
    assert states[1].shape == (1, 0, 4)


@pytest.mark.parametrize("mode", ["standard", "variational"])
def test_dropout_of_one_zeroes_the_upper_layers_inputs_like_torch(mode):
    """torch.nn accepts dropout=1: every upper layer reads zeros (deterministic, so comparable), nothing is NaN."""
    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 4, num_layers=3, dropout=1.0)
    ours.dropout_mode = mode
    ours = ours.to(DEVICE).train()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module, device in ((ours, DEVICE), (theirs.train(), torch.device("cpu"))):
        xr = x.to(device).requires_grad_()
        out, (h, c) = module(xr)
        loss = out.sum() + h.square().sum() + c.sum()
        results.append([out, h, c, *torch.autograd.grad(loss, [xr, *module.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.parametrize("generator", ["kernels", "torch"])
@pytest.mark.parametrize("variational", [False, True])
def test_dropout_mask_of_one_is_zeros(generator, variational, monkeypatch):
    """The multipliers at p = 1, from the kernels' generator and from torch's (the CPU path without the interpreter):
    zeros, not NaN (0 * inf) or a division error."""
    from tritonrnn import dropout

    device = DEVICE
    if generator == "torch":
        monkeypatch.setattr(dropout, "interpret_mode", lambda: False)
        device = torch.device("cpu")
    seed = torch.tensor([5], device=device)
    multipliers = dropout.mask(dropout.LayerDropout(1.0, variational, seed), 3, 2, 7, device)
    assert multipliers.shape == ((1 if variational else 3), 2, 7) and not multipliers.any()
    half = dropout.mask(dropout.LayerDropout(0.5, variational, seed), 3, 2, 7, device)
    assert set(half.unique().tolist()) <= {0.0, 2.0} and half.any()


@pytest.mark.fallback
def test_torch_func_transforms_differentiate_the_layers(monkeypatch, caplog):
    """torch.func.grad over functional_call and jacrev in the input, as with torch.nn: the kernels run the forward,
    the reference the backward (functorch's wrapped tensors cannot reach a kernel), logged once; a fused stack
    under a transform runs layer by layer."""
    from torch.func import functional_call, grad, jacrev

    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 4, num_layers=2, dropout=0.5)
    ours, theirs = ours.to(DEVICE).eval(), theirs.eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        got = grad(lambda p: functional_call(ours, p, (x.to(DEVICE),))[0].square().sum())(dict(ours.named_parameters()))
    want = grad(lambda p: functional_call(theirs, p, (x,))[0].square().sum())(dict(theirs.named_parameters()))
    for name in want:
        torch.testing.assert_close(got[name].cpu(), want[name])
    assert any("torch.func transform" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(
        jacrev(lambda x: ours(x)[0].sum(0))(x.to(DEVICE)).cpu(), jacrev(lambda x: theirs(x)[0].sum(0))(x)
    )

    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    stack = tritonrnn.StackedRNN(3, [("gru", 4), ("gru", 4)]).double().to(DEVICE)
    expected = torch.autograd.grad(stack(x.to(DEVICE))[0].sum(), list(stack.parameters()))
    got = grad(lambda p: functional_call(stack, p, (x.to(DEVICE),))[0].sum())(dict(stack.named_parameters()))
    for a, b in zip(got.values(), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.fallback
def test_torch_func_vmap_and_jvp_run_the_reference_where_torch_nn_has_no_rule(caplog):
    """torch.func.vmap over the input (an ensemble's calls, say), per-sample gradients (vmap of grad) and forward mode
    (jvp): torch.nn's layers fail there (no batching rule for aten::lstm), and the kernels' autograd Function has no
    such rule either, so each layer runs the reference's torch ops there, logged once: the results of a loop over
    the samples, and of central differences."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    lstm = tritonrnn.LSTM(3, 4, num_layers=2).double().to(DEVICE)
    stack = tritonrnn.StackedRNN(3, [("gru", 4), ("rnn_tanh", 4)]).double().to(DEVICE)
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64, device=DEVICE)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        for model in (lstm, stack):
            got = vmap(lambda x, model=model: model(x)[0])(xs)
            for k in range(len(xs)):
                torch.testing.assert_close(got[k], model(xs[k])[0])
    assert any("under torch.func's vmap runs the reference" in r.getMessage() for r in caplog.records)

    def loss(params, x):
        return functional_call(lstm, params, (x,))[0].square().sum()

    params = {name: p.detach() for name, p in lstm.named_parameters()}
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for k in range(len(xs)):
        expected = torch.autograd.grad(loss(dict(lstm.named_parameters()), xs[k]), list(lstm.parameters()))
        for name, want in zip(params, expected):
            torch.testing.assert_close(per_sample[name][k], want)

    # Forward mode (jvp, jacfwd) likewise: against central differences in float64.
    x, v = xs[0], torch.randn_like(xs[0])
    _, tangent = torch.func.jvp(lambda x: lstm(x)[0], (x,), (v,))
    with torch.no_grad():
        eps = 1e-6
        expected = (lstm(x + eps * v)[0] - lstm(x - eps * v)[0]) / (2 * eps)
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-8)

    # Dropout in training: the masks are torch's draws, per sample with randomness="different" (the kernels' seed,
    # batched per sample then, cannot be read), the same for every sample with "same".
    dropped = tritonrnn.StackedRNN(3, [("lstm", 4), ("gru", 4)], dropout=0.5, dropout_mode="variational")
    dropped = dropped.double().to(DEVICE).train()
    same = vmap(lambda x: dropped(x)[0], randomness="same")(xs[:1].expand(2, -1, -1, -1))
    different = vmap(lambda x: dropped(x)[0], randomness="different")(xs[:1].expand(2, -1, -1, -1))
    assert torch.equal(same[0], same[1]) and not torch.equal(different[0], different[1])


@pytest.mark.fallback
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_gradient_penalty_matches_torch(cell, caplog):
    """A gradient penalty (backward with create_graph=True, then differentiated again): the kernels' backward is not
    differentiable, so that backward runs the reference, logged once; the result is torch.nn's."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    results = []
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        for module, device in ((ours.to(DEVICE), DEVICE), (theirs, torch.device("cpu"))):
            xr = x.to(device).requires_grad_()
            (gx,) = torch.autograd.grad(module(xr)[0].square().sum(), xr, create_graph=True)
            results.append([gx, *torch.autograd.grad(gx.square().sum(), list(module.parameters()))])
    assert any("create_graph=True" in r.getMessage() for r in caplog.records)
    for a, b in zip(*results):
        torch.testing.assert_close(a.cpu(), b)


@pytest.mark.fallback
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_jit_trace_records_torch_nn_valid_at_other_lengths(cell, caplog):
    """torch.jit.trace (and the ONNX exporter built on it) records torch.nn's operator, which holds for any length
    and batch; a trace of the kernels' launch or of the reference's loop would not. Logged once."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2, bidirectional=True)
    ours, theirs = ours.eval(), theirs.eval()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        traced = torch.jit.trace(ours.to(DEVICE), (torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE),))
    assert any("torch.jit.trace" in r.getMessage() for r in caplog.records)
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    got, want = tree_leaves(traced(x.to(DEVICE))), tree_leaves(theirs(x))  # output, h_n (and c_n)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b)


def test_jit_trace_of_a_stack_is_refused_with_the_way_out():
    stack = tritonrnn.StackedRNN(3, [("lstm", 4), ("gru", 4)]).to(DEVICE).eval()
    with pytest.raises(NotImplementedError, match="torch.export"):
        torch.jit.trace(stack, (torch.randn(5, 2, 3, device=DEVICE),))


@pytest.mark.fallback
def test_jit_trace_of_variational_dropout_in_training_is_refused_with_the_way_out():
    """torch.nn's operator, which a trace records, has no variational dropout: the module is named, not the
    stack's functional form, and eval mode traces."""
    model = tritonrnn.LSTM(3, 4, num_layers=2, dropout=0.3, dropout_mode="variational").to(DEVICE)
    x = torch.randn(5, 2, 3, device=DEVICE)
    with pytest.raises(NotImplementedError, match=r"cannot record LSTM in training with dropout_mode='variational'"):
        torch.jit.trace(model, (x,))
    torch.jit.trace(model.eval(), (x,))


def test_jit_script_is_refused_with_the_way_out():
    """TorchScript cannot compile the kernels' host code: a clear error naming the module and torch.export, also for
    a tritonrnn module inside a user's model, instead of TorchScript failing on some line of tritonrnn."""
    models = [
        tritonrnn.GRU(3, 4),
        nn.Sequential(nn.Linear(3, 3), tritonrnn.LSTM(3, 4)),
        tritonrnn.StackedRNN(3, [("rnn_tanh", 4)]),
    ]
    ways_out = ["torch.export or torch.jit.trace"] * 2 + [r"torch.export \(a stack refuses torch.jit.trace too\)"]
    for model, name, way_out in zip(models, ["GRU", "LSTM", "StackedRNN"], ways_out):
        with pytest.raises(RuntimeError, match=f"torch.jit.script does not support tritonrnn's {name}.*use {way_out}$"):
            torch.jit.script(model)


def test_forward_mode_ad_outside_torch_func_is_refused():
    """torch.autograd.forward_ad's dual tensors reach the kernels' autograd Function, which has no forward-mode rule
    (nor have torch.nn's cuDNN and oneDNN layers): torch's error, not a result. (torch.func.jvp runs the reference:
    test_torch_func_vmap_and_jvp_run_the_reference_where_torch_nn_has_no_rule.)"""
    from torch.autograd import forward_ad

    model = tritonrnn.GRU(3, 4).to(DEVICE)
    x = torch.randn(5, 2, 3, device=DEVICE)
    with pytest.raises(NotImplementedError, match="forward mode AD"), forward_ad.dual_level():
        model(forward_ad.make_dual(x, torch.randn_like(x)))


def _shape_only_models():
    return [
        (tritonrnn.LSTM(3, 4, num_layers=2, dropout=0.5, bidirectional=True), (5, 2, 8)),
        (tritonrnn.LSTM(3, 4, proj_size=2, dropout_mode="variational"), (5, 2, 2)),
        (tritonrnn.GRU(3, 4, num_layers=2, dropout=0.5, dropout_mode="variational"), (5, 2, 4)),
        (tritonrnn.StackedRNN(3, [("lstm", 4), ("rnn_relu", 6)], dropout=0.3, dropout_mode="variational"), (5, 2, 6)),
    ]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_meta_tensors_and_fake_tensor_mode_give_the_shapes(training):
    """Shape inference with no data, as torch.nn allows it: meta tensors, and FakeTensorMode (which torch.export
    and tools use). The layers go through the custom op's fake implementation: nothing is launched, nothing falls
    back, and the backward runs too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for model, shape in _shape_only_models():
        model = model.to("meta").train(training)
        out = model(torch.randn(5, 2, 3, device="meta"))[0]
        assert out.shape == shape and out.device.type == "meta"
        out.sum().backward()
        assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    with FakeTensorMode():
        for model, shape in _shape_only_models():  # built inside the mode: fake parameters
            model = model.train(training)
            out = model(torch.randn(5, 2, 3, device=DEVICE))[0]
            assert out.shape == shape
            out.sum().backward()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fake CUDA tensors on a machine without a GPU")
def test_fake_cuda_trace_without_a_gpu_gives_the_kernels_shapes():
    """A trace of CUDA tensors on a machine without a GPU (FakeTensorMode, as torch.export on a build host) has no
    GPU to ask whether the kernels would run: the op's fake outputs are the kernels' full buffers (saved values, the
    projection's sequence), which a GPU running the kernels returns, not the fallback's empty ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, B, I, H, P = 5, 2, 3, 4, 3
    with FakeTensorMode():

        def fake(*shape):
            return torch.randn(*shape, device="cuda")

        outputs = torch.ops.tritonrnn.layer(
            fake(T, B, I), fake(1, B, P), fake(1, B, H), fake(4 * H, I), fake(1, 4 * H, P), fake(4 * H), fake(4 * H),
            fake(1, P, H), None, None, "lstm", False, 0.0, False, True, False,
        )  # fmt: skip
    hseq, _, _, h_n, c_n, saved, mseq = outputs
    assert hseq.device.type == "cuda"
    assert hseq.shape == (1, T + 1, B, P) and h_n.shape == (1, B, P) and c_n.shape == (1, B, H)
    assert saved.shape == (1, T, B, _plan.CELLS["lstm"][2] * H) and mseq.shape == (1, T, B, H)


def test_functional_call_with_parameters_of_another_dtype_like_torch():
    """The dtype check reads the parameters of this call: torch.func.functional_call with float64 parameters on a
    float32 module runs in float64, as torch.nn's does (the check used to read the module's own, stale ones)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    ours, theirs = make_pair("lstm", 3, 4, num_layers=2)
    ours, theirs = ours.float().to(DEVICE), theirs.float()
    params = {k: v.detach().double() for k, v in theirs.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    got = functional_call(ours, {k: v.to(DEVICE) for k, v in params.items()}, (x.to(DEVICE),))[0]
    want = functional_call(theirs, params, (x,))[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), want)
    assert ours(x.float().to(DEVICE))[0].dtype == torch.float32  # the module's own parameters again


@pytest.mark.fallback
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature:UserWarning")
@pytest.mark.parametrize("interpret", ["1", "0"], ids=["interpreter", "torchs-op"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_complex_modules_run_on_torch_nn_like_torch(cell, interpret, monkeypatch, caplog):
    """torch.nn's CPU layers run complex dtypes; the kernels have none: under the interpreter torch.nn's
    implementation runs them (logged), where the interpreter used to fail inside Triton (a KeyError 'complex64');
    without it, torch's own op, as for every CPU call."""
    if DEVICE.type != "cpu":
        pytest.skip("cuDNN has no complex layers either")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2, bidirectional=True)
    ours, theirs = ours.to(torch.complex64), theirs.to(torch.complex64)
    x = torch.randn(5, 2, 3, dtype=torch.complex64)
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        got, want = flat_outputs(ours(x)), flat_outputs(theirs(x))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    logged = any("complex64 under the interpreter runs on torch.nn's" in r.getMessage() for r in caplog.records)
    assert logged == (interpret == "1")


def assert_float32_close(actual, expected, what: str) -> None:
    """Ours against torch.nn's CPU layers in float32: the norm-relative error every comparison uses
    (helpers.TOLERANCE), which a GPU's other summation order meets, where an element-wise bound would need loosening
    for the elements that cancel."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = rel_err(actual.cpu(), expected.cpu())
    assert err < TOLERANCE[torch.float32], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_parametrized_weights_are_computed_once_per_call_like_torch(cell):
    """weight_norm / spectral_norm on the recurrent weights (torch.nn.utils.parametrizations): each call computes a
    parametrized weight as often as torch.nn's forward does, so spectral_norm's power iteration (a step per access,
    in training mode) leaves the same vectors and gives the same outputs and gradients."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 5, num_layers=2)
    ours, theirs = ours.float(), theirs.float()
    counters = []
    for module in (ours, theirs):
        spectral_norm(module, "weight_hh_l0")
        weight_norm(module, "weight_ih_l1")
        counters.append(CountCalls())
        parametrize.register_parametrization(module, "weight_hh_l1", counters[-1])
    # The same power-iteration vectors in both. load_state_dict and .to read the weights too (a power-iteration step
    # each in training mode): both modules get them.
    state = copy.deepcopy(theirs.state_dict())
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    ours, theirs = ours.to(DEVICE), theirs.to("cpu")
    x = torch.randn(6, 2, 3)
    for counter in counters:
        counter.calls = 0  # count the calls' accesses only
    for _ in range(2):  # the second call starts from the vectors the first left
        got, want = ours(x.to(DEVICE)), theirs(x)
        assert_float32_close(got[0], want[0], "output")
        got[0].square().sum().backward()
        want[0].square().sum().backward()
    assert counters[0].calls == counters[1].calls > 0
    u = "parametrizations.weight_hh_l0.0._u"
    torch.testing.assert_close(ours.state_dict()[u].cpu(), theirs.state_dict()[u], atol=1e-6, rtol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_float32_close(p.grad, q.grad, name)


@pytest.mark.parametrize("path", ["kernels", pytest.param("create_graph", marks=pytest.mark.fallback)])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "lstm_proj"])
def test_frozen_parameters_and_data_without_grad_train_like_torch(cell, bidirectional, path):
    """Some parameters frozen (requires_grad False: one of each layer's two biases, the first layer's W_hh, the
    second's W_ih and projection; bidirectional: in both directions, and one direction's W_ih of the first) and an
    input without grad: the gradients of the others and of the initial states are torch.nn's (the backward skips
    the frozen ones' GEMMs: test_stacks.py). "create_graph": a backward that can itself be differentiated, which
    runs the reference's backward for the inputs that want a gradient."""
    torch.manual_seed(0)
    kwargs = dict(proj_size=3) if cell == "lstm_proj" else {}
    ours, theirs = make_pair(cell.removesuffix("_proj"), 3, 5, num_layers=2, bidirectional=bidirectional, **kwargs)
    ours, theirs = ours.float().to(DEVICE), theirs.float()
    frozen = {"bias_hh_l0", "weight_hh_l0", "weight_ih_l1", "bias_ih_l1", "weight_hr_l1"}
    frozen |= {f"{name}_reverse" for name in frozen} | {"weight_ih_l0_reverse"} if bidirectional else set()
    for module in (ours, theirs):
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)
    x = torch.randn(6, 2, 3)
    D = 2 if bidirectional else 1
    h0 = torch.randn(2 * D, 2, 3 if kwargs else 5)
    hx = (h0, torch.randn(2 * D, 2, 5)) if cell.startswith("lstm") else h0
    hxs = [[t.clone().to(device).requires_grad_() for t in tree_leaves(hx)] for device in ("cpu", DEVICE)]
    results = []
    for module, x_, leaves in ((theirs, x, hxs[0]), (ours, x.to(DEVICE), hxs[1])):
        out, _ = module(x_, tuple(leaves) if cell.startswith("lstm") else leaves[0])
        trained = [p for name, p in module.named_parameters() if name not in frozen]
        results.append(
            [out, *torch.autograd.grad(out.square().sum(), [*leaves, *trained], create_graph=path != "kernels")]
        )
    names = ["output", *(f"state {k}" for k in range(len(hxs[0])))]
    names += [name for name, _ in ours.named_parameters() if name not in frozen]
    for name, got, want in zip(names, results[1], results[0], strict=True):
        assert_float32_close(got, want, name)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_matches_torch(cell, use_reentrant):
    """torch.utils.checkpoint around a module and a stack: the forward is run again in backward, the gradients are
    torch.nn's, on the kernels. The non-reentrant form allows each saved tensor to be unpacked once per backward."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 5, num_layers=2)
    ours, theirs = ours.float().to(DEVICE), theirs.float()
    x = torch.randn(6, 2, 3)
    xs = [x.clone().requires_grad_(), x.to(DEVICE).requires_grad_()]
    got = checkpoint(ours, xs[1], use_reentrant=use_reentrant)[0]
    want = theirs(xs[0])[0]
    assert_float32_close(got, want, "output")
    got.square().sum().backward()
    want.square().sum().backward()
    assert_float32_close(xs[1].grad, xs[0].grad, "input")
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_float32_close(p.grad, q.grad, name)

    stack = tritonrnn.StackedRNN(3, [(cell, 4), ("gru", 5)]).to(DEVICE)
    grads = []
    for run in (stack, lambda x: checkpoint(stack, x, use_reentrant=use_reentrant)):  # the reentrant form: no .grad()
        stack.zero_grad()
        xd = x.to(DEVICE).requires_grad_()
        run(xd)[0].sum().backward()
        grads.append([xd.grad, *(p.grad for p in stack.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.fallback
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_batched_gradients_differentiate_the_layers(cell, caplog):
    """torch.autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) hand the backward the older vmap's
    batched tensors, which a kernel cannot read: the reference's backward serves them (logged), as for torch.func."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4)
    ours, theirs = ours.float().to(DEVICE), theirs.float()
    x = torch.randn(5, 2, 3)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        got = torch.autograd.functional.jacobian(lambda x: ours(x)[0][-1], x.to(DEVICE), vectorize=True)
    want = torch.autograd.functional.jacobian(lambda x: theirs(x)[0][-1], x, vectorize=True)
    assert_float32_close(got, want, "jacobian")
    assert any("batched gradient" in r.getMessage() for r in caplog.records)

    cotangents = torch.randn(3, 5, 2, 4)
    outputs = []
    for module, device in ((ours, DEVICE), (theirs, "cpu")):
        xd = x.to(device).requires_grad_()
        out = module(xd)[0]
        outputs.append(torch.autograd.grad(out, xd, cotangents.to(device), is_grads_batched=True)[0].cpu())
    assert_float32_close(*outputs, "batched gradients")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
def test_in_place_ops_on_the_results_are_refused_or_differentiated_correctly(cell, bidirectional):
    """An in-place op on a result the backward needs raises at backward (one direction's output is a view of the h
    sequence the kernels save; cuDNN saves its output too, torch.nn's CPU layers do not), with the way out (clone it),
    never gives wrong gradients; on the final states, and on the
    bidirectional output (a new tensor), the gradients are torch.nn's."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 5, bidirectional=bidirectional)
    ours, theirs = ours.float().to(DEVICE), theirs.float()
    x = torch.randn(6, 2, 3)
    for target in ("output", "h_n", "c_n") if cell == "lstm" else ("output", "h_n"):
        grads = []
        for module, inp in ((ours, x.to(DEVICE)), (theirs, x)):
            module.zero_grad()
            out, state = module(inp)
            h, c = state if isinstance(state, tuple) else (state, None)
            {"output": out, "h_n": h, "c_n": c}[target].mul_(2.0)
            loss = out.sin().sum() + h.cos().sum() + (c.square().sum() if c is not None else 0)
            if module is ours and target == "output" and not bidirectional:
                with pytest.raises(RuntimeError, match="(?s)modified by an inplace operation.*clone an output"):
                    loss.backward()
                break
            loss.backward()
            grads.append([p.grad.cpu() for p in module.parameters()])
        else:
            for (name, _), a, b in zip(ours.named_parameters(), *grads, strict=True):
                assert_float32_close(a, b, f"{target} {name}")


_LSTM2, _STACK = [("lstm", 4)] * 2, [("lstm", 4), ("rnn_tanh", 4)]
_STACK_TARGETS = ["input", "layers.0.weight_ih", "layers.1.weight_hh", "layers.0.bias_hh"]


# (model, TRITONRNN_WAVEFRONT, targets that raise, targets forward kept a copy of)
@pytest.mark.parametrize(
    "make,wavefront,raising,copied",
    [
        pytest.param(lambda: tritonrnn.LSTM(3, 4, num_layers=2), None,
                     ["input", "weight_ih_l0", "weight_hh_l1", "bias_ih_l0", "bias_hh_l1"], [], id="LSTM"),
        # a bidirectional layer's kernels take its two directions' weights concatenated: a copy
        pytest.param(lambda: tritonrnn.GRU(3, 4, bidirectional=True), None,
                     ["input"], ["weight_ih_l0", "weight_hh_l0_reverse", "bias_hh_l0"], id="GRU-bidirectional"),
        pytest.param(lambda: tritonrnn.LSTM(3, 4, proj_size=2), None, ["weight_hr_l0", "weight_hh_l0"], [],
                     id="LSTM-proj"),
        pytest.param(lambda: tritonrnn.StackedRNN(3, _STACK), None, _STACK_TARGETS, [], id="StackedRNN"),
        pytest.param(lambda: tritonrnn.StackedRNN(3, _LSTM2), "fused", _STACK_TARGETS, [], id="StackedRNN-fused"),
        pytest.param(lambda: tritonrnn.StackedRNN(3, _LSTM2), "2", _STACK_TARGETS, [], id="StackedRNN-streams"),
    ],
)  # fmt: skip
def test_inputs_and_weights_modified_in_place_before_backward_raise_or_keep_the_forwards_gradients(
    monkeypatch, make, wavefront, raising, copied
):
    """The input or a parameter changed in place between forward and backward (an optimizer step too early) never
    gives wrong gradients: backward raises torch's error, with what it means here (a one-way layer's weight_hh
    appears as a [1, rows, columns] view), or, where forward kept a copy, gives the gradients forward's function has.
    A one-way layer's weights raise, as torch.nn's do."""
    from tritonrnn import functional

    if wavefront:
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", wavefront)
        monkeypatch.setattr(functional, "_layer", None)  # the stack-wide path, not layer by layer
    torch.manual_seed(0)
    model = make().double().to(DEVICE)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=DEVICE)
    weights = copy.deepcopy(model.state_dict())

    def gradients(modify=None):
        inp = x.clone().requires_grad_()
        out = model(inp)[0]
        if modify is not None:
            with torch.no_grad():
                {"input": inp, **dict(model.named_parameters())}[modify].add_(0.5)
        try:
            return torch.autograd.grad(out.sin().sum(), [inp, *model.parameters()])
        finally:
            model.load_state_dict(weights)

    expected = gradients()
    for target in raising:
        with pytest.raises(RuntimeError, match=r"(?s)modified by an inplace operation.*tritonrnn: an input, a param"):
            gradients(target)
    for target in copied:
        for got, want in zip(gradients(target), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, t=target: f"{t}: {m}")


# RNNBase refreshes _flat_weights in forward; torch.nn's modules get the same warning from export
@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights:UserWarning")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_torch_export_records_one_layer_op_a_layer_with_a_dynamic_length(grad):
    """torch.export: each layer one tritonrnn::layer node (the bidirectional layer's two directions in one), the
    program valid at other lengths than the traced one, gradients through it as eager's. Exported under no_grad the
    ops save nothing for backward (the op's ``save``)."""
    from torch.export import Dim, export

    torch.manual_seed(0)
    models = [
        (tritonrnn.LSTM(3, 5, num_layers=2, bidirectional=True), 2),
        (tritonrnn.GRU(3, 5, batch_first=True), 1),
        (tritonrnn.StackedRNN(3, [("lstm", 4), ("rnn_relu", 5)]), 2),
    ]
    for model, n_layers in models:
        model = model.to(DEVICE)
        time_dim = 1 if getattr(model, "batch_first", False) else 0
        shape = [2, 2, 3]
        shape[time_dim] = 6
        with torch.set_grad_enabled(grad):
            program = export(
                model, (torch.randn(shape, device=DEVICE),), dynamic_shapes=({time_dim: Dim("T", max=64)},)
            )
        layer_nodes = [n for n in program.graph.nodes if n.target is torch.ops.tritonrnn.layer.default]
        names = [a.name for a in torch.ops.tritonrnn.layer.default._schema.arguments]
        arguments = [dict(zip(names, n.args)) for n in layer_nodes]
        assert [a["save"] for a in arguments] == [grad] * n_layers, type(model).__name__
        # The precision is fixed where the program is made (the ieee_fp32 fixture's), as a compiled graph's is.
        assert [a["tf32"] for a in arguments] == [False] * n_layers
        shape[time_dim] = 9
        x = torch.randn(shape, device=DEVICE, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            got, want = program.module()(x)[0], model(x)[0]
        torch.testing.assert_close(got, want)
        if grad:
            torch.testing.assert_close(*(torch.autograd.grad(y.square().sum(), x)[0] for y in (got, want)))


class _ModelOfRecurrentModules(nn.Module):
    """A model around recurrent modules, as users write them: an LSTM given its states, a batch-first GRU, and a
    StackedRNN with every layer's output (a keyword argument)."""

    def __init__(self):
        super().__init__()
        self.lstm = tritonrnn.LSTM(6, 5, num_layers=2)
        self.gru = tritonrnn.GRU(5, 4, batch_first=True, bidirectional=True)
        self.stack = tritonrnn.StackedRNN(8, [("rnn_relu", 8), ("lstm", 8)], residual=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, h0, c0):
        out, (h_n, _) = self.lstm(x, (h0, c0))
        out, _ = self.gru(out.transpose(0, 1))
        outs, states = self.stack(out.transpose(0, 1), return_all_layers=True)
        return self.head(outs[0] + outs[1]) + h_n[-1].sum(-1, keepdim=True), states[1][1]


def test_fx_symbolic_trace_records_each_recurrent_module_as_one_call_like_torch_nn():
    """torch.fx.symbolic_trace keeps torch.nn's modules as leaves (one call_module node each); ours too, though they
    live outside torch.nn, so a model holding them traces (torchvision's feature extraction, FX passes). The traced
    GraphModule gives eager's outputs and gradients."""
    torch.manual_seed(0)
    model = _ModelOfRecurrentModules().to(DEVICE)
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls == ["lstm", "gru", "stack", "head"], calls
    # Traced themselves, they are not leaves: fx's own error, as for torch.nn's, or StackedRNN's on a Proxy input.
    for module, error in ((nn.LSTM(6, 5), "cannot be used as inputs to control flow"),
                          (model.lstm, "cannot be used as inputs to control flow"),
                          (model.stack, "StackedRNN: expected the input to be a Tensor, got Proxy")):  # fmt: skip
        with pytest.raises((torch.fx.proxy.TraceError, TypeError), match=error):
            torch.fx.symbolic_trace(module)
    stack_call = next(n for n in traced.graph.nodes if n.target == "stack")
    assert stack_call.kwargs == {"return_all_layers": True}, stack_call.kwargs
    x = torch.randn(7, 3, 6, device=DEVICE, requires_grad=True)
    h0, c0 = torch.randn(2, 2, 3, 5, device=DEVICE).unbind(0)
    results = []
    for run in (traced, model):
        out, c = run(x, h0, c0)
        results.append([out, c, *torch.autograd.grad(out.sum() + c.sum(), [x, *model.parameters()])])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _onnx_export(model, x):
    """torch.onnx.export's default (dynamo) exporter: (the ONNX model, an onnxruntime session on it)."""
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the test extra installs it)")
    ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True)
    model_proto = program.model_proto
    return model_proto, ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


ONNX_MODELS = {
    "lstm-2-layers": lambda: tritonrnn.LSTM(6, 5, num_layers=2),
    "gru-bidirectional-batch-first-no-bias": lambda: tritonrnn.GRU(
        6, 5, bidirectional=True, batch_first=True, bias=False
    ),  # fmt: skip
    "rnn-relu": lambda: tritonrnn.RNN(6, 5, nonlinearity="relu"),
    "stack-mixed-residual": lambda: tritonrnn.StackedRNN(6, [("lstm", 6), ("gru", 6), ("rnn_tanh", 6)], residual=True),
}


# RNNBase refreshes _flat_weights in forward; torch.nn's modules get the same warning from export
@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights:UserWarning")
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_export_records_onnx_rnn_ops_and_onnxruntime_gives_eagers_outputs(name):
    """torch.onnx.export (its default exporter, on torch.export) records torch's RNN op for each layer, which ONNX has
    (LSTM, GRU; a vanilla RNN as MatMul and its activation), not tritonrnn::layer, which it has not; onnxruntime
    then gives the eager model's output and final states."""
    torch.manual_seed(0)
    model = ONNX_MODELS[name]().eval()
    batch_first = getattr(model, "batch_first", False)
    x = torch.randn((3, 7, 6) if batch_first else (7, 3, 6))
    model_proto, session = _onnx_export(model, x)
    ops = {node.op_type for node in model_proto.graph.node}
    domains = {node.domain for node in model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, (domains, ops)  # no custom operator
    expected_op = {"lstm": "LSTM", "gru": "GRU", "rnn": "Relu", "stack": "GRU"}[name.split("-")[0]]
    assert expected_op in ops, ops
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out, states = model(x)
    expected = [out, *tree_leaves(states)]
    assert len(got) == len(expected), (len(got), len(expected))
    for g, e in zip(got, expected):
        # onnxruntime's own LSTM and GRU kernels, in float32 with their own summation order: float32's tolerance
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights:UserWarning")
@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode:UserWarning")
@pytest.mark.parametrize("dropout_mode", ["standard", "variational"])
def test_onnx_export_in_training_draws_the_dropout_masks_with_onnxs_random_op(dropout_mode):
    """In training mode the kernels' masks come from a seed ONNX cannot read: the export draws them with torch's random
    op, which ONNX records (RandomUniformLike), and onnxruntime's outputs keep whole units of the first layer's output
    zero in the second layer's input only through the mask: with p = 1 every unit is dropped, so the second layer sees
    zeros and its output is the model's output for a zero input to it."""
    torch.manual_seed(0)
    model = tritonrnn.LSTM(6, 5, num_layers=2, dropout=1.0, dropout_mode=dropout_mode).train()
    x = torch.randn(7, 3, 6)
    model_proto, session = _onnx_export(model, x)
    assert "RandomUniformLike" in {node.op_type for node in model_proto.graph.node}
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    second = nn.LSTM(5, 5)
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in model.state_dict().items() if "_l1" in k})
    with torch.no_grad():
        expected = second(torch.zeros(7, 3, 5))[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # onnxruntime's LSTM against torch.nn's


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_prune_and_module_hooks_on_the_module_train_like_torch(cell):
    """prune on LSTM/GRU/RNN itself (a forward pre-hook recomputing weight_hh_l1 = orig * mask) and the module's
    forward, pre-forward and full backward hooks: three SGD steps give torch.nn's outputs, pruned weights and
    gradients, the pruned entries stay zero, and each hook runs once per call as on the torch.nn module."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 5, num_layers=2)
    for module in (ours, theirs):
        torch.manual_seed(1)  # random_unstructured: the same mask in both
        prune.random_unstructured(module, "weight_hh_l1", amount=0.5)
        prune.l1_unstructured(module, "weight_ih_l0", amount=0.3)
    torch.testing.assert_close(ours.weight_hh_l1_mask, theirs.weight_hh_l1_mask, rtol=0, atol=0)
    ours = ours.to(DEVICE)
    calls = {"pre": 0, "forward": 0, "backward": 0}

    def count(name):
        def hook(*args):
            calls[name] += 1

        return hook

    ours.register_forward_pre_hook(count("pre"))
    ours.register_forward_hook(count("forward"))
    ours.register_full_backward_hook(count("backward"))
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (ours, theirs)]
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    for step in range(3):  # each step runs on the pruned weights the last update left
        xs = [x.to(DEVICE, copy=True).requires_grad_(), x.clone().requires_grad_()]
        got, want = ours(xs[0])[0], theirs(xs[1])[0]
        torch.testing.assert_close(got.cpu(), want, msg=lambda m, step=step: f"step {step}: {m}")
        for out, optimiser in zip((got, want), optimisers):
            optimiser.zero_grad()
            out.square().sum().backward()
            optimiser.step()
        torch.testing.assert_close(xs[0].grad.cpu(), xs[1].grad, msg=lambda m, step=step: f"step {step} input: {m}")
    assert calls == {"pre": 3, "forward": 3, "backward": 3}
    for name in ("weight_hh_l1_orig", "weight_ih_l0_orig"):
        torch.testing.assert_close(getattr(ours, name).cpu(), getattr(theirs, name), msg=name)
    assert (ours.weight_hh_l1.cpu()[theirs.weight_hh_l1_mask == 0] == 0).all()
    prune.remove(ours, "weight_hh_l1")  # makes the pruning permanent: a plain parameter again
    prune.remove(theirs, "weight_hh_l1")
    torch.testing.assert_close(ours(x.to(DEVICE))[0].cpu(), theirs(x)[0])


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (1, True), (2, False)])
def test_output_and_final_states_are_separate_tensors_like_torch_nn(cell, num_layers, bidirectional):
    """As torch.nn's: no two of output, h_n and c_n share memory, so an in-place change of a state (a decoder that
    edits h_n) leaves the output as it was; one layer's states are the layer's own outputs (no copy), still not
    views of the output sequence."""
    torch.manual_seed(0)
    module = getattr(tritonrnn, cell)(3, 5, num_layers=num_layers, bidirectional=bidirectional).double().to(DEVICE)
    out, states = module(torch.randn(4, 2, 3, dtype=torch.float64, device=DEVICE))
    tensors = [out, *(states if isinstance(states, tuple) else (states,))]
    storages = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(storages)) == len(storages)
    before = out.clone()
    for state in tensors[1:]:
        state.add_(1.0)
    assert torch.equal(out, before)


@pytest.mark.parametrize(
    "cell, kwargs",
    [("lstm", dict(proj_size=3)), ("gru", dict(bidirectional=True)), ("rnn_tanh", {})],
    ids=["lstm-proj", "gru-bidirectional", "rnn"],
)
def test_a_retained_graph_backpropagates_twice_and_inference_mode_runs_as_torch_nn(cell, kwargs):
    """A gradient with retain_graph=True (torch.nn's), then backward again through the same graph: the second gives
    the first's gradients bit for bit (a backward that changed what forward saved, reusing its buffers in place,
    would not). A forward under torch.inference_mode gives torch.nn's outputs and states."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 5, 7, num_layers=2, **kwargs)
    ours = ours.to(DEVICE)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    grads = []
    for module, device in ((ours, DEVICE), (theirs, torch.device("cpu"))):
        xx = x.to(device, copy=True).requires_grad_()
        y, state = module(xx)
        h = state[0] if isinstance(state, tuple) else state
        loss = y.square().sum() + h.pow(3).sum()
        leaves = [xx, *module.parameters()]
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        loss.backward()
        grads.append((first, [leaf.grad for leaf in leaves]))
        with torch.inference_mode():
            grads[-1] += (module(x.to(device)),)
    (ours_first, ours_second, ours_infer), (first, second, infer) = grads
    for got, want in zip(ours_first, first):
        torch.testing.assert_close(got.cpu(), want)
    for got, want in zip(ours_second, ours_first):  # .grad after one backward: what grad gave, unchanged by it
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(tree_leaves(ours_infer), tree_leaves(infer)):
        torch.testing.assert_close(got.cpu(), want)
