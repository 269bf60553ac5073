"""How a layer runs: the kernel configuration, or the reason it has to fall back.

The persistent kernels keep one program's slice of W_hh on chip for the whole loop and need every
program resident at once. ``plan_layer`` decides the slice and batch tile and whether that fits;
the autotuner of a later issue replaces the heuristics here, not the kernels or their callers.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable

import torch
from triton import knobs

log = logging.getLogger("tritonrnn")

# Floating-point contraction (FMA) chosen at every launch, not left to Triton's default: Triton 3.9 warns at every
# compile that leaves it unset, 3.10 turns the default off, and the kernels' numerics are those with FMA (the default
# of the GPU's Triton 3.6).
FP_FUSION = True

# Cell name -> (kernel cell id, gates per unit G, values saved for backward per unit S: kernels/recurrent._cell_fwd).
# The ids match kernels/recurrent.py's CELL_* constants.
CELLS = {
    "rnn_tanh": (0, 1, 0),
    "rnn_relu": (1, 1, 0),
    "lstm": (2, 4, 5),
    "gru": (3, 3, 4),
}

# Smallest tile tl.dot accepts on the GPU in each dimension.
MIN_DOT = 16
# Columns of mma.sync's tile (16 x 8), and the units a program takes where its dots run on tensor cores and it holds
# its whole slice (heuristic_width).
MMA_N = 8
WIDE_BLOCK_H = 32
# Chunks of the reduction, one a warp, where a program cannot hold its whole slice at 32 units (heuristic_width).
SPLIT_WARPS = 8
# The W_hh slice a program holds on chip, at most (Triton puts it in shared memory; perf/NOTES.md). Rows beyond
# it are read every step in chunks (BLOCK_KS). A first guess: functional.kernel_plan compiles the kernels and
# halves the held rows until the compiled shared memory fits the GPU.
HELD_WEIGHT_BYTES = 128 * 1024
MIN_HELD_ROWS = 64
# The most rows of all gates together whose reduction the FMA dots (float32 without TF32) take in chunks (fma_chunks).
FMA_CHUNKED_ROWS = 1024
# The largest batch tile of h over held rows in one chunk that the pipeline buffers over several tiles (with_pipeline).
PIPELINED_H_BYTES = 16 * 1024
# Beyond these hidden sizes most of the slice would be re-read every step: the persistent kernels are not the
# right tool there (perf/NOTES.md), so such layers take the fallback.
MAX_HIDDEN = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}
MAX_WARPS = 8
# A grid barrier waits for the count of arrivals on an int32 counter to reach its target (kernels/sync.py): past
# 2**31 - 1 both would wrap and a barrier could pass before every program got there. A sequence long enough for
# that (some 8M steps on an H100) runs as several persistent launches, each counting from a zeroed counter.
MAX_BARRIER_ARRIVALS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's launch: ``num_programs`` programs of ``block_h`` units each.

    The forward kernel's plan; ``backward`` holds the backward kernel's where the two differ (autotuned).
    """

    block_h: int
    block_b: int
    block_k: int
    num_programs: int
    num_warps: int
    persistent: bool  # one launch for all steps (grid barrier) or one launch per step
    directions_together: bool = True  # a bidirectional layer's two grids in one launch (both resident)
    num_stages: int = 3  # Triton's software pipelining of the batch-tile loop
    block_ks: int = 64  # units of the reduction read per chunk every step beyond the held block_k (large H)
    tagged: bool = False  # h (forward) or the gate gradients (backward) exchanged as tagged words (kernels/sync.py)
    # Independent groups of batch rows (grid axis 2), each with its own num_programs programs and grid barrier.
    batch_groups: int = 1
    # The reduction (held and streamed rows) in k_split chunks, one a warp (kernels/recurrent._dot_k): 1 or num_warps.
    k_split: int = 1
    # The single-layer forward's held rows as two halves, two dots a gate (fma_halves; kernels/recurrent.py HALVES).
    held_halves: bool = False
    backward: LayerPlan | None = None

    def for_backward(self) -> LayerPlan:
        return self.backward or self


def persistent_chunks(t0: int, t1: int, programs: int, barriers_per_step: int) -> list[tuple[int, int]]:
    """Steps [t0, t1) as the ranges one persistent launch each runs: at most MAX_BARRIER_ARRIVALS arrivals per
    launch of ``programs`` programs counting on one counter, ``barriers_per_step`` barriers a step."""
    per_launch = max(1, MAX_BARRIER_ARRIVALS // (programs * barriers_per_step))
    return [(a, min(a + per_launch, t1)) for a in range(t0, t1, per_launch)]


def interpret_mode() -> bool:
    """True when the Triton interpreter is on, so the kernels can run on CPU tensors: TRITON_INTERPRET on now (as
    Triton reads it: 1, true, on or yes), and the kernels defined under it. Triton makes a kernel interpreted or
    compiled where it is defined (tritonrnn's import), so one set later cannot run them on the CPU: torch's op runs
    there, as without it."""
    return knobs.runtime.interpret and _kernels_interpreted()


@functools.cache
def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from tritonrnn.kernels.recurrent import rnn_fwd_kernel

    return isinstance(rnn_fwd_kernel, InterpretedFunction)


# The precision a backward runs at: its forward's (fixed_tf32), whatever the flag says by then.
_fixed_tf32: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tritonrnn_fixed_tf32", default=None)


def tf32_matmul() -> bool:
    """Whether float32 dots run as TF32: inside ``fixed_tf32``, its value; else whether torch lets float32 CUDA
    matmuls use TF32, set through either of its APIs: ``allow_tf32``, or from torch 2.9 ``fp32_precision`` (after
    which reading ``allow_tf32`` raises: torch refuses a mix of the two)."""
    fixed = _fixed_tf32.get()
    if fixed is not None:
        return fixed
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


# A constant to torch.compile, which cannot trace torch's getter: its graphs are guarded on the TF32 flag (a flip
# compiles the graph again), so the value read when tracing is the one the graph runs with. What
# torch.compiler.assume_constant_result does, without the 2 s import of torch._dynamo it makes on the way (a test
# checks that the decorator still marks a function so).
tf32_matmul._dynamo_marked_constant = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def fixed_tf32(tf32: bool):
    """``tf32_matmul()`` answers ``tf32`` inside (this thread and context): a backward plans, compiles and launches
    at its forward's precision, though the flag was flipped between the two (its compile check was for that one, and
    a forward that fell back at one precision must not have its backward run kernels planned at the other)."""
    token = _fixed_tf32.set(bool(tf32))
    try:
        yield
    finally:
        _fixed_tf32.reset(token)


def fma_dots(dtype: torch.dtype) -> bool:
    """Whether the kernels' dots in ``dtype`` run on the FMA units: float32 without TF32 (tensor cores otherwise)."""
    return dtype == torch.float32 and not tf32_matmul()


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor)."""
    import triton

    return _version(triton.__version__)


@functools.cache
def check_interpreter() -> None:
    """Before a kernel runs on CPU tensors: the interpreter of Triton 3.6 and older fails inside every kernel on
    numpy 2.4 and newer (it turns 1-element arrays into loop bounds, which numpy 2.4 refuses; fixed in 3.7)."""
    import numpy
    import triton

    if triton_version() < (3, 7) and _version(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"the Triton interpreter of triton {triton.__version__} cannot run on numpy {numpy.__version__}: "
            "install numpy<2.4 or triton>=3.7 (TRITON_INTERPRET=1 runs the kernels on the CPU)"
        )


def empty_buffer(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel must fill comes from here (tests poison it with NaN); callers look it up at the call."""
    return torch.empty(*shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cuda_index(device: torch.device) -> int:
    """The CUDA device index, the current device for a bare "cuda"."""
    return device.index if device.index is not None else torch.cuda.current_device()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes a CUDA tensor's device the current one around kernel launches (a no-op for CPU tensors).

    Triton launches on the current CUDA device and its stream, not the tensors': tensors on cuda:1 while cuda:0 is
    current would be refused at launch, or with peer access run on the wrong GPU, unordered with cuda:1's stream.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is under way on the current stream, for work on ``device`` (never off CUDA, where
    torch has no such check to ask)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# cuGetErrorString(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE), in the RuntimeError Triton's launcher raises with it
COOPERATIVE_TOO_LARGE = "too many blocks in cooperative launch"
# Per device, the most programs a cooperative launch may have where the driver refused more than the SM count
_resident_cap: dict[int, int] = {}


def resident_programs(device_index: int) -> int:
    """How many programs a persistent grid may have on a GPU: one an SM, fewer once the driver has refused a
    cooperative launch of that many (a client of MPS limited to part of the SMs, which the device's SM count does
    not show)."""
    count = _sm_count(device_index)
    return min(count, _resident_cap.get(device_index, count))


def cooperative_refused(error: BaseException, programs: int, device: torch.device) -> bool:
    """Whether ``error`` is the driver refusing a cooperative launch of ``programs`` programs (the launch did not
    start). If it is, later plans for the device keep their persistent grids below that many; logged once."""
    if not isinstance(error, RuntimeError) or COOPERATIVE_TOO_LARGE not in str(error):
        return False
    if device.type == "cuda":
        index = cuda_index(device)
        _resident_cap[index] = max(1, min(resident_programs(index), programs - 1))
    log_once(
        f"tritonrnn: the driver refused a cooperative launch on {device} ({error}): fewer SMs are open to this "
        f"process than the GPU has (MPS?). A persistent grid refused runs one launch per step instead (slower), and "
        f"later grids are planned smaller"
    )
    return True


def launched_or_stepwise(
    plan: LayerPlan, programs: int, device: torch.device, launch: Callable[[LayerPlan], None]
) -> LayerPlan:  # fmt: skip
    """``launch(plan)``, a persistent grid of ``programs`` programs; where the driver refuses its cooperative launch
    (refused before any program ran: at the first launch, every launch of a plan having one grid), ``launch`` again
    with the plan stepwise. Returns the plan that ran."""
    try:
        launch(plan)
        return plan
    except RuntimeError as error:
        if not (plan.persistent and cooperative_refused(error, programs, device)):
            raise
    plan = stepwise(plan)
    launch(plan)
    return plan


def stepwise(plan: LayerPlan) -> LayerPlan:
    """The plan (and its backward's) run one launch per step: no grid barrier, no tagged exchange, so no program
    waits for another within a launch and any grid runs."""

    def one(p: LayerPlan) -> LayerPlan:
        return dataclasses.replace(p, persistent=False, tagged=False, batch_groups=1)

    return dataclasses.replace(one(plan), backward=one(plan.backward) if plan.backward is not None else None)


_forced_plan: dict[str, int | bool] = {}
# Set by the tests' concurrent interpreter (tests/concurrent_interpreter.py), which runs a launch's programs in
# threads: persistent grids of several programs can run under the interpreter then.
PROGRAMS_AT_ONCE = False


def force_plan(**fields: int | bool) -> None:
    """Override fields of every plan (``block_h=16, persistent=False``); no arguments clears.

    Used by tests to run a split grid under the interpreter, and by benchmarks to compare configs.
    """
    _forced_plan.clear()
    _forced_plan.update(fields)


def plan_layer(
    cell: str, hidden_size: int, batch: int, dtype: torch.dtype, device: torch.device, directions: int = 1,
    block_h: int | None = None,
) -> LayerPlan | str:  # fmt: skip
    """The launch for one layer, or a string saying why the persistent kernels cannot run it. ``block_h``: units a
    program on the GPU, its reduction in one chunk (default ``heuristic_width``)."""
    _, gates, _ = CELLS[cell]
    block_k = max(MIN_DOT, next_pow2(hidden_size))
    block_ks = LayerPlan.block_ks
    # fp32's dot (no tensor cores in IEEE mode) spills kilobytes per thread with 32-row tiles (perf/NOTES.md).
    block_b = MIN_DOT if batch <= MIN_DOT or dtype == torch.float32 else 32
    if device.type == "cuda":
        if torch.version.hip is not None:
            # torch's "cuda" device on ROCm. Triton compiles the kernels for it, but their cross-program handshakes
            # are written for NVIDIA's one L2 that all SMs share. An MI300 has an L2 per XCD: in the LSTM's forward
            # compiled for gfx942 (Triton 3.9), the tagged words are plain stores left in the writer's L2 (no
            # release), polled by loads that read past it, so other XCDs may never see them. Until the kernels
            # have been run on an AMD GPU: the fallbacks, which are correct.
            return "an AMD GPU (ROCm), where the kernels have not been run yet"
        if dtype not in MAX_HIDDEN:
            return f"{dtype} on the GPU"
        if hidden_size > MAX_HIDDEN[dtype]:
            return f"hidden_size above {MAX_HIDDEN[dtype]} in {dtype}"
        # A forced width derives the rest of the plan as a chosen one would (forced fields still override them).
        k_split = 1
        if not (block_h or "block_h" in _forced_plan):
            block_h, k_split = heuristic_width(hidden_size, gates, dtype)
        block_h = block_h or _forced_plan["block_h"]
        k_split = _forced_plan.get("k_split", k_split)
        num_programs = -(-hidden_size // block_h)
        block_k = held_rows(hidden_size, gates, block_h, dtype)
        if k_split > 1:
            block_ks = chunked_block_ks(block_ks, k_split)
            # One 16-row batch tile and a warp per chunk of the reduction (kernels/recurrent._dot_k).
            block_b, num_warps = MIN_DOT, k_split
        elif block_h > MIN_DOT:
            # One 16-row batch tile and a warp per 8 units: each warp its own columns of the gate dots (below).
            block_b, num_warps = MIN_DOT, block_h // MMA_N
        else:
            num_warps = heuristic_warps(gates * block_k * block_h * dtype.itemsize, 32 * 1024, dtype)
        sm_count = resident_programs(cuda_index(device))
        persistent = num_programs <= sm_count
        together = num_programs * directions <= sm_count
    else:
        if dtype not in MAX_HIDDEN and dtype != torch.float64:
            return f"{dtype} under the interpreter"  # complex, say, which torch.nn's CPU layers run
        # Interpreter: programs run one after another, so a persistent grid has one program (a group).
        block_h = block_k
        num_programs = 1
        num_warps = 4
        persistent = True
        together = True
        k_split = 1
    plan = apply_forced_plan(
        LayerPlan(block_h, block_b, block_k, num_programs, num_warps, persistent, together, block_ks=block_ks,
                  k_split=k_split),
        hidden_size, device, directions,
    )  # fmt: skip
    if device.type == "cuda" and "held_halves" not in _forced_plan:
        plan = dataclasses.replace(plan, held_halves=fma_halves(plan, gates, dtype))
    if device.type == "cuda" and "batch_groups" not in _forced_plan:
        plan = with_batch_groups(plan, batch, directions, resident_programs(cuda_index(device)))
    if device.type == "cuda":
        plan = with_pipeline(plan, batch, hidden_size, dtype)
    return plan


def heuristic_width(hidden_size: int, gates: int, dtype: torch.dtype) -> tuple[int, int]:
    """(units a program takes, chunks of its reduction). Where the dots run on tensor cores: WIDE_BLOCK_H units where
    a program holds its whole slice of W_hh at that width; else 16 units with the reduction in SPLIT_WARPS chunks,
    one a warp (LSTM and GRU from H=768 in 16-bit, from 512 with TF32: the whole slice held up to H=1024 in 16-bit,
    the rows beyond read every step, chunked alike). float32 without TF32 multiplies on the FMA units: 16 units, in
    chunks where they do not spill (fma_chunks).

    Triton gives every warp of a program the batch rows of its gate dots where the tile has at least as many rows as
    columns (the dots share their h operand, which Triton counts as a chain): with 16 rows and 16 units, 16 x 16, each
    of 4 or 8 warps computes the whole tile, a copy per warp, and reads the whole slice from shared memory every
    step. With 32 units (16 x 32) the warps take the columns, 8 each (mma.sync's tile is 16 x 8): LSTM bf16 H=512
    B=16, a quarter of the forward's mma per SM and 30% of its shared-memory reads (sm_90 PTX, perf/NOTES.md). A
    reduction in chunks is a 3-D dot whose warps Triton lays over the chunks (kernels/recurrent._dot_k): no copies at
    16 units either, and twice the rows held that 32 units would hold (the same bytes).
    """
    if hidden_size <= MIN_DOT:
        return MIN_DOT, 1
    if fma_dots(dtype):
        rows = held_rows(hidden_size, gates, MIN_DOT, dtype)
        return MIN_DOT, fma_chunks(rows, gates, halves=True)
    # The tagged exchange (opt-in) keeps 16 units, in chunks of 64 rows or more: at 32 units its tile of tagged words
    # spills kilobytes a thread (RNN-tanh bf16 H=2048: 3.4 KB); at 16 in one chunk LSTM bf16 H=1024's forward 552
    # bytes, in 8 chunks of 128 rows nothing; in 8 chunks of 32 rows (H=256) LSTM's and GRU's backward 104-120 bytes
    # (ptxas held it to 128 registers), in one chunk 8 (sm_90, Triton 3.6).
    tagged = exchange_setting() == "tagged"
    if not tagged and held_rows(hidden_size, gates, WIDE_BLOCK_H, dtype) >= next_pow2(hidden_size):
        return WIDE_BLOCK_H, 1
    return MIN_DOT, narrow_chunks(held_rows(hidden_size, gates, MIN_DOT, dtype), dtype, tagged)


def narrow_chunks(rows: int, dtype: torch.dtype, tagged: bool) -> int:
    """Chunks of the reduction over ``rows`` held rows at 16 units a program: SPLIT_WARPS where the dots run on tensor
    cores and each chunk keeps MIN_DOT rows (64 with the tagged exchange: heuristic_width), else 1."""
    least_chunk = 4 * MIN_DOT if tagged else MIN_DOT
    return SPLIT_WARPS if not fma_dots(dtype) and rows // SPLIT_WARPS >= least_chunk else 1


def fma_halves(plan: LayerPlan, gates: int, dtype: torch.dtype) -> bool:
    """Whether the single-layer forward of float32 without TF32 holds its rows as two halves, two dots a gate: in
    chunks beyond FMA_CHUNKED_ROWS rows of all gates (LSTM and GRU from H=512). Triton's FMA dot loads each thread's
    share of both operands into registers before it multiplies; over 64 units a chunk that spills (LSTM H=512 on
    Triton 3.6: 32 registers and a 2.3 KB stack; 3.9: 360 bytes), over 32 it does not (211 registers; forward
    20,480 -> 12,576 wavefronts a step against one chunk; sm_90 compiles, perf/NOTES.md, thirty-third session). The
    rows streamed beyond the held ones (H=768, 1024) are read in chunks of their own (kernels/recurrent.py)."""
    return fma_dots(dtype) and plan.k_split > 1 and gates * plan.block_k > FMA_CHUNKED_ROWS


def fma_chunks(rows: int, gates: int, halves: bool = False) -> int:
    """Chunks of the reduction over ``rows`` held rows where the dots run on the FMA units (float32 without TF32), 16
    units a program, one chunk a warp: as many as keep MIN_DOT rows each, up to SPLIT_WARPS, where that is 4 or more
    and the gates hold at most FMA_CHUNKED_ROWS rows together; else 1. In one chunk Triton gives each of 8 warps two
    batch rows of the 16 x 16 tile and every warp reads the whole slice from shared memory; in chunks each warp reads
    its own: LSTM H=256 B=16 6,304 wavefronts a step forward and 18,768 backward against 10,240 and 32,768 (Triton
    3.6), no spill. Beyond 1024 rows (LSTM and GRU from H=512) the chunked forward spills 2.3 KB a thread on Triton
    3.6: chunks there where the kernel holds its rows in two halves (``halves``: the single layer's forward,
    fma_halves), with rows streamed or not (LSTM H=1024 forward 40,960 -> 27,680 wavefronts a step against one
    chunk on Triton 3.6, -> 24,608 on 3.9, no stack); else the LSTM takes chunks all the same where its forward
    cannot read W_hh transposed in one chunk (fma_one_chunk_transposes: 136,000 wavefronts a step at H=512, 16 times
    the ideal; in chunks 12,600 and a 360-byte spill; the projection on Triton 3.9). sm_90 compiles, perf/NOTES.md,
    thirty-second to thirty-fourth sessions."""
    chunks = min(SPLIT_WARPS, rows // MIN_DOT)
    if chunks < 4:
        return 1
    if gates * rows <= FMA_CHUNKED_ROWS or halves or not fma_one_chunk_transposes(gates, False):
        return chunks
    return 1


def fma_one_chunk_transposes(gates: int, streamed: bool) -> bool:
    """Whether the single-layer forward of float32 without TF32 can read W_hh transposed with its reduction in one
    chunk (layer_run.weights_transposed). Not the LSTM holding its whole slice on Triton 3.9 and later: 3.9's LLVM
    aborts the process (an assertion of its SLP vectorizer) compiling it (sm_90, H=64 to 512); 3.6 to 3.8 compile
    it, and 3.9 compiles it in chunks or with rows streamed (H=768, 1024). Check a newer release with ``python -m
    perf.compile_report --cells lstm --hidden 64 512 --dtype fp32`` (one chunk forced) before lifting this."""
    return gates != 4 or streamed or triton_version() < (3, 9)


def chunked_block_ks(block_ks: int, k_split: int) -> int:
    """Rows streamed a time with the reduction in k_split chunks: MIN_DOT a warp at least (tl.dot's least K). The
    streamed loop is compiled even where it never runs, so this holds for every chunked plan."""
    return max(block_ks, MIN_DOT * k_split)


def with_projection_chunks(plan: LayerPlan, hidden_size: int, proj: int, dtype: torch.dtype) -> LayerPlan:
    """The projection's kernels' plan (16 units a program) with both their reductions, over the P projected units
    and over the H hidden units, in chunks a warp each where the smaller one can be cut (narrow_chunks; with the dots
    on the FMA units fma_chunks, the four gates' reduction over P the one that spills); a forced k_split is kept. In
    one chunk every warp computed the whole 16 x 16 tile of each dot (perf/NOTES.md)."""
    if "k_split" in _forced_plan:
        return plan
    rows = min(max(MIN_DOT, next_pow2(hidden_size)), max(MIN_DOT, next_pow2(proj)))
    if fma_dots(dtype):
        k_split = fma_chunks(rows, 4, False)
    else:
        k_split = narrow_chunks(rows, dtype, False)
    if k_split == 1:
        return plan
    block_ks = chunked_block_ks(plan.block_ks, k_split)  # the streamed rows in chunks alike (the backward's at least)
    return dataclasses.replace(plan, k_split=k_split, num_warps=k_split, block_b=MIN_DOT, block_ks=block_ks)


def heuristic_warps(held_bytes: int, four_warps_up_to: int, dtype: torch.dtype) -> int:
    """Warps of a program holding ``held_bytes`` of weights: 8 once the slice is large (4 spill from LSTM bf16 H=512
    on), and always for float32 without TF32, whose dot runs on the FMA units: with 4 warps each thread's share of it
    spills, hundreds of bytes at H=128 and kilobytes from 256 (RNN-tanh fp32 H=512: 5 KB a thread), with 8 nothing
    (sm_90 compiles, perf/NOTES.md)."""
    if fma_dots(dtype):
        return MAX_WARPS
    return 4 if held_bytes <= four_warps_up_to else MAX_WARPS


def with_pipeline(plan: LayerPlan, batch: int, hidden_size: int, dtype: torch.dtype, proj: int = 0) -> LayerPlan:
    """The heuristics' pipeline depth: one stage where each group of programs has a single batch tile and holds its
    whole W_hh slice (or holds it in chunks, or a tile's h over its held rows is wide: below), else three. Triton's
    pipeliner buffers a kernel's innermost loop: the batch-tile loop, or with rows streamed the loop over their chunks.
    Over one tile it overlaps nothing, and its buffers cost shared memory and registers: with three stages the RNN-tanh
    bf16 H=1024 B=16 forward spills 1.9 KB a thread, with one none (sm_90 compiles, perf/NOTES.md). With a projection
    (``proj``) W_hh's reduction runs over P forward and over H backward: each kernel its own depth, where only the
    backward streams rows (bf16 H=2048 P=512: the forward with two stages spilled 56 bytes on Triton 3.6, with one
    nothing). A forced num_stages is kept. (Heuristic plans only: a tuned one, which may have a backward plan of its
    own, keeps its stages.)"""
    if "num_stages" in _forced_plan:
        return plan
    one_tile = -(-batch // plan.batch_groups) <= plan.block_b
    # A reduction in chunks (heuristic_width: a whole slice held at 16 units, 96-128 KB) leaves no room for the
    # pipeline's buffers over several tiles (LSTM bf16 H=1024 B=256: 264 KB forward, 648 KB backward with three).
    # Nor does a tile's h over more than PIPELINED_H_BYTES of held rows in one chunk: the next tiles' copies of it
    # take the registers (RNN-tanh at H=768-1024 in 16-bit and at 512 with TF32, 32 KB: with two or three stages
    # the forward drops to 32 registers and a 2 KB stack a thread, the backward 255 and 350-450 bytes; with one,
    # nothing; at 16 KB, LSTM bf16 H=512 B=256, three stages spill nothing; sm_90, Triton 3.6 and 3.9).
    wide_h = plan.k_split == 1 and plan.block_b * plan.block_k * dtype.itemsize > PIPELINED_H_BYTES
    one_stage = one_tile or plan.k_split > 1 or wide_h

    def stages(reduction: int) -> int:
        return 1 if one_stage and plan.block_k >= reduction else 3

    forward = dataclasses.replace(plan, num_stages=stages(proj or hidden_size))
    backward = dataclasses.replace(plan.for_backward(), num_stages=stages(hidden_size))
    return dataclasses.replace(forward, backward=backward if backward != forward else None)


def with_batch_groups(plan: LayerPlan, batch: int, directions: int, sm_count: int) -> LayerPlan:
    """The plan (and its backward's) with the batch split in as many groups as the idle SMs take.

    Rows of an RNN never interact, so a second group of programs doing the next tiles of the batch shortens every
    step instead of idling: at B=256, H=512 bf16 one group is 16 programs looping over 16 tiles of 16 rows, eight
    groups are 128 programs looping over 2. Every program of every group must be resident at once (one per SM);
    a group has at least one whole tile. Persistent plans only (a step-by-step launch gains nothing from it).
    """

    def apply(one: LayerPlan) -> LayerPlan:
        per_launch = directions if one.directions_together else 1
        fits = sm_count // (one.num_programs * per_launch) if one.persistent else 1
        groups = max(1, min(fits, -(-batch // one.block_b)))
        return dataclasses.replace(one, batch_groups=groups) if groups != one.batch_groups else one

    plan = apply(plan)
    if plan.backward is not None:
        plan = dataclasses.replace(plan, backward=apply(plan.backward))
    return plan


def single_group(plan: LayerPlan) -> LayerPlan:
    """The plan with the whole batch in one group of programs (forward and backward)."""
    backward = dataclasses.replace(plan.backward, batch_groups=1) if plan.backward is not None else None
    return dataclasses.replace(plan, batch_groups=1, backward=backward)


def in_one_group(plan: LayerPlan, batch: int, hidden_size: int, dtype: torch.dtype, proj: int) -> LayerPlan:
    """A heuristic GPU plan run as one group of programs over the whole batch (the projection's kernels, a layer of
    the stream wavefront), its pipeline depth counted on that group's tiles."""
    return with_pipeline(single_group(plan), batch, hidden_size, dtype, proj)


def smaller_plan(plan: LayerPlan, full: LayerPlan, batch: int) -> LayerPlan | None:
    """The next plan to try when ``plan``'s compiled kernels need more shared memory than the GPU has (``full``: the
    first plan tried), or None when there is none.

    Triton's pipeliner buffers the batch-tile loop's loads num_stages times even for a single tile (the batch is not
    specialised), which can take more than the weights: LSTM bf16 H=512 B=64 backward 329,728 bytes with 3 stages,
    100,352 with 1 (sm_90, Triton 3.9; perf/NOTES.md, twenty-third session). With one tile a group there is nothing to
    overlap but rows streamed: fewer stages first, as for a reduction in chunks. With several, fewer held rows of the
    slice (the rest read every step; with a projection, of W_hh's reduction over P forward and over H backward),
    keeping the pipeline; where that runs out, one stage from the full slice again.
    """
    one_tile = -(-batch // plan.batch_groups) <= plan.block_b
    can_halve = plan.block_k // 2 >= MIN_HELD_ROWS
    # A reduction in chunks keeps its whole slice first too: its slice is what leaves the pipeline no room
    # (with_pipeline), and rows streamed instead are read from L2 every step.
    whole_first = one_tile or not can_halve or plan.k_split > 1
    stages = max(plan.num_stages, plan.for_backward().num_stages)
    if stages > 1 and whole_first:
        # Over one tile or in chunks a heuristic plan of several stages streams rows (with_pipeline): two stages
        # overlap the next chunk's reads from L2 with this one's dots, so two before one (LSTM fp32 H=1024 B=16, 8
        # chunks: its backward needs 264 KB with three, 200 KB with two, 160 KB with one; sm_90, Triton 3.6).
        fewer = 2 if stages > 2 and (one_tile or plan.k_split > 1) else 1

        def fewer_stages(one: LayerPlan) -> LayerPlan:
            return dataclasses.replace(one, num_stages=min(fewer, one.num_stages))

        return dataclasses.replace(
            fewer_stages(full), backward=fewer_stages(full.backward) if full.backward else None
        )  # fmt: skip
    if can_halve:
        backward = _half_held(plan.backward) if plan.backward else None
        return dataclasses.replace(_half_held(plan), backward=backward)
    return None


def _half_held(plan: LayerPlan) -> LayerPlan:
    """The plan holding half its rows, its reduction in as many chunks as still hold MIN_DOT rows each."""
    block_k = plan.block_k // 2
    # Half the rows held: within FMA_CHUNKED_ROWS again (fma_halves), no halves of them.
    return dataclasses.replace(
        plan, block_k=block_k, k_split=max(1, min(plan.k_split, block_k // MIN_DOT)), held_halves=False
    )


def plan_stack(
    cell: str, hidden_size: int, n_layers: int, batch: int, dtype: torch.dtype, device: torch.device
) -> LayerPlan | str:
    """The launch of kernels/stack.py for n_layers equal layers (grid (num_programs, n_layers)), or why not.

    Each program holds its slices of two weight matrices (W_hh, and W_ih of its own layer or the next), all their
    rows: the stack kernel reads no weights every step. On the GPU every program of every layer must be resident.
    The interpreter runs one program per layer, one wavefront step per launch (programs run one after another).
    """
    _, gates, _ = CELLS[cell]
    layer = plan_layer(cell, hidden_size, batch, dtype, device)
    if isinstance(layer, str):
        return layer
    if device.type != "cuda":
        return dataclasses.replace(layer, persistent=PROGRAMS_AT_ONCE and layer.persistent)
    block_k = max(MIN_DOT, next_pow2(hidden_size))
    if 2 * gates * block_k * layer.block_h * dtype.itemsize > HELD_WEIGHT_BYTES and layer.block_h > MIN_DOT:
        # Two matrices held: where a layer's wide slice does not fit twice, the narrow one may.
        layer = plan_layer(cell, hidden_size, batch, dtype, device, block_h=MIN_DOT)
    held = 2 * gates * block_k * layer.block_h * dtype.itemsize
    if held > HELD_WEIGHT_BYTES:
        return f"the stack kernel would hold {held} bytes of weights per program (at most {HELD_WEIGHT_BYTES})"
    programs = layer.num_programs * n_layers
    if programs > resident_programs(cuda_index(device)):
        return f"the stack kernel's {programs} programs would not all be resident"
    # 16 units a program: both reductions in chunks, a warp each, where they can be (no copies of the tile per warp).
    # On the FMA units the layer's (fma_chunks): two slices held, 3-layer LSTM fp32 H=256 spills nothing in 8 chunks.
    k_split = layer.k_split
    if layer.block_h == MIN_DOT and "k_split" not in _forced_plan and not fma_dots(dtype):
        k_split = narrow_chunks(block_k, dtype, exchange_setting() == "tagged")
    if k_split > 1:
        num_warps = k_split
    elif layer.block_h > MIN_DOT:
        num_warps = layer.num_warps
    else:
        num_warps = heuristic_warps(held, 64 * 1024, dtype)
    # One group: the stack kernel loops over the whole batch.
    # (No rows are streamed, but the streamed loop is compiled: chunked_block_ks.)
    stack = dataclasses.replace(
        layer, block_k=block_k, block_b=MIN_DOT if k_split > 1 else layer.block_b, num_warps=num_warps,
        persistent=True, batch_groups=1, backward=None, k_split=k_split,
        block_ks=chunked_block_ks(layer.block_ks, k_split), held_halves=False,
    )  # fmt: skip
    return with_pipeline(stack, batch, hidden_size, dtype)


def held_rows(hidden_size: int, gates: int, block_h: int, dtype: torch.dtype) -> int:
    """Rows of the reduction whose W_hh slice a program holds: all of them (a power of two >= H) where
    HELD_WEIGHT_BYTES allows, else the largest power of two that fits (the rest is read every step)."""
    rows = max(MIN_DOT, next_pow2(hidden_size))
    while rows > MIN_HELD_ROWS and gates * rows * block_h * dtype.itemsize > HELD_WEIGHT_BYTES:
        rows //= 2
    return rows


def plan_with(
    cell: str, hidden_size: int, directions: int, device: torch.device, dtype: torch.dtype, block_h: int,
    block_b: int, num_warps: int, num_stages: int = 3, batch: int = 1, k_split: int = 1,
) -> LayerPlan:  # fmt: skip
    """The plan of one configuration (the autotuner's candidates): programs, residency and batch groups derived
    from it."""
    num_programs = -(-hidden_size // block_h)
    sm_count = resident_programs(cuda_index(device))
    plan = LayerPlan(
        block_h=block_h,
        block_b=block_b,
        block_k=held_rows(hidden_size, CELLS[cell][1], block_h, dtype),
        num_programs=num_programs,
        num_warps=num_warps,
        persistent=num_programs <= sm_count,
        directions_together=num_programs * directions <= sm_count,
        num_stages=num_stages,
        block_ks=chunked_block_ks(LayerPlan.block_ks, k_split),
        k_split=k_split,
    )
    plan = dataclasses.replace(plan, held_halves=fma_halves(plan, CELLS[cell][1], dtype))
    return with_batch_groups(plan, batch, directions, sm_count)


def forced() -> bool:
    return bool(_forced_plan)


def apply_forced_plan(plan: LayerPlan, hidden_size: int, device: torch.device, directions: int = 1) -> LayerPlan:
    """``plan`` with the fields ``force_plan`` set (unchanged when nothing is forced)."""
    if _forced_plan:
        plan = dataclasses.replace(plan, **_forced_plan)
        plan = dataclasses.replace(plan, num_programs=-(-hidden_size // plan.block_h))
        if plan.persistent and plan.num_programs > 1 and device.type != "cuda" and not PROGRAMS_AT_ONCE:
            raise ValueError("a persistent grid of several programs deadlocks under the interpreter")
        check_k_split(plan, device)
        if plan.persistent and device.type == "cuda":
            # One launch holds both directions' grids where they go together.
            programs = plan.num_programs * plan.batch_groups * (directions if plan.directions_together else 1)
            if programs > resident_programs(cuda_index(device)):
                raise ValueError(f"a persistent grid of {programs} programs would not all be resident")
    return plan


def check_k_split(plan: LayerPlan, device: torch.device) -> None:
    """A plan's reduction chunks must cut its held rows, and the rows it streams at a time, evenly, on the GPU in
    chunks tl.dot accepts; the kernels sum 2, 4 or 8 chunks (kernels/recurrent._sum_chunks)."""
    least = MIN_DOT if device.type == "cuda" else 1
    held = plan.block_k // 2 if plan.held_halves else plan.block_k
    for rows, what in (
        (held, "held rows" + " (each half)" * plan.held_halves),
        (plan.block_ks, "rows streamed at a time"),
    ):
        if plan.k_split < 1 or rows % plan.k_split or rows // plan.k_split < least:
            raise ValueError(
                f"k_split={plan.k_split} does not cut the {rows} {what} into equal chunks"
                + (f" of at least {MIN_DOT}" if device.type == "cuda" else "")
            )
    if plan.k_split not in (1, 2, 4, 8):
        raise ValueError(f"k_split={plan.k_split}: the kernels take the reduction in 1, 2, 4 or 8 chunks")


EXCHANGES = ("barrier", "tagged")
TAGGED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def exchange_setting() -> str:
    """``TRITONRNN_EXCHANGE``: how the programs of a layer's kernels share h (forward) or the gate gradients
    (backward) each step. "barrier" (default): stores, a grid barrier, loads; "tagged": words carrying their step,
    polled (kernels/sync.py). Off by default until measured on a GPU (perf/NOTES.md)."""
    value = os.environ.get("TRITONRNN_EXCHANGE", "barrier").strip() or "barrier"
    if value not in EXCHANGES:
        raise ValueError(f"TRITONRNN_EXCHANGE should be one of {EXCHANGES}, got {value!r}")
    return value


def with_exchange(plan: LayerPlan, hidden_size: int, dtype: torch.dtype, proj: int) -> LayerPlan:
    """The plan (and its backward's) with the tagged exchange where it is asked for and applies: the single-layer
    kernels without projection, 16- or 32-bit values, every row of the slice held (streamed rows are read from the
    plain buffers)."""
    asked = exchange_setting() == "tagged" and not proj and dtype in TAGGED_DTYPES

    def apply(one: LayerPlan) -> LayerPlan:
        tagged = asked and one.block_k >= hidden_size
        return dataclasses.replace(one, tagged=tagged) if tagged != one.tagged else one

    plan = apply(plan)
    if plan.backward is not None:
        plan = dataclasses.replace(plan, backward=apply(plan.backward))
    return plan


_logged: set[str] = set()


def unpack_saved(ctx) -> tuple[torch.Tensor, ...]:
    """ctx.saved_tensors; torch's error for a tensor modified in place since forward gets what it means here."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        # The tensor torch names can be a view the user never saw: the kernels take a one-way layer's weight_hh_l{k}
        # (and weight_hr_l{k}) as [1, rows, columns].
        raise RuntimeError(
            f"{error}\ntritonrnn: an input, a parameter or an output of a layer was modified in place between its "
            "forward and its backward (an optimizer step before backward, say), as torch.nn's cuDNN layers refuse too "
            "(the backward reads the outputs; torch.nn's CPU layers do not); clone an output before changing it in "
            "place. A one-way layer's weight_hh_l{k} and weight_hr_l{k} [rows, columns] appear above as [1, rows, "
            "columns]"
        ) from error


def refuse_double_backward(what: str) -> None:
    """In a stack-wide backward: a clear error for create_graph=True, which its kernels cannot serve."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"tritonrnn: {what} has no double backward (a backward with create_graph=True); "
            "unset TRITONRNN_WAVEFRONT to run the stack layer by layer, whose backward can be differentiated"
        )


def refuse_batched_gradients(what: str, grads) -> None:
    """In a stack-wide backward: a clear error for the older vmap's batched gradients (is_grads_batched=True,
    jacobian(vectorize=True)), which its kernels cannot read."""
    if any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads):
        raise RuntimeError(
            f"tritonrnn: {what} has no batched backward (is_grads_batched=True, jacobian(vectorize=True)); "
            "unset TRITONRNN_WAVEFRONT to run the stack layer by layer, whose backward takes batched gradients"
        )


def transform_beyond_grad() -> str | None:
    """The torch.func transform other than grad and vjp under way (vmap: ensembles, per-sample gradients; jvp,
    jacfwd), or None. The kernels' autograd Function has neither a batching rule nor a forward-mode rule, nor has
    torch's RNN op (torch.nn's layers fail there); the reference's torch ops have both."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return None
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grad = torch._C._functorch.TransformType.Grad
    other = [level.key() for level in retrieve_all_functorch_interpreters() if level.key() != grad]
    return f"torch.func's {other[0].name.lower()}" if other else None


def log_once(message: str) -> None:
    """Log a fallback the first time it happens (each distinct message once per process)."""
    if message not in _logged:
        _logged.add(message)
        log.warning(message)
