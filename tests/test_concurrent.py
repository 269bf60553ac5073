"""The persistent kernels with several programs meeting every step, run on the CPU: under the interpreter, the
programs of each launch as threads interleaved by a seeded scheduler (concurrent_interpreter.py), so the grid
barrier, the tagged words, the batch groups' counters, both directions in one grid and the stack kernel's layers
run as on a GPU: one launch for all steps, against torch.nn and the float64 reference. Every test also checks
from the launches that it ran what it says (several programs, persistent, the exchange it names).

A harness that could not fail would prove nothing: the negative tests take out, one at a time, the grid barrier,
the wait for the tags, and the stack kernel's wait for the layer below, and show the checks failing; with buffered
stores (weak_stores), a relaxed arrival in the layer kernels or the stack kernel fails them too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from concurrent_interpreter import programs_at_once
from conftest import DEVICE
from helpers import rel_err
from test_kernels import compare, compare_packed
from test_stacks import assert_matches, expected_with_masks, make_stack, random_states, stack_training_step
from triton.runtime import interpreter
from triton.runtime.errors import InterpreterError

import tritonrnn
from tritonrnn import _plan
from tritonrnn.kernels import recurrent, stack, sync
from tritonrnn.kernels.sync import arrive, grid_barrier, tag_unpack, wait_count

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's threads (the GPU runs grids itself)")


@pytest.fixture
def launches():
    with programs_at_once(seed=1) as made:
        yield made


def assert_ran_persistent(
    launches, tagged: bool, kernels=("rnn_fwd_kernel", "rnn_bwd_kernel"), k_split: int | None = None
) -> None:  # fmt: skip
    """Each of kernels ran, and every launch of a persistent kernel ran all its steps on several programs at once,
    with the exchange asked for (and the reduction in k_split chunks where given)."""
    recurrent_launches = [launch for launch in launches if launch.SYNC is not None]
    assert {launch.kernel for launch in recurrent_launches} >= set(kernels)
    for launch in recurrent_launches:
        assert launch.SYNC and launch.programs > 1, launch
        assert bool(launch.TAGGED) == tagged, launch
        assert k_split is None or launch.K_SPLIT == k_split, launch


# --- the harness itself ----------------------------------------------------------------------------------------


NO_BARRIER, BARRIER, RELAXED_BARRIER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _lockstep_kernel(counter, buf, seen, n_steps, SYNC: tl.constexpr, P: tl.constexpr):
    """Each step every program writes the step number, meets the others (SYNC: BARRIER, or RELAXED_BARRIER: the
    barrier with a relaxed arrival), then reads what all wrote."""
    pid = tl.program_id(0)
    o = tl.arange(0, P)
    for s in range(n_steps):
        tl.store(buf + (s % 2) * P + pid, s)
        if SYNC == BARRIER:
            grid_barrier(counter, (s + 1) * P)
        if SYNC == RELAXED_BARRIER:
            tl.atomic_add(counter, 1, sem="relaxed", scope="gpu")
            wait_count(counter, (s + 1) * P)
        tl.store(seen + pid * n_steps + s, tl.min(tl.load(buf + (s % 2) * P + o)))


def _all_in_step(sync: int, P: int = 4, steps: int = 40) -> bool:
    """Whether every program read every step's values after the meeting (a launch of _lockstep_kernel)."""
    buf = torch.full((2, P), -1, dtype=torch.int32)
    seen = torch.full((P, steps), -7, dtype=torch.int32)
    _lockstep_kernel[(P,)](torch.zeros(1, dtype=torch.int32), buf, seen, steps, SYNC=sync, P=P)
    return bool((seen == torch.arange(steps, dtype=torch.int32)).all())


@pytest.mark.parametrize("barrier", [True, False], ids=["barrier", "no-barrier"])
def test_programs_run_at_once_and_a_missing_barrier_shows(barrier, launches):
    assert _all_in_step(BARRIER if barrier else NO_BARRIER) == barrier


@triton.jit
def _log_kernel(slot, log, n_entries):
    """Each program appends its id to the log n_entries times: the log is the order in which programs ran."""
    for _ in range(n_entries):
        tl.store(log + tl.atomic_add(slot, 1), tl.program_id(0))


def _interleaving(seed: int) -> list[int]:
    log = torch.full((4 * 30,), -1, dtype=torch.int32)
    with programs_at_once(seed=seed):
        _log_kernel[(4,)](torch.zeros(1, dtype=torch.int32), log, 30)
    return log.tolist()


def test_the_seed_alone_decides_the_interleaving():
    """One program runs at a time and the scheduler's draws are seeded: a failing test fails every time."""
    first = _interleaving(5)
    assert sorted(first) == sorted(list(range(4)) * 30)
    assert first != sorted(first)  # the programs took turns, not one after another
    assert _interleaving(5) == first
    assert _interleaving(6) != first


@triton.jit
def _overcounted_barrier(counter):
    arrive(counter)
    wait_count(counter, tl.num_programs(0) + 1)  # one arrival more than there are programs


def test_a_wait_that_never_ends_is_reported():
    with programs_at_once(seed=0, timeout_s=2.0), pytest.raises(InterpreterError, match="still running"):
        _overcounted_barrier[(3,)](torch.zeros(1, dtype=torch.int32))


@triton.jit
def _failing_program(counter):
    tl.device_assert(tl.program_id(0) != 1, "program 1 fails")
    grid_barrier(counter, tl.num_programs(0))  # the others wait for program 1 here


def test_an_error_in_one_program_is_raised_not_waited_for(monkeypatch):
    """A program that fails while the others wait for it at the barrier: its error comes out, not a deadlock."""
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))  # device_assert on
    with programs_at_once(seed=0, timeout_s=60.0), pytest.raises(InterpreterError, match="program 1 fails"):
        _failing_program[(3,)](torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("weak", [False, True], ids=["sequential", "weak-stores"])
@pytest.mark.parametrize("release", [True, False], ids=["release", "relaxed"])
def test_weak_stores_show_an_arrival_that_is_not_a_release(release, weak):
    """Sequentially consistent, a relaxed arrival passes; with buffered stores only the release publishes the step."""
    with programs_at_once(seed=3, weak_stores=weak):
        assert _all_in_step(BARRIER if release else RELAXED_BARRIER) == (release or not weak)


@triton.jit
def _publish_then_wait_each(counts, buf, seen, n, n_steps, P: tl.constexpr):
    """Each step every program writes the step, counts it on its own counter, waits for every program's count, then
    records the least step it reads from all of them."""
    pid = tl.program_id(0)
    o = tl.arange(0, P)
    for s in range(n_steps):
        tl.store(buf + (s % 2) * n + pid, s)
        sync.arrive(counts + pid)
        sync.wait_each(counts, n, s + 1)
        tl.store(seen + pid * n_steps + s, tl.min(tl.load(buf + (s % 2) * n + o, mask=o < n, other=2**30)))


@pytest.mark.parametrize("seed", [1, 2])
def test_wait_each_waits_for_every_counter_past_its_first_block(seed):
    """40 programs: wait_each reads its counters in blocks of 32 (a tagged fused stack runs up to 64 programs a
    layer on an H100: float32 RNN at H=1024); every program must see every other's step. (A mutation audit: a
    wait_each reading the first block alone passed the stack tests, whose layers run 3 programs at most; of these
    two interleavings, seed 2 shows it.)"""
    n, steps = 40, 6
    buf = torch.full((2, n), -1, dtype=torch.int32)
    seen = torch.full((n, steps), -7, dtype=torch.int32)
    with programs_at_once(seed=seed):
        _publish_then_wait_each[(n,)](torch.zeros(n, dtype=torch.int32), buf, seen, n, steps, P=64)
    assert (seen == torch.arange(steps, dtype=torch.int32)).all(), seen


# --- the library's checks have teeth here ----------------------------------------------------------------------


@triton.jit
def _no_barrier(counter, target):
    pass


@triton.jit
def _load_tagged_without_waiting(p, mask, tag, VALUE: tl.constexpr):
    """kernels/sync.load_tagged without the wait for the tag: whichever step's words are there."""
    return tag_unpack(tl.load(p, mask=mask, other=0, volatile=True), VALUE)


@triton.jit
def _no_wait(counters, n, target, BLOCK: tl.constexpr = 32):
    pass


def test_the_layer_kernels_without_their_barrier_fail(launches, forced_plan, monkeypatch):
    """Three programs a layer with the barrier gone read h (forward) and the gate gradients (backward) before the
    others wrote them (buffers start as NaN), and the comparison with torch.nn fails."""
    forced_plan(block_h=16, persistent=True)
    monkeypatch.setattr(recurrent, "grid_barrier", _no_barrier)
    with pytest.raises(AssertionError, match="above bound"):
        compare("gru", 6, 5, 4, 40, 1, seed=1)
    assert_ran_persistent(launches, tagged=False)


def test_the_tagged_exchange_without_its_wait_fails(launches, forced_plan, monkeypatch):
    forced_plan(block_h=16, persistent=True)
    monkeypatch.setenv("TRITONRNN_EXCHANGE", "tagged")
    monkeypatch.setattr(recurrent, "load_tagged", _load_tagged_without_waiting)
    with pytest.raises(AssertionError, match="above bound"):
        compare("lstm", 6, 5, 4, 40, 1, dtype=torch.float32, seed=1)
    assert_ran_persistent(launches, tagged=True)


def _assert_tagged_stack_breaks(monkeypatch, name: str, replacement) -> None:
    """The tagged stack kernel's results change (beyond rounding) once kernels/stack.py's ``name`` is replaced."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", "tagged")
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(5, [("lstm", 33)] * 2).to(DEVICE)
    x = torch.randn(5, 3, 5, device=DEVICE)
    right = stack_training_step(model, x)
    monkeypatch.setattr(stack, name, replacement)
    wrong = stack_training_step(model, x)
    assert max(rel_err(a, b) for a, b in zip(wrong, right)) > 1e-2


def _assert_tagged_stack_is_bitwise_the_barrier(launches, monkeypatch, cell: str, n_layers: int, mode: str) -> None:
    """Float32 with dropout, three programs a layer: tagged, the barrier's results bit for bit."""
    torch.manual_seed(0)
    model = tritonrnn.StackedRNN(5, [(cell, 33)] * n_layers, dropout=0.3, dropout_mode=mode).to(DEVICE)
    x = torch.randn(5, 2, 5, device=DEVICE)
    results = []
    for exchange in ("barrier", "tagged"):
        monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
        results.append(stack_training_step(model, x))
        assert_ran_persistent(launches[-2:], tagged=exchange == "tagged", kernels=("stack_fwd_kernel",))
    for a, b in zip(*results):
        assert not torch.isnan(a).any() and torch.equal(a, b)


def test_the_stack_kernel_without_the_wait_for_the_layer_below_fails(launches, forced_plan, fused_only, monkeypatch):
    """Tagged, the stack's layers meet no grid barrier: each waits only for the step counts of the programs of the
    layer below (forward) or above (backward). Without that wait a layer reads its input before it is written."""
    forced_plan(block_h=16, persistent=True)
    _assert_tagged_stack_breaks(monkeypatch, "wait_each", _no_wait)
    assert_ran_persistent(launches, tagged=True, kernels=("stack_fwd_kernel", "stack_bwd_kernel"))


# --- the kernels, several programs a layer, one launch for all steps --------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_persistent_grid_of_three_programs(cell, launches, forced_plan):
    """H = 40 in slices of 16 (three programs, the last one partial), all steps in one launch, both directions in
    one grid, two layers, B = 5: float64 against torch.nn."""
    forced_plan(block_h=16, persistent=True)
    compare(cell, 6, 5, 4, 40, 2, seed=2, bidirectional=True)
    assert_ran_persistent(launches, tagged=False)
    assert max(launch.programs for launch in launches) == 6


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_tagged_exchange_with_three_programs(cell, launches, forced_plan, monkeypatch):
    """The same, h and the gate gradients exchanged as tagged words (float32: 64-bit words), no barrier."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", "tagged")
    forced_plan(block_h=16, persistent=True)
    compare(cell, 6, 5, 4, 40, 2, dtype=torch.float32, seed=2, bidirectional=True)
    assert_ran_persistent(launches, tagged=True)


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_reduction_in_chunks_with_three_programs(exchange, launches, forced_plan, monkeypatch):
    """Three programs, each reducing over h (forward) and the gate gradients (backward) in four chunks of a 3-D dot,
    all steps in one launch."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    forced_plan(block_h=16, k_split=4, persistent=True)
    compare("lstm", 6, 5, 4, 40, 1, dtype=torch.float32, seed=6, bidirectional=True)
    assert_ran_persistent(launches, tagged=exchange == "tagged", k_split=4)


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_batch_groups_of_several_programs(exchange, launches, forced_plan, monkeypatch):
    """Three batch groups (B = 37 in 16-row tiles) of three programs each, every group its own counter, both
    directions: each group's programs meet only one another."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    forced_plan(block_h=16, block_b=16, persistent=True, batch_groups=3)
    dtype = torch.float32 if exchange == "tagged" else torch.float64  # no tagged words for float64
    compare("lstm", 4, 37, 3, 40, 1, dtype=dtype, seed=3, bidirectional=True)
    assert_ran_persistent(launches, tagged=exchange == "tagged")
    assert {launch.grid for launch in launches if launch.SYNC is not None} == {(3, 2, 3)}


def test_streamed_weight_rows_with_several_programs(launches, forced_plan):
    """Each program holds 16 rows of its slice and reads the rest every step, in 16-row chunks."""
    forced_plan(block_h=16, block_k=16, block_ks=16, persistent=True)
    compare("gru", 5, 3, 4, 40, 2, seed=4)
    assert_ran_persistent(launches, tagged=False)


def test_streamed_weight_rows_in_chunks_with_several_programs(launches, forced_plan):
    """The same, held and streamed rows each in two chunks (a 3-D dot: kernels/recurrent._dot_k)."""
    forced_plan(block_h=16, block_k=16, block_ks=32, k_split=2, persistent=True)
    compare("lstm", 5, 3, 4, 70, 1, seed=7, bidirectional=True)
    assert_ran_persistent(launches, tagged=False, k_split=2)


@pytest.mark.parametrize("k_split", [1, 4])
def test_projection_two_barrier_phases_a_step(k_split, launches, forced_plan):
    """LSTM with proj_size: gates then the projection, each phase closed by the grid barrier, three programs (both
    reductions in chunks with k_split)."""
    forced_plan(block_h=16, persistent=True, k_split=k_split)
    compare("lstm", 5, 3, 4, 40, 2, seed=5, proj_size=7, bidirectional=True)
    kernels = ("lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel")
    assert_ran_persistent(launches, tagged=False, kernels=kernels, k_split=k_split)


def test_projection_with_packed_sequences(launches, forced_plan):
    """The projection's kernels with each sequence's length, three programs: a row past its length keeps the h its
    program wrote at the step before, while the others' h_t arrives through the barrier."""
    forced_plan(block_h=16, persistent=True)
    compare_packed("lstm", [6, 2, 5, 1, 6], 4, 40, 2, bidirectional=True, seed=8, proj_size=19)
    assert_ran_persistent(launches, tagged=False, kernels=("lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel"))


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_packed_sequences_with_several_programs(exchange, launches, forced_plan, monkeypatch):
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    forced_plan(block_h=16, persistent=True)
    dtype = torch.float32 if exchange == "tagged" else torch.float64
    compare_packed("lstm", [6, 2, 5, 1, 6], 4, 40, 2, dtype=dtype, bidirectional=True, seed=6)
    assert_ran_persistent(launches, tagged=exchange == "tagged")


def assert_lstm_stack_matches_the_reference(n_layers: int, steps: int, seed: int) -> None:
    """Equal LSTM layers of H=40, dropout 0.3 between them, B=3: float64 against the reference layers with the same
    masks (outputs, states, every gradient)."""
    gen = torch.Generator().manual_seed(seed)
    model = make_stack([("lstm", 40)] * n_layers, input_size=5, dropout=0.3)
    x = torch.randn(steps, 3, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    states = random_states(model, 3, gen)
    torch.manual_seed(7)
    assert_matches(model, x, states, expected_with_masks(model, 0.3, "standard", steps, 3))


@pytest.mark.parametrize("k_split", [1, 4])
def test_stack_kernel_with_several_programs_a_layer(k_split, launches, forced_plan, fused_only):
    """Three equal layers in one launch, three programs a layer, the whole grid meeting at every wavefront step.
    Dropout between the layers; float64 against the reference layers with the same masks. With k_split, both
    reductions of a layer in chunks (kernels/recurrent._dot_k)."""
    forced_plan(block_h=16, persistent=True, k_split=k_split)
    assert_lstm_stack_matches_the_reference(n_layers=3, steps=5, seed=23)
    assert_ran_persistent(launches, tagged=False, kernels=("stack_fwd_kernel", "stack_bwd_kernel"), k_split=k_split)


@pytest.mark.parametrize(
    "cell,n_layers,mode", [("lstm", 4, "standard"), ("gru", 3, "variational")], ids=["lstm-4", "gru-3"]
)
def test_stack_kernel_tagged_is_bitwise_the_barrier(cell, n_layers, mode, launches, forced_plan, fused_only,
                                                     monkeypatch):  # fmt: skip
    """Tagged, the layers are decoupled (tagged words within a layer, each program's step count between layers):
    float32 with dropout, bit for bit the grid barrier's results, both with three programs a layer.

    The 4-layer case caught a bug of the first tagged stack kernel, which counted a layer's steps on one counter
    for all its programs: a program can finish step t + 1 before a peer has finished step t (it needs only the
    peer's h_t, which the peer publishes before its output for the layer above), so the total reached (t + 1) P
    with that output unwritten, and the layer above read NaN from it."""
    forced_plan(block_h=16, persistent=True)
    _assert_tagged_stack_is_bitwise_the_barrier(launches, monkeypatch, cell, n_layers, mode)


def _module_training_step(model, x) -> list[torch.Tensor]:
    xr = x.clone().requires_grad_()
    torch.manual_seed(1)
    out, state = model(xr)
    state = state if isinstance(state, tuple) else (state,)
    loss = (out * out.detach().cos()).sum() + sum(s.sum() for s in state)
    return [out, *state, *torch.autograd.grad(loss, [xr, *model.parameters()])]


@pytest.mark.parametrize("kind", ["layer", "projection", "stack"])
def test_a_sequence_too_long_for_the_barrier_counter_runs_in_several_launches(kind, launches, forced_plan,
                                                                               monkeypatch):  # fmt: skip
    """The grid barrier counts arrivals on an int32, which would wrap past 2**31 - 1 (some 8M steps on an H100):
    such a sequence runs as several persistent launches, each from a zeroed counter. With the limit lowered to
    three steps' arrivals, bidirectional layers of three programs (the projection: two barriers a step) and a fused
    stack give one launch's results bit for bit, forward and backward (dL/dh0 from the last backward launch only)."""
    forced_plan(block_h=16, persistent=True)
    torch.manual_seed(0)
    if kind == "stack":
        monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
        model = tritonrnn.StackedRNN(5, [("gru", 40)] * 2, dropout=0.3).to(DEVICE)
        step, kernels, arrivals_per_step = stack_training_step, ("stack_fwd_kernel", "stack_bwd_kernel"), 3 * 2
    else:
        proj = 7 if kind == "projection" else 0
        model = tritonrnn.LSTM(5, 40, bidirectional=True, proj_size=proj, dropout=0.0).to(DEVICE, torch.float64)
        step, arrivals_per_step = _module_training_step, 3 * (2 if proj else 1)
        kernels = ("lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel") if proj else ("rnn_fwd_kernel", "rnn_bwd_kernel")
    x = torch.randn(8, 2, 5, device=DEVICE, dtype=next(model.parameters()).dtype)
    one_launch = step(model, x)
    counts = [sum(launch.kernel == k for launch in launches) for k in kernels]
    monkeypatch.setattr(_plan, "MAX_BARRIER_ARRIVALS", 3 * arrivals_per_step)
    chunked = step(model, x)
    chunked_counts = [sum(launch.kernel == k for launch in launches) - n for k, n in zip(kernels, counts)]
    steps = 8 + (1 if kind == "stack" else 0)  # the stack's wavefront: T + L - 1 steps
    assert chunked_counts == [n * -(-steps // 3) for n in counts], (counts, chunked_counts)
    assert_ran_persistent(launches, tagged=False, kernels=kernels)
    for a, b in zip(one_launch, chunked):
        assert not torch.isnan(a).any() and torch.equal(a, b)


@pytest.mark.parametrize("cell, exchange", [("lstm", "barrier"), ("gru", "tagged")])
def test_two_interleavings_of_the_programs_give_the_same_bits(cell, exchange, forced_plan, monkeypatch):
    """Bitwise reproducibility (README) where a CPU can break it: test_kernels' test_bitwise_deterministic runs the
    programs one after another on the CPU, the same order every time. Here two bidirectional float32 layers split over
    three programs run a training step under two interleavings (other orders of the programs' steps, loads and
    stores): the same outputs, states and gradients, bit for bit."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    forced_plan(block_h=16, persistent=True)
    torch.manual_seed(0)
    model = getattr(tritonrnn, cell.upper())(5, 40, num_layers=2, bidirectional=True).to(DEVICE)
    x = torch.randn(5, 3, 5, device=DEVICE)
    results = []
    for seed in (3, 4):
        with programs_at_once(seed=seed, switch_probability=0.3) as made:
            results.append(_module_training_step(model, x))
        assert_ran_persistent(made, tagged=exchange == "tagged")
    for a, b in zip(*results):
        assert not torch.isnan(a).any() and torch.equal(a, b)


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_module_training_step_in_one_launch_per_layer(exchange, launches, forced_plan, monkeypatch):
    """The drop-in module end to end (dropout between layers, bf16) with multi-program persistent grids gives the
    one-program grid's bits: the split over programs changes which program computes a unit, not its arithmetic."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    torch.manual_seed(0)
    model = tritonrnn.LSTM(5, 40, num_layers=2, dropout=0.25).to(DEVICE, torch.bfloat16).train()
    x = torch.randn(4, 6, 5, device=DEVICE, dtype=torch.bfloat16)
    results = []
    for block_h in (64, 16):  # one program (H <= 64), then three
        forced_plan(block_h=block_h, persistent=True)
        torch.manual_seed(1)
        xr = x.clone().requires_grad_()
        out, (h, c) = model(xr)
        loss = out.float().sum() + c.float().sum()
        results.append([out, h, c, *torch.autograd.grad(loss, [xr, *model.parameters()])])
    assert_ran_persistent(launches[-4:], tagged=exchange == "tagged")
    for a, b in zip(*results):
        assert not torch.isnan(a).any() and torch.equal(a, b)


# --- the same with buffered stores (weak_stores): what a program publishes is seen only after its release ---------


@pytest.fixture
def weak_launches():
    with programs_at_once(seed=2, weak_stores=True) as made:
        yield made


@triton.jit
def _relaxed_arrive(counter):
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="relaxed", scope="gpu")


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_layer_kernels_with_weak_stores(exchange, weak_launches, forced_plan, monkeypatch):
    """h (forward) and the gate gradients (backward) reach the other programs through the barrier's release, or as
    tagged words whenever they land; three programs, both directions."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    forced_plan(block_h=16, persistent=True)
    compare("lstm", 5, 5, 4, 40, 1, dtype=torch.float32 if exchange == "tagged" else torch.float64, seed=7,
            bidirectional=True)  # fmt: skip
    assert_ran_persistent(weak_launches, tagged=exchange == "tagged")


def test_the_layer_kernels_with_a_relaxed_arrival_fail_with_weak_stores(weak_launches, forced_plan, monkeypatch):
    forced_plan(block_h=16, persistent=True)
    monkeypatch.setattr(sync, "arrive", _relaxed_arrive)  # the grid barrier's arrival
    with pytest.raises(AssertionError, match="above bound"):
        compare("gru", 6, 5, 4, 40, 1, seed=1)
    assert_ran_persistent(weak_launches, tagged=False)


def test_stack_kernel_with_weak_stores(weak_launches, forced_plan, fused_only, monkeypatch):
    """Between layers the output is plain stores published by each program's release of its step count: tagged,
    bit for bit the barrier's results; three layers of three programs."""
    forced_plan(block_h=16, persistent=True)
    _assert_tagged_stack_is_bitwise_the_barrier(weak_launches, monkeypatch, "lstm", 3, "standard")


def test_the_stack_kernel_with_a_relaxed_step_count_fails_with_weak_stores(weak_launches, forced_plan, fused_only,
                                                                           monkeypatch):  # fmt: skip
    """Tagged, a layer's output reaches the layer above only through the release of each program's step count."""
    forced_plan(block_h=16, persistent=True)
    _assert_tagged_stack_breaks(monkeypatch, "arrive", _relaxed_arrive)
    assert_ran_persistent(weak_launches, tagged=True, kernels=("stack_fwd_kernel", "stack_bwd_kernel"))


# --- a cooperative launch the driver refuses -------------------------------------------------------------------


@pytest.fixture
def refused_cooperative_launches(monkeypatch):
    """Every persistent launch fails as Triton's launcher reports the driver refusing a cooperative launch (a client
    of MPS given fewer SMs than the GPU has), before any program runs; stepwise launches run. Returns the list of
    the refused kernels' names."""
    from tritonrnn import fused_stack, layer_run

    refused = []
    real = layer_run.launch_kernel

    def launch(kernel, grid, device, **kwargs):
        if kwargs["SYNC"]:
            refused.append(kernel.__name__)
            raise RuntimeError(f"Triton Error [CUDA]: {_plan.COOPERATIVE_TOO_LARGE}")
        real(kernel, grid, device, **kwargs)

    monkeypatch.setattr(layer_run, "launch_kernel", launch)
    monkeypatch.setattr(fused_stack, "launch_kernel", launch)
    return refused


def assert_ran_stepwise(launches, kernels) -> None:
    """Each of kernels ran, every launch one step (no grid barrier, no tagged words) on several programs."""
    recurrent_launches = [launch for launch in launches if launch.SYNC is not None]
    assert {launch.kernel for launch in recurrent_launches} == set(kernels)
    for launch in recurrent_launches:
        assert not launch.SYNC and not launch.TAGGED and launch.programs > 1, launch


def refusals_logged(caplog) -> int:
    return sum(_plan.COOPERATIVE_TOO_LARGE in message for message in caplog.messages)


@pytest.mark.parametrize("exchange", ["barrier", "tagged"])
def test_a_refused_cooperative_launch_runs_the_layer_one_step_a_launch(
    exchange, launches, forced_plan, monkeypatch, refused_cooperative_launches, caplog
):  # fmt: skip
    """The persistent grid refused, forward and backward, the layer's steps run one launch each, untagged: still
    float64-exact against torch.nn, and the refusal logged once."""
    monkeypatch.setenv("TRITONRNN_EXCHANGE", exchange)
    forced_plan(block_h=16, persistent=True)
    dtype = torch.float32 if exchange == "tagged" else torch.float64
    compare("gru", 5, 3, 4, 40, 2, dtype=dtype, seed=9, bidirectional=True)
    # Both layers, forward then backward, asked for their persistent grids first.
    assert refused_cooperative_launches == ["rnn_fwd_kernel"] * 2 + ["rnn_bwd_kernel"] * 2
    assert_ran_stepwise(launches, ("rnn_fwd_kernel", "rnn_bwd_kernel"))
    assert refusals_logged(caplog) == 1


def test_a_refused_cooperative_launch_runs_the_projection_one_phase_a_launch(
    launches, forced_plan, refused_cooperative_launches, caplog
):  # fmt: skip
    forced_plan(block_h=16, persistent=True)
    compare("lstm", 4, 3, 4, 40, 1, seed=10, proj_size=7)
    assert refused_cooperative_launches == ["lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel"]
    assert_ran_stepwise(launches, ("lstm_proj_fwd_kernel", "lstm_proj_bwd_kernel"))
    assert refusals_logged(caplog) == 1


def test_a_refused_cooperative_launch_runs_the_stack_kernel_one_step_a_launch(
    launches, forced_plan, fused_only, refused_cooperative_launches, caplog
):  # fmt: skip
    """The stack kernel refused forward: its forward and backward run one wavefront step a launch (the backward
    is not tried persistent again), against the reference layers with the same dropout masks."""
    forced_plan(block_h=16, persistent=True)
    assert_lstm_stack_matches_the_reference(n_layers=2, steps=4, seed=29)
    assert refused_cooperative_launches == ["stack_fwd_kernel"]
    assert_ran_stepwise(launches, ("stack_fwd_kernel", "stack_bwd_kernel"))
    assert refusals_logged(caplog) == 1


def test_a_refusal_counts_every_program_of_the_refused_grid(
    launches, forced_plan, refused_cooperative_launches, monkeypatch
):  # fmt: skip
    """Later grids are planned below what was refused: all of its programs, both directions' and both batch groups'."""
    counted = []
    refused = _plan.cooperative_refused

    def counting(error, programs, device):
        counted.append(programs)
        return refused(error, programs, device)

    monkeypatch.setattr(_plan, "cooperative_refused", counting)
    forced_plan(block_h=16, block_b=16, persistent=True, batch_groups=2, directions_together=True)
    compare("lstm", 3, 20, 4, 40, 1, seed=12, bidirectional=True)
    assert counted and set(counted) == {3 * 2 * 2}


def test_other_launch_errors_are_not_taken_for_a_refusal(launches, forced_plan, monkeypatch):
    from tritonrnn import layer_run

    def launch(kernel, grid, device, **kwargs):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    monkeypatch.setattr(layer_run, "launch_kernel", launch)
    forced_plan(block_h=16, persistent=True)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        compare("gru", 3, 2, 4, 40, 1, seed=11)
