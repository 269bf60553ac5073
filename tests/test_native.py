"""The layers' recurrence on torch's own op (tritonrnn/native.py), which CPU tensors without the Triton interpreter
run and, on any device, the layers the kernels cannot hold: against the reference (the same dropout masks and residual
sums) and against torch.nn, outputs, states and every gradient; and the cases where the reference runs instead."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import DEVICE
from helpers import CELLS, TOLERANCE, composed_reference, flat, loss_weights, make_pair, rel_err, run
from torch.nn.utils.rnn import pack_sequence

import tritonrnn
from tritonrnn import dropout as _dropout
from tritonrnn import native, reference
from tritonrnn._plan import CELLS as GATES


@pytest.fixture
def no_interpreter(monkeypatch):
    """The CPU path a user gets (TRITON_INTERPRET off), with torch's op calls counted by cell."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []

    def counted(cell, op):
        return lambda *args: calls.append(cell) or op(*args)

    monkeypatch.setattr(native, "_OPS", {cell: counted(cell, op) for cell, op in native._OPS.items()})
    return calls


def _weights(cell, I, H, D, bias, proj, generator=None):
    """D directions of (w_ih, w_hh, b_ih, b_hh[, w_hr]) in float64, requiring gradients (biases None without bias)."""
    G, N = GATES[cell][1], proj or H

    def randn(*shape):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * 0.4).requires_grad_()

    biases = (randn(G * H), randn(G * H)) if bias else (None, None)
    return [(randn(G * H, I), randn(G * H, N), *biases) + ((randn(N, H),) if proj else ()) for _ in range(D)]


VARIANTS = ["plain", "no bias", "lengths", "residual+dropout", "residual+variational dropout+lengths", "projection"]


@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bidir"])
@pytest.mark.parametrize(
    "cell, variant", [(c, v) for c in CELLS for v in VARIANTS if v != "projection" or c == "lstm"]
)  # fmt: skip
def test_native_layer_matches_the_reference(no_interpreter, cell, D, variant):
    """One layer, float64, odd sizes: y, the dropped-out z, h_n, c_n and the gradients of x, h0, c0 and every
    weight equal the reference's (the same dropout seed gives both the same mask)."""
    generator = torch.Generator().manual_seed(CELLS.index(cell) * 100 + D * 10 + VARIANTS.index(variant))
    T, B, H = 7, 5, 3
    proj = 2 if variant == "projection" else 0
    N = proj or H
    I = D * N if "residual" in variant else 4
    weights = _weights(cell, I, H, D, variant != "no bias", proj, generator)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=generator, requires_grad=True)
    h0 = torch.randn(D, B, N, dtype=torch.float64, generator=generator, requires_grad=True)
    c0 = torch.randn(D, B, H, dtype=torch.float64, generator=generator, requires_grad=True) if cell == "lstm" else None
    lengths = torch.tensor([7, 2, 5, 1, 7], dtype=torch.int32) if "lengths" in variant else None
    dropout = None
    if "dropout" in variant:
        dropout = _dropout.draw(0.4, "variational" if "variational" in variant else "standard")
    residual = "residual" in variant

    inputs = [x, h0] + ([c0] if c0 is not None else []) + [w for d in weights for w in d if w is not None]
    results = []
    for layer_fn in (native.layer, reference.layer):
        y, z, h_n, c_n = layer_fn(cell, x, h0, c0, weights, residual, dropout, lengths)
        outputs = [t for t in (y, z, h_n, c_n) if t is not None]
        seeds = [torch.Generator().manual_seed(k) for k in range(len(outputs))]
        loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=g)).sum() for t, g in zip(outputs, seeds))
        results.append(outputs + list(torch.autograd.grad(loss, inputs)))
    assert no_interpreter == [cell]
    for ours, expected in zip(*results):
        assert rel_err(ours, expected) < TOLERANCE[torch.float64]
    if residual or dropout is not None:
        # Both layers end in reference.layer_output: the residual sum and the mask written out here instead, on the
        # recurrence alone (rows past a sequence's length output zeros, the residual's included).
        y_alone = native.layer(cell, x, h0, c0, weights, False, None, lengths)[0].detach()
        want_y = y_alone + x.detach() if residual else y_alone
        if residual and lengths is not None:
            want_y = want_y * (torch.arange(T)[:, None] < lengths)[..., None]
        assert rel_err(results[0][0], want_y) < TOLERANCE[torch.float64]
        if dropout is not None:
            want_z = want_y * _dropout.mask(dropout, T, B, D * N, x.device).double()
            assert rel_err(results[0][1], want_z) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("cell", CELLS)
def test_modules_without_the_interpreter_run_torchs_op_and_match_torch_nn(no_interpreter, cell):
    """The modules on CPU tensors, two bidirectional layers in float32, batched and packed: torch.nn's outputs,
    states and gradients (input, states, every parameter) to float32's tolerance."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 5, num_layers=2, bidirectional=True)
    ours, theirs = ours.float(), theirs.float()
    x = torch.randn(6, 4, 3)
    hx = torch.randn(4, 4, 5)
    hx = (hx, torch.randn(4, 4, 5)) if cell == "lstm" else hx
    weights = loss_weights((6, 4, 10), [(4, 4, 5)] * (2 if cell == "lstm" else 1))
    for got, expected in zip(run(ours, x, hx, weights), run(theirs, x, hx, weights)):
        got = got.values() if isinstance(got, dict) else got
        expected = expected.values() if isinstance(expected, dict) else expected
        for a, b in zip(got, expected):
            assert rel_err(a, b) < TOLERANCE[torch.float32]
    assert no_interpreter == [cell] * 2

    sequences = [torch.randn(n, 3) for n in (5, 2, 4)]
    packed = pack_sequence(sequences, enforce_sorted=False)
    out, states = ours(packed)
    ref_out, ref_states = theirs(packed)
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    assert rel_err(out.data, ref_out.data) < TOLERANCE[torch.float32]
    for a, b in zip(states if cell == "lstm" else [states], ref_states if cell == "lstm" else [ref_states]):
        assert rel_err(a, b) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("setting", ["2", "fused"])
def test_the_stack_switches_leave_cpu_tensors_layer_by_layer_on_torchs_op(no_interpreter, setting, monkeypatch):
    """TRITONRNN_WAVEFRONT (streams, or one launch for the stack) is for the kernels: without the interpreter a stack
    of CPU tensors runs layer by layer on torch's op, bit for bit what it gives with the switch off."""
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(3, [("gru", 5), ("gru", 5), ("gru", 5)])
    x = torch.randn(7, 2, 3, requires_grad=True)
    results = []
    for value in ("0", setting):
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", value)
        out, states = model(x)
        results.append([out, *states, *torch.autograd.grad(out.square().sum(), [x, *model.parameters()])])
    assert no_interpreter == ["gru"] * 6
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_half_precision_is_computed_in_float32(no_interpreter, cell, dtype):
    """bf16 and fp16 layers run torch's op in float32 and round the results, as the reference does: outputs, states
    and gradients equal the reference's but where float32's rounding tips an element to the neighbouring half value
    (at most 5% of the elements, by one unit in the last place). torch's op run in the half dtype itself gives other
    outputs in 25-70% of the elements here."""
    generator = torch.Generator().manual_seed(3)
    T, B, I, H = 9, 2, 3, 6
    weights = [tuple(w.detach().to(dtype).requires_grad_() for w in _weights(cell, I, H, 1, True, 0, generator)[0])]
    x = torch.randn(T, B, I, generator=generator).to(dtype).requires_grad_()
    h0 = torch.randn(1, B, H, generator=generator).to(dtype).requires_grad_()
    c0 = torch.randn(1, B, H, generator=generator).to(dtype).requires_grad_() if cell == "lstm" else None
    inputs = [x, h0, *weights[0]] + ([c0] if c0 is not None else [])
    results = []
    for layer_fn in (native.layer, reference.layer):
        y, _, h_n, c_n = layer_fn(cell, x, h0, c0, weights)
        outputs = [t for t in (y, h_n, c_n) if t is not None]
        assert all(t.dtype == dtype for t in outputs)
        loss = sum((t.double() * (k + 1)).sum() for k, t in enumerate(outputs))
        results.append(outputs + list(torch.autograd.grad(loss, inputs)))
    assert no_interpreter == [cell]
    for ours, expected in zip(*results):
        assert ours.dtype == dtype and (ours != expected).float().mean() <= 0.05
        torch.testing.assert_close(ours, expected, rtol=torch.finfo(dtype).eps, atol=1e-30)


def test_a_stack_with_dropout_draws_the_same_masks_as_the_reference(no_interpreter, monkeypatch):
    """A mixed StackedRNN in training (variational dropout, residual, initial states given): with the same seed, the
    native layers and the reference layers give the same outputs and gradients, and both equal the stack written out
    by hand (tests/helpers.composed_reference: the reference's recurrence, the residual sums and the masks drawn from
    the stack's seeds applied in the test, not by the library's shared ``reference.layer_output``)."""
    torch.manual_seed(0)
    stack = tritonrnn.StackedRNN(4, [("lstm", 4), ("gru", 4), ("rnn_relu", 4)], dropout=0.5,
                                 dropout_mode="variational", residual=True).double()  # fmt: skip
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    states = [(torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64))]
    states += [torch.randn(1, 3, 4, dtype=torch.float64) for _ in range(2)]

    def loss_of(outputs, finals):
        return sum((o * (k + 1)).sum() for k, o in enumerate(outputs)) + sum(
            (t * (k + 2)).sum() for k, t in enumerate(flat(finals))
        )

    def by_hand(xi, states):
        torch.manual_seed(1)  # the seeds the stack draws: one per inter-layer dropout, bottom first
        draws = [_dropout.draw(0.5, "variational") for _ in stack.layers[:-1]]
        masks = [_dropout.mask(d, 6, 3, 4, x.device).double() for d in draws] + [None]
        return composed_reference(stack, xi, states, masks)

    results = []
    for run_kind in ("torch's op", "reference", "by hand"):
        if run_kind == "reference":
            monkeypatch.setattr(native, "_why_not", lambda *a: "the test's reference run")
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        si = [tuple(t.clone().requires_grad_() for t in s) if isinstance(s, tuple) else s.clone().requires_grad_()
              for s in states]  # fmt: skip
        outputs, finals = by_hand(xi, si) if run_kind == "by hand" else stack(xi, si, return_all_layers=True)
        leaves = [xi, *flat(si), *stack.parameters()]
        results.append([*outputs, *flat(finals), *torch.autograd.grad(loss_of(outputs, finals), leaves)])
    assert no_interpreter == ["lstm", "gru", "rnn_relu"]
    assert len(results[0]) == len(results[2]) == 3 + 4 + 1 + 4 + 3 * 4
    for ours, expected in [(results[0], results[1]), (results[0], results[2])]:
        for a, b in zip(ours, expected):
            assert rel_err(a, b) < TOLERANCE[torch.float64]


def test_torch_func_grad_runs_torchs_op_and_vmap_the_reference(no_interpreter, monkeypatch):
    """torch.func.grad (autograd on functorch's wrapped tensors) runs torch's op; vmap over it (per-sample gradients:
    the op has no batching rule), grad begun inside torch.no_grad and grad with a batch of lengths (packing wraps the
    op's batch_sizes) run the reference. Every gradient equals torch.nn's (or the reference's)."""
    calls = []
    real = reference.layer_forward
    monkeypatch.setattr(reference, "layer_forward", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    torch.manual_seed(0)
    ours, theirs = make_pair("gru", 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    params = dict(ours.named_parameters())

    def loss(p, inputs):
        return torch.func.functional_call(ours, p, (inputs,))[0].square().sum()

    grads = torch.func.grad(loss)(params, x)
    theirs(x)[0].square().sum().backward()
    for name, p in theirs.named_parameters():
        assert rel_err(grads[name], p.grad) < TOLERANCE[torch.float64]
    assert no_interpreter == ["gru"] * 2 and calls == []  # one op call a layer

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 1))(params, x[:, :, None])
    assert no_interpreter == ["gru"] * 2 and calls == ["gru"] * 2  # the reference, once for each layer
    for b in range(2):
        theirs.zero_grad()
        theirs(x[:, b : b + 1])[0].square().sum().backward()
        for name, p in theirs.named_parameters():
            assert rel_err(per_sample[name][b], p.grad) < TOLERANCE[torch.float64]

    # Begun inside torch.no_grad, grad runs the op with grad off below its level: the reference (torch 2.13's CPU
    # LSTM then keeps no workspace for its backward). float32 LSTM: the oneDNN kernel.
    lstm, lstm_nn = (m.float() for m in make_pair("lstm", 3, 4))
    with torch.no_grad():
        grads = torch.func.grad(lambda p: torch.func.functional_call(lstm, p, (x.float(),))[0].square().sum())(
            dict(lstm.named_parameters())
        )  # fmt: skip
    lstm_nn(x.float())[0].square().sum().backward()
    for name, p in lstm_nn.named_parameters():
        assert rel_err(grads[name], p.grad) < TOLERANCE[torch.float32]
    assert no_interpreter == ["gru"] * 2 and calls == ["gru"] * 2 + ["lstm"]

    lengths = torch.tensor([5, 3], dtype=torch.int32)
    weights = _weights("lstm", 3, 2, 1, True, 0)
    h0, c0 = torch.zeros(1, 2, 2, dtype=torch.float64), torch.zeros(1, 2, 2, dtype=torch.float64)
    got, expected = (
        torch.func.grad(lambda w, f=f: f("lstm", x, h0, c0, [w], lengths=lengths)[0].square().sum())(weights[0])
        for f in (native.layer, reference.layer)
    )  # fmt: skip
    assert no_interpreter == ["gru"] * 2 and calls == ["gru"] * 2 + ["lstm"] * 3  # the last: `expected`'s own
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_training_runs_torchs_op_forward_and_backward(no_interpreter, dtype):
    """torch.compile of a CPU model without the interpreter: each layer's tritonrnn::layer runs torch's op, and its
    backward runs it again under torch.func.vjp (float32: the LSTM's oneDNN kernel, which needs grad on there).
    Outputs and every gradient equal eager's."""
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(3, [("lstm", 4), ("gru", 5)], dropout=0.3).to(dtype)
    x = torch.randn(6, 2, 3, dtype=dtype, requires_grad=True)
    results = []
    for call in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(1)
        out = call(x)[0]
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *model.parameters()])])
    torch._dynamo.reset()
    # eager: one call a layer (its backward is torch's op's own); compiled: one in the forward, one in the backward
    assert no_interpreter == ["lstm", "gru"] * 2 + ["gru", "lstm"]
    for a, b in zip(*results):
        assert rel_err(a, b) < TOLERANCE[dtype]


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None, reason="inductor needs a C++ compiler"
)
def test_inductor_compiles_a_model_that_trains_as_eager_does(no_interpreter):
    """torch.compile's default backend (inductor; the other compile tests use aot_eager): a bidirectional LSTM and GRU
    stack trains as eager does, on torch's op forward and backward."""
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(3, [("lstm", 4), ("gru", 5)], bidirectional=True)
    x = torch.randn(6, 2, 3, requires_grad=True)
    results = []
    torch._dynamo.reset()
    for call in (model, torch.compile(model, fullgraph=True)):
        out = call(x)[0]
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *model.parameters()])])
    torch._dynamo.reset()
    assert no_interpreter == ["lstm", "gru"] * 2 + ["gru", "lstm"]
    for a, b in zip(*results):
        assert rel_err(a, b) < TOLERANCE[torch.float32]


def test_where_torchs_op_cannot_serve_the_reference_runs(no_interpreter):
    """A sequence of length 0 and a missing bias run the reference, and still give the reference's results."""
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    one_bias = [_weights("lstm", 3, 2, 1, True, 0)[0][:3] + (None,)]
    h0, c0 = torch.zeros(1, 2, 2, dtype=torch.float64), torch.zeros(1, 2, 2, dtype=torch.float64)
    length_0 = torch.tensor([5, 0], dtype=torch.int32)
    for lengths, w in ((length_0, _weights("lstm", 3, 2, 1, True, 0)), (None, one_bias)):
        got = native.layer("lstm", x, h0, c0, w, lengths=lengths)
        expected = reference.layer("lstm", x, h0, c0, w, lengths=lengths)
        for a, b in zip(got, expected):
            assert (a is None and b is None) or torch.equal(a, b)
    assert no_interpreter == []


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward_matches_torch_nn(no_interpreter, cell):
    """create_graph=True (a gradient penalty) on the CPU path: torch's op differentiates its own backward, as torch.nn
    does; the second-order gradients of every parameter match torch.nn's."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for model in (ours, theirs):
        (grad_x,) = torch.autograd.grad(model(x)[0].pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad_x.pow(2).sum(), list(model.parameters())))
    assert no_interpreter == [cell] * 2
    for a, b in zip(*results):
        assert rel_err(a, b) < TOLERANCE[torch.float64]


# RNNBase refreshes _flat_weights in forward; torch.nn's modules get the same warning from export
@pytest.mark.filterwarnings("ignore:The tensor attributes self._flat_weights:UserWarning")
def test_an_exported_program_runs_torchs_op_inside_the_layer_op(no_interpreter):
    """torch.export records tritonrnn::layer; run on CPU tensors without the interpreter, the op's forward is torch's
    CPU op too, and so is its backward (the forward again, through torch.func.vjp): eager's outputs and input
    gradients."""
    from torch.export import Dim, export

    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(3, [("lstm", 4), ("gru", 5)], bidirectional=True).double()
    program = export(model, (torch.randn(6, 2, 3, dtype=torch.float64),), dynamic_shapes=({0: Dim("T", max=64)},))
    del no_interpreter[:]
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    got, want = program.module()(x)[0], model(x)[0]
    assert no_interpreter == ["lstm", "gru"] * 2
    assert rel_err(got, want) < TOLERANCE[torch.float64]
    grads = [torch.autograd.grad(y.square().sum(), x)[0] for y in (got, want)]
    assert rel_err(*grads) < TOLERANCE[torch.float64]
    assert no_interpreter == ["lstm", "gru"] * 2 + ["gru", "lstm"]  # the program's backward, top layer first


def test_the_op_runs_in_the_dtype_torch_nn_would_use():
    """On the CPU half precision in float32 (the reference's and the kernels' numerics); on a GPU in the dtype itself,
    as torch.nn's cuDNN layers; float64 on a GPU on the reference (whose backward can be differentiated again)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert [native.compute_dtype(cpu, d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)] == [
        torch.float32, torch.float32, torch.float32, torch.float64
    ]  # fmt: skip
    assert [native.compute_dtype(cuda, d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)] == [
        torch.bfloat16, torch.float16, torch.float32, None
    ]  # fmt: skip


@pytest.mark.fallback
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the kernels on CPU tensors need the interpreter (GPU: test_gpu.py)")
def test_layers_the_kernels_cannot_hold_run_torchs_op_with_the_kernels_masks(monkeypatch, caplog):
    """With the interpreter (the kernels' path), a layer whose plan says it does not fit runs torch's op, not the
    reference's step loop, logged once per layer: a mixed StackedRNN with variational dropout, residual sums and
    DropConnect gives, under one seed, the kernels' outputs, states and every gradient (so the same masks)."""
    import logging

    from tritonrnn import _plan, layer_op, layer_run

    torch.manual_seed(0)
    stack = tritonrnn.StackedRNN(5, [("lstm", 5), ("gru", 5), ("rnn_tanh", 5)], dropout=0.4, weight_drop=0.3,
                                 dropout_mode="variational", residual=True).double()  # fmt: skip
    x = torch.randn(7, 3, 5, dtype=torch.float64)

    def train_step():
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        outputs, states = stack(xi, return_all_layers=True)
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outputs)) + states[0][1].sum() + states[2].sum()
        return [*outputs, states[0][0], states[1], *torch.autograd.grad(loss, [xi, *stack.parameters()])]

    want = train_step()
    calls = []
    monkeypatch.setattr(
        native, "_OPS", {c: (lambda *a, c=c, op=op: calls.append(c) or op(*a)) for c, op in native._OPS.items()}
    )
    monkeypatch.setattr(layer_op, "plan_layer", lambda *args: "does not fit this GPU")
    monkeypatch.setattr(layer_run.LayerRun, "__init__", None)  # the kernels must not be reached
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        got = [train_step() for _ in range(2)][-1]
    assert calls == ["lstm", "gru", "rnn_tanh"] * 2
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all("does not fit this GPU; torch's own RNN op instead" in m for m in messages)
    for k, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < TOLERANCE[torch.float64], k


def test_cudnns_advice_to_flatten_is_dropped_for_the_fallbacks_calls_only(monkeypatch):
    """cuDNN warns at every call with weights that are not one flat buffer (the fallback's never are) and advises
    flatten_parameters(), which does not apply to them: that warning is dropped where tritonrnn calls the op, as torch
    attributes it to the Python frame calling the op (a stand-in warns as torch does); other warnings there, and the
    same advice elsewhere (a user's torch.nn layer), still reach the user."""
    import warnings

    real = native._OPS["gru"]

    def warning_op(text):
        def op(*args):
            warnings.warn(text, UserWarning, stacklevel=2)  # torch's PyErr_WarnEx(..., 1) from C: the caller's frame
            return real(*args)

        return op

    weights = _weights("gru", 3, 4, 1, True, 0)
    x, h0 = torch.randn(5, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)
    advice = native._UNFLATTENED_WARNING + ". This means they need to be compacted at every call, ..."
    for text, shown in ((advice, False), ("something else", True)):
        monkeypatch.setattr(native, "_OPS", {"gru": warning_op(text)})
        with warnings.catch_warnings(record=True) as seen:
            native.layer("gru", x, h0, None, weights)
        assert [str(w.message) for w in seen] == ([text] if shown else [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn(advice, UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [advice]


@pytest.mark.fallback
def test_sequences_longer_than_one_call_of_the_op_takes(no_interpreter, monkeypatch, caplog):
    """cuDNN takes at most 65,535 steps a call: a longer one-way sequence runs in chunks with the state carried (the
    one call's outputs, states and gradients), both directions or a batch of lengths on the reference, logged once
    where the op is a GPU's fallback (here the CPU stands in, with a limit of 3 steps)."""
    import logging

    from tritonrnn import _plan

    monkeypatch.setattr(native, "MAX_STEPS_PER_CALL", {"cpu": 3})
    generator = torch.Generator().manual_seed(5)
    T, B, H = 7, 2, 3
    x = torch.randn(T, B, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    for D, lengths, chunks in ((1, None, 3), (2, None, 0), (1, torch.tensor([7, 4], dtype=torch.int32), 0)):
        weights = _weights("lstm", 4, H, D, True, 0, generator)
        h0 = torch.randn(D, B, H, dtype=torch.float64, generator=generator, requires_grad=True)
        c0 = torch.randn(D, B, H, dtype=torch.float64, generator=generator, requires_grad=True)
        inputs = [x, h0, c0, *[w for d in weights for w in d]]
        results = []
        for layer_fn in (native.layer, reference.layer):
            y, _, h_n, c_n = layer_fn("lstm", x, h0, c0, weights, lengths=lengths)
            loss = (
                (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + h_n.sum() + c_n.square().sum()
            )
            results.append([y, h_n, c_n, *torch.autograd.grad(loss, inputs)])
        assert no_interpreter == ["lstm"] * chunks
        del no_interpreter[:]
        for a, b in zip(*results):
            assert rel_err(a, b) < TOLERANCE[torch.float64]
    # On the CPU the reference is a path by design, not news; a GPU's fallback says why it is not torch's op.
    both_ways = _weights("lstm", 4, H, 2, True, 0)
    assert "more than 3 steps" in native._why_not(x, both_ways, None)
    h0, c0 = torch.zeros(2, B, H, dtype=torch.float64), torch.zeros(2, B, H, dtype=torch.float64)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        native.layer("lstm", x, h0, c0, both_ways)
    assert not caplog.records


def test_non_contiguous_states_and_weights_reach_the_op_contiguous(no_interpreter, monkeypatch):
    """cuDNN refuses a non-contiguous hx and cannot view a non-contiguous weight flat (a learned initial state
    expanded over the batch, a parametrized weight): the op is handed contiguous tensors, with the same results."""
    seen = []
    real = native._OPS["gru"]

    def checking(x, hx, params, *options):
        seen.append(hx.is_contiguous() and all(p.is_contiguous() for p in params))
        return real(x, hx, params, *options)

    monkeypatch.setattr(native, "_OPS", {"gru": checking})
    generator = torch.Generator().manual_seed(6)
    w_ih, w_hh, b_ih, b_hh = _weights("gru", 4, 3, 1, True, 0, generator)[0]
    weights = [(w_ih, w_hh.detach().t().contiguous().t().requires_grad_(), b_ih, b_hh)]  # transposed storage
    x = torch.randn(5, 2, 4, dtype=torch.float64, generator=generator)
    h0 = torch.randn(1, 1, 3, dtype=torch.float64, generator=generator).expand(1, 2, 3)
    assert not weights[0][1].is_contiguous() and not h0.is_contiguous()
    got = native.layer("gru", x, h0, None, weights)
    expected = reference.layer("gru", x, h0, None, weights)
    assert seen == [True]
    for a, b in zip(got, expected):
        assert (a is None and b is None) or rel_err(a, b) < TOLERANCE[torch.float64]
