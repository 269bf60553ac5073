"""GPU tier (pytest -m gpu, on the device): the kernels at real sizes against cuDNN and float64.

Relative errors vs float64 (outputs, final states, every gradient) must be no worse than 1.5x
cuDNN's on the same inputs in bf16/fp16, and in IEEE fp32 than 2e-5 or 1.5x cuDNN's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import pytest
import torch
from conftest import fallback_expected
from helpers import CELLS, TOLERANCE, flat, loss_weights, make_pair, random_hx, rel_err, run, states_to
from test_stacks import random_states

import tritonrnn
from perf.runner import graphed
from tritonrnn import _capture, _plan, layer_run

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def release_cached_memory():
    """Each test's peak goes back to the GPU after it: up to 8 workers share the card, and a worker's allocator would
    otherwise keep the largest test's memory (a float64 reference at B=256, H=1024) for the rest of the run."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def errors_vs_float64(cell, T, B, I, H, L, dtype, seed=0, **module_kwargs):
    """(ours, cuDNN) relative errors vs a float64 cuDNN run, per tensor: outputs, final states and the gradients of
    the input, the initial states (random, given to every run) and every parameter."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ours, exact = make_pair(cell, I, H, num_layers=L, **module_kwargs)
    cudnn = copy.deepcopy(exact).to(dtype=dtype, device=CUDA)
    cudnn.flatten_parameters()
    ours = ours.to(dtype=dtype, device=CUDA)
    exact = exact.to(CUDA)
    x = torch.randn(T, B, I, dtype=torch.float64, generator=gen).to(CUDA)
    hx = states_to(random_hx(exact, B, gen), CUDA)
    with torch.no_grad():
        out, states = exact(x, hx)
    states = states if isinstance(states, tuple) else (states,)
    weights = loss_weights(out.shape, [s.shape for s in states], gen)
    ref = run(exact, x, hx, weights)
    assert {"hx0", "input"} <= set(ref[2]), sorted(ref[2])
    result = {}
    for name, module in (("ours", ours), ("cudnn", cudnn)):
        out, states, grads = run(module, x.to(dtype), states_to(hx, dtype), weights)
        errs = {"output": rel_err(out, ref[0])}
        errs.update({f"state{k}": rel_err(s, r) for k, (s, r) in enumerate(zip(states, ref[1]))})
        errs.update({f"grad {k}": rel_err(grads[k], r) for k, r in ref[2].items()})
        result[name] = errs
    # A bound of 1.5x an infinite cuDNN error would pass anything.
    assert all(math.isfinite(v) for v in result["cudnn"].values()), f"cuDNN's errors vs float64: {result['cudnn']}"
    return result["ours"], result["cudnn"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "T,B,I,H,L",
    [
        pytest.param(64, 16, 256, 256, 3, id="T64-B16-H256-L3"),
        pytest.param(128, 64, 512, 512, 2, id="T128-B64-H512-L2"),
        pytest.param(512, 256, 1024, 1024, 2, id="T512-B256-H1024-L2"),
        pytest.param(33, 5, 100, 100, 1, id="T33-B5-H100"),
    ],
)
def test_half_precision_error_within_1_5x_cudnn(cell, dtype, T, B, I, H, L):
    ours, cudnn = errors_vs_float64(cell, T, B, I, H, L, dtype)
    # A relu RNN's gradients jump where rounding flips a unit's sign: see test_kernels' note.
    factor = 3.0 if cell == "rnn_relu" else 1.5
    bad = {k: (v, cudnn[k]) for k, v in ours.items() if not v <= max(factor * cudnn[k], 1e-3)}
    assert not bad, f"(ours, cuDNN) relative errors vs float64: {bad}"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B,H,L", [(256, 16, 256, 2), (128, 64, 512, 2)])
def test_fp32_ieee_error(cell, T, B, H, L):
    ours, cudnn = errors_vs_float64(cell, T, B, H, H, L, torch.float32)  # IEEE on both sides (conftest.ieee_fp32)
    # A relu RNN's gradients jump where rounding flips a unit's sign, in fp32 too at these sizes (~8M pre-activations).
    factor = 3.0 if cell == "rnn_relu" else 1.5
    bad = {k: v for k, v in ours.items() if not v <= max(2e-5, factor * cudnn[k])}
    assert not bad, f"relative errors vs float64: {bad} (cuDNN's: {cudnn})"


def test_tf32_follows_the_matmul_flag():
    """allow_tf32 on: still correct to TF32 accuracy, and measurably less exact than IEEE."""
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32, _ = errors_vs_float64("lstm", 64, 16, 256, 256, 1, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    ieee, _ = errors_vs_float64("lstm", 64, 16, 256, 256, 1, torch.float32)
    assert max(tf32.values()) < 1e-2
    assert tf32["output"] > 3 * ieee["output"]


def test_autocast_float16_error_within_1_5x_cudnn(caplog):
    """float32 modules called under float16 autocast, the usual mixed-precision training: ours runs the kernels in
    float16 (no fallback logged), as cuDNN does; errors vs float64 (outputs, states, every gradient) no worse than
    1.5x cuDNN's."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ours, exact = make_pair("lstm", 256, 256, num_layers=2)
    cudnn = copy.deepcopy(exact).float().to(CUDA)
    cudnn.flatten_parameters()
    ours, exact = ours.float().to(CUDA), exact.to(CUDA)
    x = torch.randn(64, 16, 256, dtype=torch.float64, generator=gen).to(CUDA)
    hx = states_to(random_hx(exact, 16, gen), CUDA)
    with torch.no_grad():
        out, states = exact(x, hx)
    weights = loss_weights(out.shape, [s.shape for s in states], gen)
    ref = run(exact, x, hx, weights)
    errors = {}
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        for name, module in (("ours", ours), ("cudnn", cudnn)):
            with torch.autocast("cuda", dtype=torch.float16):
                got, got_states, grads = run(module, x.float(), states_to(hx, torch.float32), weights)
            assert got.dtype == torch.float16, (name, got.dtype)
            errors[name] = [rel_err(got, ref[0])] + [rel_err(s, r) for s, r in zip(got_states, ref[1])]
            errors[name] += [rel_err(grads[k], r) for k, r in ref[2].items()]
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert all(math.isfinite(b) for b in errors["cudnn"]), errors["cudnn"]
    bad = [(a, b) for a, b in zip(errors["ours"], errors["cudnn"]) if not a <= max(1.5 * b, 1e-3)]
    assert not bad, f"(ours, cuDNN) relative errors vs float64: {bad}"


def test_persistent_kernels_are_used_at_the_benchmark_sizes(caplog, launched_plans):
    """What a training step launches at H=512, B=16 in bf16 (after the compile check and any tuning): persistent
    grids of several programs, forward and backward, nothing logged."""
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        for cell in CELLS:
            del launched_plans[:]
            ours, _ = make_pair(cell, 512, 512)
            x = torch.randn(8, 16, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
            ours.to(dtype=torch.bfloat16, device=CUDA)(x)[0].sum().backward()
            assert sorted(name for name, _ in launched_plans) == ["rnn_bwd_kernel", "rnn_fwd_kernel"], cell
            assert all(plan.persistent and plan.num_programs > 1 for _, plan in launched_plans), launched_plans
    assert not caplog.records, [r.getMessage() for r in caplog.records]


@pytest.mark.fallback
def test_hidden_size_beyond_the_kernels_falls_back_correctly(caplog, monkeypatch, launched_plans):
    """The modules hand sizes the kernels cannot hold to torch.nn (cuDNN), logged once: torch.nn's forward runs for
    our module, no kernel launches, and the result is as accurate as bf16 allows."""
    handed_over = []
    forward = torch.nn.LSTM.forward

    def spy(self, *args, **kwargs):
        handed_over.append(isinstance(self, tritonrnn.LSTM))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.LSTM, "forward", spy)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        ours, _ = errors_vs_float64("lstm", 8, 4, 64, 4096, 1, torch.bfloat16)
    assert any("hidden_size=4096" in r.getMessage() for r in caplog.records)
    assert any(handed_over) and not launched_plans
    assert max(ours.values()) < TOLERANCE[torch.bfloat16], ours


@pytest.mark.fallback
def test_a_stacked_layer_beyond_the_kernels_runs_on_torchs_op(caplog, monkeypatch, launched_plans):
    """In a StackedRNN, a layer the kernels cannot hold (GRU H=2100 in bf16, above 2048) runs torch's own op (what
    torch.nn's bf16 GRU runs: cuDNN where torch was built with cuDNN 9.13 or newer, perf.probe prints it), logged
    once, instead of the reference's step loop; the layer that fits stays on the kernels. Every output and gradient
    within 1.5x torch.nn's bf16 error vs float64 (torch.nn's layers with the same weights)."""
    from tritonrnn import native

    calls = []
    ops = {c: (lambda *a, c=c, op=op: calls.append(c) or op(*a)) for c, op in native._OPS.items()}
    monkeypatch.setattr(native, "_OPS", ops)
    torch.manual_seed(0)
    stack = tritonrnn.StackedRNN(64, [("lstm", 128), ("gru", 2100)])
    exact = [torch.nn.LSTM(64, 128), torch.nn.GRU(128, 2100)]
    for k, module in enumerate(exact):
        module.load_state_dict({f"{name}_l0": p for name, p in stack.layers[k].state_dict().items()})
    exact = [m.double().to(CUDA) for m in exact]
    cudnn = [copy.deepcopy(m).to(torch.bfloat16) for m in exact]
    stack = stack.to(device=CUDA, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, 64, dtype=torch.float64, generator=gen).to(CUDA)
    weight = torch.randn(16, 4, 2100, dtype=torch.float64, generator=gen).to(CUDA)

    def step(forward, params, dtype):
        xr = x.to(dtype).requires_grad_()
        out = forward(xr)
        return [out, *torch.autograd.grad((out.double() * weight).sum(), [xr, *params])]

    def torch_nn(modules):
        return lambda xr: modules[1](modules[0](xr)[0])[0]

    ref = step(torch_nn(exact), [p for m in exact for p in m.parameters()], torch.float64)
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        ours = step(lambda xr: stack(xr)[0], list(stack.parameters()), torch.bfloat16)
    theirs = step(torch_nn(cudnn), [p for m in cudnn for p in m.parameters()], torch.bfloat16)
    assert calls == ["gru"] and launched_plans  # the LSTM on the kernels, the GRU on cuDNN
    messages = [r.getMessage() for r in caplog.records]
    fallbacks = [m for m in messages if "hidden_size=2100" in m or "reference" in m]
    assert len(fallbacks) == 1 and "hidden_size=2100" in fallbacks[0] and "torch's own RNN op" in fallbacks[0], messages
    errors = [(rel_err(a, r), rel_err(b, r)) for a, b, r in zip(ours, theirs, ref)]
    assert all(math.isfinite(b) and a <= max(1.5 * b, 1e-3) for a, b in errors), errors


def test_split_grid_stepwise_mode_on_gpu(forced_plan, launched_plans):
    """The one-launch-per-step mode (the fallback where a grid cannot be co-resident)."""
    forced_plan(persistent=False)
    ours, cudnn = errors_vs_float64("gru", 16, 8, 64, 200, 2, torch.bfloat16)
    assert all(v <= max(1.5 * cudnn[k], 1e-3) for k, v in ours.items())
    names = {name for name, _ in launched_plans}
    assert names == {"rnn_fwd_kernel", "rnn_bwd_kernel"} and not any(plan.persistent for _, plan in launched_plans)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize(
    "H,fields,k_split,B",
    [
        pytest.param(768, {}, None, 20, id="H768-heuristics"),  # LSTM and GRU: 16 units, 8 chunks
        pytest.param(384, dict(block_h=32, k_split=4), 4, 20, id="H384-32-units-4-chunks"),
        pytest.param(384, dict(block_h=16, k_split=8), 8, 20, id="H384-16-units-8-chunks"),
        # The tuner's 32-row tiles in chunks (autotune.candidates).
        pytest.param(384, dict(block_h=16, k_split=8, block_b=32), 8, 40, id="H384-8-chunks-32-row-tiles"),
    ],
)
def test_reduction_in_chunks_error_within_1_5x_cudnn(cell, H, fields, k_split, B, forced_plan, launched_plans):
    """The held reduction cut in chunks, a 3-D dot with a warp a chunk (kernels/recurrent._dot_k), at sizes that are
    no power of two, over two batch tiles (the second partial), bf16, forward and backward, against cuDNN's error."""
    if fields:
        forced_plan(**fields)
    ours, cudnn = errors_vs_float64(cell, 48, B, 64, H, 1, torch.bfloat16, seed=3)
    bad = {k: (v, cudnn[k]) for k, v in ours.items() if not v <= max(1.5 * cudnn[k], 1e-3)}
    assert not bad, f"(ours, cuDNN) relative errors vs float64: {bad}"
    expected = k_split or (_plan.SPLIT_WARPS if cell != "rnn_tanh" else 1)
    assert launched_plans and all(plan.k_split == expected for _, plan in launched_plans), launched_plans[:2]


def test_bitwise_deterministic_at_scale():
    torch.manual_seed(0)
    ours, _ = make_pair("lstm", 512, 512, num_layers=2)
    ours = ours.to(dtype=torch.bfloat16, device=CUDA)
    x = torch.randn(128, 64, 512, device=CUDA, dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        out, _ = ours(xr)
        results.append([out, *torch.autograd.grad(out.float().square().sum(), [xr, *ours.parameters()])])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("proj", [0, 64], ids=["lstm", "lstm-proj"])
def test_a_sequence_too_long_for_the_barrier_counter_runs_in_chunks_on_the_gpu(proj, monkeypatch, launched_plans):
    """The int32 barrier counter would wrap after some 8M steps: with the limit lowered to 10 steps' arrivals, a
    training step of chunked persistent launches (the counter zeroed between them) is one launch's bit for bit."""
    torch.manual_seed(0)
    ours, _ = make_pair("lstm", 256, 512, num_layers=2, bidirectional=True, proj_size=proj)
    ours = ours.to(dtype=torch.bfloat16, device=CUDA)
    x = torch.randn(97, 16, 256, device=CUDA, dtype=torch.bfloat16)
    chunk_counts = []
    split = layer_run.persistent_chunks
    monkeypatch.setattr(layer_run, "persistent_chunks", lambda *a: chunk_counts.append(len(split(*a))) or split(*a))
    results = []
    for limit in (None, 10):
        if limit is not None:
            programs = max(plan.num_programs for _, plan in launched_plans)
            monkeypatch.setattr(_plan, "MAX_BARRIER_ARRIVALS", limit * programs * (2 if proj else 1))
            assert set(chunk_counts) == {1}  # one launch a kernel call at the real limit
            del chunk_counts[:]
        xr = x.clone().requires_grad_()
        out, (h, c) = ours(xr)
        loss = out.float().square().sum() + h.float().sum() + c.float().sum()
        results.append([out, h, c, *torch.autograd.grad(loss, [xr, *ours.parameters()])])
    assert all(plan.persistent for _, plan in launched_plans)
    assert chunk_counts and min(chunk_counts) > 1  # every kernel call ran as several launches
    assert all(torch.isfinite(a.float()).all() and torch.equal(a, b) for a, b in zip(*results))


def test_sequence_of_100000_steps_with_64bit_offsets():
    """T * B * 4H = 3.3e9 elements in the input projection: offsets past 2**31 must be 64-bit."""
    torch.manual_seed(0)
    T, B, H = 100_000, 64, 128
    ours, exact = make_pair("lstm", 8, H)
    ours = ours.to(dtype=torch.bfloat16, device=CUDA)
    exact = exact.float().to(CUDA)
    x = torch.randn(T, B, 8, device=CUDA)
    # the reference in IEEE float32 (conftest.ieee_fp32)
    with torch.no_grad():
        out, (h, c) = ours(x.bfloat16())
        # cuDNN refuses sequences above 65,535 steps (pytorch/pytorch#133751): the reference in chunks, its state
        # carried over, is the same recurrence.
        state, chunks = None, []
        for chunk in x.split(50_000):
            ref, state = exact(chunk, state)
            chunks.append(ref)
        ref, (rh, rc) = torch.cat(chunks), state
    assert torch.isfinite(out).all()
    assert rel_err(out[-1000:], ref[-1000:]) < 3e-2
    assert rel_err(h, rh) < 3e-2 and rel_err(c, rc) < 3e-2


# --- stacks (issue 3): bidirectional, projection, dropout ----------------------------------------


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bidirectional_error_within_1_5x_cudnn(cell, dtype):
    ours, cudnn = errors_vs_float64(cell, 128, 64, 512, 512, 2, dtype, bidirectional=True)
    factor = 3.0 if cell == "rnn_relu" else 1.5
    bad = {k: (v, cudnn[k]) for k, v in ours.items() if not v <= max(factor * cudnn[k], 1e-3)}
    assert not bad, f"(ours, cuDNN) relative errors vs float64: {bad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_lstm_projection_error_within_1_5x_cudnn(dtype, bidirectional):
    ours, cudnn = errors_vs_float64(
        "lstm", 128, 64, 512, 512, 2, dtype, proj_size=128, bidirectional=bidirectional
    )  # fmt: skip
    bad = {k: (v, cudnn[k]) for k, v in ours.items() if not v <= max(1.5 * cudnn[k], 1e-3)}
    assert not bad, f"(ours, cuDNN) relative errors vs float64: {bad}"


def test_both_directions_run_in_one_launch_at_the_benchmark_size(launched_plans):
    """A bidirectional bf16 LSTM at H=512, B=64 launches both directions' grids at once (after the compile check
    and any tuning), forward and backward."""
    ours, _ = make_pair("lstm", 512, 512, bidirectional=True)
    x = torch.randn(8, 64, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    ours.to(dtype=torch.bfloat16, device=CUDA)(x)[0].float().sum().backward()
    assert sorted(name for name, _ in launched_plans) == ["rnn_bwd_kernel", "rnn_fwd_kernel"]
    assert all(plan.persistent and plan.directions_together for _, plan in launched_plans), launched_plans
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("mode", ["standard", "variational"])
@pytest.mark.parametrize("kind", ["StackedRNN", "LSTM", "GRU"])
def test_dropout_fp32_against_float64_reference_same_masks(kind, mode):
    """Training with dropout on the GPU: the fp32 kernels vs the float64 reference (which runs where the GPU kernels
    do not take float64; a float64 LSTM/GRU does not go to cuDNN, whose masks would be others) under the same seeds,
    hence the same masks, from random initial states: the output (a stack: every layer's), every final state and the
    gradients of the input, every initial state and every parameter."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    if kind == "StackedRNN":
        layers = [("lstm", 256), ("gru", 256), ("lstm", 128)]
        fast = tritonrnn.StackedRNN(64, layers, dropout=0.3, dropout_mode=mode, bidirectional=True).to(CUDA)
        initial = float32_states(fast, 16)
    else:
        cls = getattr(tritonrnn, kind)
        fast = cls(64, 256, num_layers=3, dropout=0.3, dropout_mode=mode, bidirectional=True).to(CUDA)
        initial = states_to(random_hx(fast, 16, gen), CUDA, torch.float32)
        weights = loss_weights((64, 16, 2 * 256), [(6, 16, 256)] * (2 if kind == "LSTM" else 1), gen)
    exact = copy.deepcopy(fast).double()
    x = torch.randn(64, 16, 64, device=CUDA)
    results = []
    for model, dtype in ((fast, torch.float32), (exact, torch.float64)):
        # float64 on the GPU runs the reference: the fallback is the float64 side's intent, not the kernels'
        with fallback_expected() if dtype == torch.float64 else contextlib.nullcontext():
            if kind == "StackedRNN":
                states = [states_to(s, dtype) for s in initial]
                results.append(stack_step_with_states(model, x.to(dtype), states, torch.square))
                continue
            torch.manual_seed(1)
            out, finals, grads = run(model, x.to(dtype), states_to(initial, dtype), weights)
            assert {"input", "hx0"} <= set(grads), sorted(grads)
            results.append([out, *finals, *grads.values()])
    errors = [rel_err(a, b) for a, b in zip(*results)]
    assert len(errors) == len(results[1]) and max(errors) < 2e-5, errors


def float32_states(model, batch):
    """Random float32 initial states for a StackedRNN on the GPU: (h, c) for its LSTM layers, h for the others."""
    gen = torch.Generator().manual_seed(2)
    return [tuple(t.float().to(CUDA) for t in s) if isinstance(s, tuple) else s.float().to(CUDA)
            for s in random_states(model, batch, gen)]  # fmt: skip


def stack_step_with_states(model, x, initial, loss_of_output):
    """A training step (dropout seed fixed) from the initial states: every layer's output, every final state, and
    the gradients of the input, every initial state and every parameter, under a loss on all of them."""
    xr = x.clone().requires_grad_()
    states = [tuple(t.clone().requires_grad_() for t in s) if isinstance(s, tuple) else s.clone().requires_grad_()
              for s in initial]  # fmt: skip
    torch.manual_seed(1)
    outs, finals = model(xr, states, return_all_layers=True)
    loss = sum(loss_of_output(o).sum() for o in outs) + sum((t * (k + 1)).sum() for k, t in enumerate(flat(finals)))
    return [*outs, *flat(finals), *torch.autograd.grad(loss, [xr, *flat(states), *model.parameters()])]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_wavefront_on_streams_equals_layer_by_layer(dropout, monkeypatch):
    """Layers on their own streams, ordered by events per chunk: the same results as whole layers in order."""
    from tritonrnn import functional

    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(256, [("lstm", 256), ("gru", 256), ("lstm", 256)], dropout=dropout).to(CUDA)
    x = torch.randn(256, 16, 256, device=CUDA)
    initial = float32_states(model, 16)
    results = []
    for chunk in ("0", "32"):
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", chunk)
        if chunk != "0":
            monkeypatch.setattr(functional, "_layer", None)  # the streams, not layer by layer
        results.append(stack_step_with_states(model, x, initial, lambda o: o.square()))
    errors = [rel_err(got, want) for want, got in zip(*results)]  # the path under test against layer by layer
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_stack_equals_layer_by_layer(cell, dropout, exchange, monkeypatch):
    """One persistent launch for the stack (a grid barrier per wavefront step, or layers decoupled by tagged words
    and step counts): the results of whole layers in order, IEEE fp32, every layer's output and every gradient."""
    from tritonrnn import functional, fused_stack

    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(96, [(cell, 128)] * 3, dropout=dropout, dropout_mode="variational").to(CUDA)
    plan = fused_stack.fused_plan([cell] * 3, [128] * 3, 16, torch.float32, CUDA, int(dropout > 0) * 2)
    assert isinstance(plan, _plan.LayerPlan) and plan.persistent and plan.tagged == (exchange == "tagged"), plan
    x = torch.randn(256, 16, 96, device=CUDA)
    initial = float32_states(model, 16)
    results = []
    for setting, layer_fn in (("0", functional._layer), ("fused", None)):
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", setting)
        monkeypatch.setattr(functional, "_layer", layer_fn)  # None: the layer-by-layer path must not run
        results.append(stack_step_with_states(model, x, initial, lambda o: o * o.detach().sin()))
    errors = [rel_err(got, want) for want, got in zip(*results)]  # the path under test against layer by layer
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_stack_bf16_error_within_1_5x_cudnn(cell, monkeypatch):
    """The 3-layer stack target's shape (bf16, B=16, H=512) in one launch, against cuDNN and float64."""
    from tritonrnn import functional

    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    monkeypatch.setattr(functional, "_layer", None)
    ours, cudnn = errors_vs_float64(cell, 128, 16, 512, 512, 3, torch.bfloat16)
    assert all(v <= max(1.5 * cudnn[k], 1e-3) for k, v in ours.items()), (ours, cudnn)


def test_autotuner_tunes_caches_and_runs(tmp_path, monkeypatch, capsys, caplog, launched_plans):
    """The pre-tune command (python -m tritonrnn.autotune) on a one-key matrix: the real tuner's candidates compile
    and time, the choice is cached and exported; a layer of that key then launches it (the forward's and the
    backward's configuration) without tuning again, as accurate as cuDNN."""
    from tritonrnn import autotune

    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")  # main() sets it too: monkeypatch restores it after the test
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path / "cache"))
    export = tmp_path / "tuned.json"
    matrix = ["--cells", "gru", "--hidden", "128", "--batch", "8", "--dtypes", "bf16"]
    assert autotune.main([*matrix, "--export", str(export)]) == 0
    assert "exported 1 configurations" in capsys.readouterr().out
    key = autotune.TuneKey("gru", 128, 8, "bf16").text()
    cached = autotune.ConfigStore.for_gpu(torch.cuda.get_device_name()).load()
    assert key in cached and autotune.ConfigStore(export).load()[key] == cached[key]
    _plan._logged.clear()
    with caplog.at_level(logging.WARNING, logger="tritonrnn"):
        ours, cudnn = errors_vs_float64("gru", 64, 8, 128, 128, 1, torch.bfloat16)
    assert not [r.getMessage() for r in caplog.records if "tuning" in r.getMessage()]
    assert all(v <= max(1.5 * cudnn[k], 1e-3) for k, v in ours.items()), (ours, cudnn)
    for kernel, config in (("rnn_fwd_kernel", cached[key]["forward"]), ("rnn_bwd_kernel", cached[key]["backward"])):
        plans = [plan for name, plan in launched_plans if name == kernel]
        assert plans and all({f: getattr(plan, f) for f in config} == config for plan in plans), (config, plans)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_the_tf32_flag_reaches_the_tune_key_for_fp32_only(monkeypatch, tf32):
    """kernel_plan asks the tuner for a TF32 key exactly when fp32 runs with torch's TF32 flag on (a TF32 dot is
    another compiled kernel); bf16 keys never carry it. The tuner is replaced by a recorder: nothing is tuned."""
    from tritonrnn import autotune, functional

    asked = []
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "tuned_plan", lambda key, device, tuner_factory: asked.append(key))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    for dtype in (torch.float32, torch.bfloat16):
        assert isinstance(functional.kernel_plan("lstm", 256, 16, dtype, CUDA), _plan.LayerPlan)
    assert [(key.dtype, key.tf32) for key in asked] == [("fp32", tf32), ("bf16", False)]


@pytest.mark.parametrize("dropout_mode", ["standard", "variational"])
def test_cuda_graph_training_step_with_dropout_has_the_gradients_of_its_masks(monkeypatch, dropout_mode):
    """Every replay of a captured training step with dropout gives the outputs and gradients of an eager step that
    uses the seeds this replay drew (the captured seed tensors hold them after the replay), and new seeds each time."""
    from tritonrnn import dropout

    captured, real_draw = [], dropout.draw

    def recording_draw(p, mode, device="cpu"):
        drawn = real_draw(p, mode, device)
        captured.append(drawn.seed)
        return drawn

    def replaying(seed_values):  # a draw that hands out these seeds in order
        seeds = iter(seed_values)
        return lambda p, mode, device="cpu": dropout.LayerDropout(float(p), mode == "variational", next(seeds))

    monkeypatch.setattr(dropout, "draw", recording_draw)
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(64, [("lstm", 256), ("gru", 256), ("lstm", 256)], dropout=0.3,
                                 dropout_mode=dropout_mode).to(CUDA).bfloat16()  # fmt: skip
    x = torch.randn(48, 16, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, _ = model(x)
        return [out, *torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])]

    replay, _ = graphed(step)
    seed_tensors = captured[-2:]  # the captured call's two dropped layers (its warm-up calls drew the others)
    seen = []
    for _ in range(2):
        got = [t.clone() for t in replay()]
        seen.append([int(s) for s in seed_tensors])
        monkeypatch.setattr(dropout, "draw", replaying([s.clone() for s in seed_tensors]))
        for g, expected in zip(got, step()):
            torch.testing.assert_close(g, expected)  # bf16's tolerance: cuBLAS may choose other GEMMs under capture
    assert seen[0] != seen[1]


@pytest.mark.parametrize(
    "cell,H,dtype,proj",
    [
        ("lstm", 2048, torch.bfloat16, 0),
        ("gru", 2048, torch.float16, 0),
        ("lstm", 1024, torch.float32, 0),
        ("lstm", 2048, torch.bfloat16, 512),
        ("lstm", 1024, torch.float32, 256),
    ],
    ids=str,
)
def test_large_hidden_sizes_read_part_of_the_slice_every_step(cell, H, dtype, proj, launched_plans):
    """Persistent kernels past what a program can hold: rows beyond BLOCK_K re-read each step, accuracy kept (with a
    projection, the backward's rows over H)."""
    from tritonrnn import functional

    if -(-H // _plan.MIN_DOT) > torch.cuda.get_device_properties(CUDA).multi_processor_count:
        pytest.skip(f"H={H} takes {-(-H // _plan.MIN_DOT)} programs of 16 units: more than this GPU's SMs")
    plan = functional.kernel_plan(cell, H, 16, dtype, CUDA, layer_run.Variant(proj=proj))
    assert isinstance(plan, _plan.LayerPlan) and plan.persistent and plan.block_k < H, plan
    # IEEE float32 on both sides (conftest.ieee_fp32)
    ours, cudnn = errors_vs_float64(cell, 32, 16, 256, H, 1, dtype, **({"proj_size": proj} if proj else {}))
    kernels = {"lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel"} if proj else {"rnn_fwd_kernel", "rnn_bwd_kernel"}
    assert {name for name, _ in launched_plans} == kernels, launched_plans  # on the kernels, not the fallback
    floor = 2e-5 if dtype == torch.float32 else 1e-3
    bad = {k: (v, cudnn[k]) for k, v in ours.items() if not v <= max(1.5 * cudnn[k], floor)}
    assert not bad, f"(ours, cuDNN) relative errors vs float64: {bad}"


@pytest.mark.parametrize("cell,proj", [(cell, 0) for cell in CELLS] + [("lstm", 128)])
def test_packed_sequences_against_cudnn(cell, proj):
    """Sequences of different lengths, bidirectional, bf16 (LSTM also with proj_size), initial states given: outputs,
    final states and the gradients of every sequence, initial state and weight (backward through the lengths
    in-kernel) as accurate as cuDNN's."""
    torch.manual_seed(0)
    extra = dict(proj_size=proj) if proj else {}
    ours, exact = make_pair(cell, 256, 256, num_layers=2, bidirectional=True, **extra)
    cudnn = copy.deepcopy(exact).to(dtype=torch.bfloat16, device=CUDA)
    ours, exact = ours.to(dtype=torch.bfloat16, device=CUDA), exact.to(CUDA)
    lengths = torch.randint(1, 200, (64,))
    seqs = [torch.randn(int(n), 256, dtype=torch.float64, device=CUDA) for n in lengths]
    flat = lambda s: list(s) if isinstance(s, tuple) else [s]  # noqa: E731
    width = proj or 256  # of h; an LSTM's c has 256
    shapes = [(int(lengths.sum()), 2 * width), (4, 64, width)] + ([(4, 64, 256)] if cell == "lstm" else [])
    cotangents = [torch.randn(shape, dtype=torch.float64, device=CUDA) for shape in shapes]  # packed output, states
    initial = [2 * torch.rand(shape, dtype=torch.float64, device=CUDA) - 1 for shape in shapes[1:]]  # in batch order

    def forward_backward(module, dtype):
        xs = [s.detach().to(dtype).requires_grad_() for s in seqs]  # leaves of this run's graph
        hx = [h.detach().to(dtype).requires_grad_() for h in initial]
        packed = torch.nn.utils.rnn.pack_sequence(xs, enforce_sorted=False)
        out, states = module(packed, tuple(hx) if cell == "lstm" else hx[0])
        results = [out.data, *flat(states)]
        loss = sum((r.double() * w).sum() for r, w in zip(results, cotangents, strict=True))
        grads = torch.autograd.grad(loss, [*xs, *hx, *module.parameters()])
        return [r.detach() for r in results] + [torch.cat(grads[: len(xs)])] + list(grads[len(xs) :])

    ref = forward_backward(exact, torch.float64)
    errors = {
        name: [rel_err(a, b) for a, b in zip(forward_backward(module, torch.bfloat16), ref)]
        for name, module in (("ours", ours), ("cudnn", cudnn))
    }
    assert all(math.isfinite(c) and o <= max(1.5 * c, 1e-3) for o, c in zip(errors["ours"], errors["cudnn"])), errors


def test_cuda_graph_replay_matches_eager_and_draws_new_dropout_masks():
    """A captured training step replays the persistent launches: without dropout the same outputs and gradients as
    eager on new data; with dropout a new seed, so new masks, at every replay."""
    torch.manual_seed(0)
    layers = [("lstm", 256), ("gru", 256)]
    model = tritonrnn.StackedRNN(64, layers, bidirectional=True).to(CUDA).bfloat16()
    x = torch.randn(48, 16, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, _ = model(x)
        return [out, *torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])]

    replay, _ = graphed(step)  # the benchmark's capture (warm-up on a side stream, then one captured call)
    with torch.no_grad():
        x.normal_()  # new data into the captured input
    for got, expected in zip(replay(), step()):
        # bf16's default tolerance, not bitwise: cuBLAS may pick other GEMM algorithms under capture.
        torch.testing.assert_close(got, expected)

    dropped = tritonrnn.StackedRNN(64, layers, dropout=0.5).to(CUDA).bfloat16()
    replay, _ = graphed(lambda: [dropped(x)[0]])
    first = replay()[0].clone()
    second = replay()[0]
    # Finite first: a NaN (an output the kernels left unwritten) is never torch.equal to anything.
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, second)


def test_a_packed_input_under_capture_is_refused_clearly():
    """Unpacking a PackedSequence reads its lengths on the host, which a capture forbids: tritonrnn's error, naming
    what to do, rather than CUDA's."""
    model = tritonrnn.LSTM(8, 16).to(CUDA)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(n, 8, device=CUDA) for n in (5, 3)])
    model(packed)  # eager: runs
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            model(packed)


def test_held_masks_are_drawn_before_a_capture_and_held_over_its_replays():
    """hold_dropout_masks draws its masks at the block's first training call: captured, that draw would run again at
    every replay, so it is refused; drawn eagerly first, the captured calls replay the held masks."""
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(8, [("lstm", 16), ("gru", 16)], dropout=0.5, dropout_mode="variational").to(CUDA)
    x = torch.randn(6, 4, 8, device=CUDA)
    with tritonrnn.hold_dropout_masks(model):
        with pytest.raises(RuntimeError, match="make one call inside the block before capturing"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                model(x)
        first = model(x)[0]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)[0]
        graph.replay()
        replayed = out.clone()
        graph.replay()
    assert torch.equal(replayed, out) and torch.equal(replayed, first)


def test_a_training_step_captured_after_only_an_inference_call_loads_its_kernels_during_the_capture(monkeypatch):
    """Torch's default capture mode forbids loading a module, which a Triton kernel's first launch does: a training
    step captured after only an inference call (its training forward and its backward kernels never launched in this
    process) loads them with the capture relaxed (tritonrnn/_capture.py), and its replays match eager steps."""
    torch.manual_seed(0)
    model = tritonrnn.GRU(48, 72, num_layers=2).to(CUDA).bfloat16()  # H=72: compiled by no other test
    x = torch.randn(40, 8, 48, device=CUDA, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, h_n = model(x)
        return [out, h_n, *torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])]

    relaxed, real_relaxed = [], _capture.relaxed_capture_mode

    def counted():
        relaxed.append(1)
        return real_relaxed()

    monkeypatch.setattr(_capture, "relaxed_capture_mode", counted)
    with torch.no_grad():
        model(x)  # cuBLAS and the inference kernels are ready; nothing of training has run
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture_error_mode "global", torch's default
        outputs = step()
    assert relaxed, "no kernel was loaded during the capture: the test did not test the relaxed load"
    for _ in range(2):
        with torch.no_grad():
            x.normal_()
        graph.replay()
        for got, expected in zip(outputs, step()):
            torch.testing.assert_close(got, expected)  # bf16's tolerance: cuBLAS may choose other GEMMs under capture


def test_decoding_step_by_step_from_a_cuda_graph_matches_eager_decoding():
    """An autoregressive decoder's loop, the README's advice for one-step calls: the step (one time step of a 2-layer
    LSTM, its state in static buffers) captured once and replayed, so no host code runs per step. Twenty replays give
    the outputs and final states of the same twenty calls made eagerly."""
    torch.manual_seed(0)
    model = tritonrnn.LSTM(64, 256, num_layers=2).to(CUDA).bfloat16().eval()
    inputs = torch.randn(20, 1, 16, 64, device=CUDA, dtype=torch.bfloat16)
    x = torch.empty_like(inputs[0])
    h = torch.empty(2, 16, 256, device=CUDA, dtype=torch.bfloat16)
    c = torch.empty_like(h)

    def step():
        with torch.no_grad():
            out, (h_n, c_n) = model(x, (h, c))
        return [out, h_n, c_n]

    def decode(call):
        h.zero_()
        c.zero_()
        outputs = []
        for t in range(inputs.shape[0]):
            x.copy_(inputs[t])
            out, h_n, c_n = call()
            outputs.append(out.clone())
            h.copy_(h_n)
            c.copy_(c_n)
        return torch.cat(outputs), h.clone(), c.clone()

    x.copy_(inputs[0])
    h.zero_()
    c.zero_()
    replay, _ = graphed(step)
    for got, expected in zip(decode(replay), decode(step)):
        # bf16's default tolerance, not bitwise: cuBLAS may pick other GEMM algorithms under capture.
        torch.testing.assert_close(got, expected)


def test_cuda_graph_replay_of_a_fused_stack(monkeypatch):
    """The stack kernel under capture: replayed training steps match eager; with dropout, new masks per replay."""
    from tritonrnn import functional

    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    monkeypatch.setattr(functional, "_layer", None)
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(64, [("lstm", 256)] * 3, dropout=0.3).to(CUDA).bfloat16().eval()
    x = torch.randn(48, 16, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)

    def step():
        out, _ = model(x)
        return [out, *torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])]

    replay, _ = graphed(step)
    with torch.no_grad():
        x.normal_()
    for got, expected in zip(replay(), step()):
        torch.testing.assert_close(got, expected)
    model.train()
    replay, _ = graphed(lambda: [model(x)[0]])
    first = replay()[0].clone()
    second = replay()[0]
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    "cell,dtype,B,H,bidirectional",
    [
        ("lstm", torch.bfloat16, 16, 512, False),
        # B=16 for the large ones: with several batch tiles a group their plans hold half the slice (compiled for
        # sm_90), and the tagged exchange needs the whole (larger batches: the batch-group test below).
        ("gru", torch.bfloat16, 16, 768, True),
        ("rnn_tanh", torch.float32, 16, 256, False),
        ("lstm", torch.float32, 32, 512, True),
        ("lstm", torch.float16, 16, 1024, False),
    ],
    ids=str,
)
def test_tagged_exchange_is_bitwise_the_barrier_exchange(cell, dtype, B, H, bidirectional, monkeypatch, launched_plans):
    """h shared as tagged words (no grid barrier in the forward): the barrier's bits, outputs and gradients, the
    barrier's kernels run on the tagged plan's tiles (the heuristics give the two exchanges different widths where 32
    units a program hold the whole slice, and a reduction in chunks sums in another order). Where the backward has a
    plan of its own (a tuned one), both kernels' tiles are compared, unforced."""
    torch.manual_seed(0)
    cls = {"lstm": tritonrnn.LSTM, "gru": tritonrnn.GRU, "rnn_tanh": tritonrnn.RNN}[cell]
    model = cls(H, H, num_layers=2, bidirectional=bidirectional).to(CUDA, dtype)
    x = torch.randn(200, B, H, device=CUDA, dtype=dtype)

    def tiles_by_kernel() -> dict[str, tuple]:
        tiles = {}
        for name, p in launched_plans:
            tiles.setdefault(name, set()).add((p.block_h, p.block_b, p.block_k, p.k_split, p.num_warps))
        assert all(len(each) == 1 for each in tiles.values()), tiles
        return {name: each.pop() for name, each in tiles.items()}

    results = []
    for exchange in ("tagged", "barrier"):
        monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
        if exchange == "barrier":
            tagged_tiles = tiles_by_kernel()
            if len(set(tagged_tiles.values())) == 1:  # one plan for both kernels: force the barrier's onto it
                ((block_h, block_b, block_k, k_split, num_warps),) = set(tagged_tiles.values())
                _plan.force_plan(
                    block_h=block_h, block_b=block_b, block_k=block_k, k_split=k_split, num_warps=num_warps
                )  # fmt: skip
        launched_plans.clear()
        try:
            results.append(_output_state_and_gradients(model, x))
        finally:
            _plan.force_plan()
        # Each launch on the exchange asked for (a plan that misfits would quietly take the barrier).
        assert launched_plans and all(plan.tagged == (exchange == "tagged") for _, plan in launched_plans)
    assert tiles_by_kernel() == tagged_tiles
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _output_state_and_gradients(model, x) -> list[torch.Tensor]:
    """One training step's output, final h and the gradients of the input and every parameter."""
    xr = x.clone().requires_grad_()
    out, state = model(xr)
    h = state[0] if isinstance(state, tuple) else state
    loss = out.float().sum() + h.float().sum()
    return [out, h, *torch.autograd.grad(loss, [xr, *model.parameters()])]


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
@pytest.mark.parametrize(
    "cell,dtype,B,H,bidirectional",
    [("lstm", torch.bfloat16, 256, 256, False), ("gru", torch.float16, 100, 256, True)],
    ids=str,
)
def test_batch_groups_are_bitwise_one_group_at_scale(
    cell, dtype, B, H, bidirectional, exchange, monkeypatch, launched_plans
):  # fmt: skip
    """The heuristic's batch groups (idle SMs take tiles of the batch) against the whole batch in one group of
    programs: outputs and every gradient bit for bit, so the groups' barriers and rows are independent."""
    from tritonrnn.layer_op import kernel_plan
    from tritonrnn.layer_run import Variant

    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    base = kernel_plan(cell, H, B, dtype, CUDA, Variant(directions=2 if bidirectional else 1))
    # Sizes whose plans hold the whole slice, so the tagged exchange runs where asked for.
    assert base.batch_groups > 1 and base.tagged == (exchange == "tagged"), base
    torch.manual_seed(0)
    cls = {"lstm": tritonrnn.LSTM, "gru": tritonrnn.GRU}[cell]
    model = cls(H, H, num_layers=2, bidirectional=bidirectional).to(CUDA, dtype)
    x = torch.randn(300, B, H, device=CUDA, dtype=dtype)
    results, groups = [], []
    for one_group in (False, True):
        if one_group:
            # The same kernels, the batch in one group (a forced plan is taken as it is, without smaller plans).
            _plan.force_plan(batch_groups=1, block_k=base.block_k, num_stages=base.num_stages)
        del launched_plans[:]
        try:
            results.append(_output_state_and_gradients(model, x))
        finally:
            _plan.force_plan()
        groups.append({plan.batch_groups for _, plan in launched_plans})
    assert max(groups[0]) > 1 and groups[1] == {1}, groups  # each run as it says
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_tagged_exchange_across_the_16_bit_tag_wrap(monkeypatch, launched_plans):
    """70000 steps: bf16 tags wrap at 65536; the outputs stay those of the barrier exchange on the same tiles (the
    tagged plan's: the barrier's heuristics take wider ones here, whose sums round otherwise)."""
    torch.manual_seed(0)
    model = tritonrnn.LSTM(8, 64).to(CUDA, torch.bfloat16)
    x = torch.randn(70000, 2, 8, device=CUDA, dtype=torch.bfloat16)
    outputs, tiles = [], []
    for exchange in ("tagged", "barrier"):
        monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
        if exchange == "barrier":
            block_h, block_b, block_k, k_split, num_warps = tiles[0]
            _plan.force_plan(block_h=block_h, block_b=block_b, block_k=block_k, k_split=k_split, num_warps=num_warps)
        launched_plans.clear()
        try:
            with torch.no_grad():
                outputs.append(model(x)[0])
        finally:
            _plan.force_plan()
        assert launched_plans and all(plan.tagged == (exchange == "tagged") for _, plan in launched_plans)
        (launched,) = {(p.block_h, p.block_b, p.block_k, p.k_split, p.num_warps) for _, p in launched_plans}
        tiles.append(launched)
    assert tiles[0] == tiles[1] and torch.isfinite(outputs[0]).all()
    assert torch.equal(*outputs)


def test_probe_of_a_device_session_passes(capsys):
    """perf/probe.py, the first stage of a device call: the barrier floor and one layer of each cell vs cuDNN."""
    from perf import probe

    assert probe.main() == 0
    out = capsys.readouterr().out
    assert out.count("grid barrier") >= 3
    assert sum("| ok" in line for line in out.splitlines()) == 2 * len(probe.PROBE_CONFIGS)


def test_the_benchmarks_cudnn_reads_bf16_weights_in_one_buffer():
    """perf's cuDNN baseline in bf16 with its weights flattened (torch.nn's flatten_parameters leaves bf16's apart,
    which cuDNN then copies at every call), as accurate as with them apart."""
    from perf import runner
    from perf.suites import Config

    config = Config("lstm", "bf16", B=16, H=256, T=32, L=2, input_size=128, bidirectional=False, dropout=0.0,
                    dropout_mode="standard", proj_size=0, passes=("fwd+bwd",))  # fmt: skip
    case = runner.Case(config, CUDA)
    assert case.cudnn_note == "", case.cudnn_note
    assert runner.weights_in_one_buffer(case.theirs)
    _, apart = runner.build_modules(config, CUDA)
    assert not runner.weights_in_one_buffer(apart)
    errors = [case.error("cudnn", "fwd+bwd", runner.make_step(m, case.x, case.grad_out, "fwd+bwd"))[0]
              for m in (case.theirs, apart)]  # fmt: skip
    assert all(math.isfinite(e) for e in errors) and errors[0] <= max(1.5 * errors[1], 1e-3), errors
