"""One layer's buffers and kernel launches: the input projection GEMM, the persistent recurrence kernels
(kernels/recurrent.py, kernels/lstm_proj.py) forward and backward, and the GEMMs and sums for the gradients.

``LayerRun`` runs a layer's steps in chunks (the whole sequence, or the wavefront's chunks); the launch
constants and the pre-launch compile check (``_gpu_misfit``) live beside it because they share the
kernels' argument lists.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.errors import TritonError

from tritonrnn import _plan
from tritonrnn._capture import launch as launch_kernel
from tritonrnn._plan import (
    CELLS,
    FP_FUSION,
    MIN_DOT,
    LayerPlan,
    check_interpreter,
    interpret_mode,
    next_pow2,
    on_device,
    persistent_chunks,
    tf32_matmul,
)
from tritonrnn.dropout import LayerDropout
from tritonrnn.kernels.dropout import DROPOUT_NONE
from tritonrnn.kernels.lstm_proj import lstm_proj_bwd_kernel, lstm_proj_fwd_kernel
from tritonrnn.kernels.recurrent import rnn_bwd_kernel, rnn_fwd_kernel


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation precision: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ring_dtype(dtype: torch.dtype) -> torch.dtype:
    """The tagged exchange's words: the value's bits and the tag in one word twice the value's width."""
    return torch.int32 if dtype.itemsize == 2 else torch.int64


def _tagged_ring(h0: Tensor, dtype: torch.dtype) -> Tensor:
    """[D, 2, B, N] words for the tagged exchange (kernels/sync.py): slot 0 the initial state with tag 1 (the
    first step's), slot 1 zeros (tag 0: no step's). Built as (tag, value) halves: the low half of a little-endian
    word comes first."""
    D, B, N = h0.shape
    half = torch.int16 if dtype.itemsize == 2 else torch.int32
    halves = torch.zeros(D, 2, B, N, 2, dtype=half, device=h0.device)
    halves[:, 0, :, :, 0] = 1
    halves[:, 0, :, :, 1] = h0.to(dtype).view(half)
    return halves.view(_ring_dtype(dtype)).view(D, 2, B, N)


class Variant(NamedTuple):
    """What a layer's kernels do besides the recurrence (each choice compiles its own kernels)."""

    directions: int = 1
    residual: bool = False
    dropout_mode: int = int(DROPOUT_NONE.value)  # kernels/dropout.py's DROPOUT_*
    proj: int = 0  # LSTM proj_size (kernels/lstm_proj.py), 0 for none
    varlen: bool = False  # sequences of different lengths (a PackedSequence)

    @property
    def write_y(self) -> bool:
        return writes_y(self.directions, self.residual, self.varlen)


def writes_y(directions: int, residual: bool, varlen: bool) -> bool:
    """Whether the kernels write the output y: a unidirectional layer without residual has it in hseq already, unless
    rows end early (their output is zero there, while hseq carries their state)."""
    return directions > 1 or residual or varlen


def _kernel_constants(
    cell: str, hidden: int, dtype: torch.dtype, plan: LayerPlan, variant: Variant, backward: bool = False
) -> dict:  # fmt: skip
    """The constants of ``plan``'s forward kernel (its backward's with ``backward``)."""
    cell_id, gates, n_saved = CELLS[cell]
    tf32 = dtype == torch.float32 and tf32_matmul()
    common = dict(
        H=hidden,
        D=variant.directions,
        BLOCK_H=plan.block_h,
        BLOCK_B=plan.block_b,
        RESIDUAL=variant.residual,
        DROPOUT=variant.dropout_mode,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if tf32 else "ieee",
        DOT_UPCAST=dtype == torch.bfloat16 and interpret_mode(),
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    if variant.proj:
        # W_hh's reduction runs over P forward, over H backward: plan.block_k of its rows held (all where that covers
        # them), the rest streamed; W_hr's held whole.
        block_kh, block_kp = max(MIN_DOT, next_pow2(hidden)), max(MIN_DOT, next_pow2(variant.proj))
        return dict(
            common,
            P=variant.proj,
            BLOCK_KH=block_kh,
            BLOCK_KP=block_kp,
            BLOCK_K=min(plan.block_k, block_kh if backward else block_kp),
            BLOCK_KS=plan.block_ks,
            VARLEN=variant.varlen,
            K_SPLIT=plan.k_split,
        )
    return dict(
        common, CELL=cell_id, G=gates, S=n_saved, BLOCK_K=plan.block_k, BLOCK_KS=plan.block_ks, VARLEN=variant.varlen,
        K_SPLIT=plan.k_split,
    )  # fmt: skip


def weights_transposed(cell: str, dtype: torch.dtype, k_split: int = 1, streamed: bool = False) -> bool:
    """Whether the single-layer forward kernel of a plan with ``k_split`` chunks (and rows ``streamed`` beyond the
    held ones) reads W_hh transposed (its W_T): float32 without TF32, whose dots run on the FMA units and read the
    held weights from shared memory a unit a lane. Row-major, a warp's 16 units lie 4*H bytes apart, in the same
    bank; transposed, side by side: LSTM H=512 a seventh of the shared-memory wavefronts a step (perf/NOTES.md,
    thirty-first session). Except where Triton cannot compile it so (_plan.fma_one_chunk_transposes)."""
    if not _plan.fma_dots(dtype):
        return False
    return k_split > 1 or _plan.fma_one_chunk_transposes(CELLS[cell][1], streamed)


def forward_transposed(cell: str, dtype: torch.dtype, plan: LayerPlan, hidden: int, proj: int) -> bool:
    """weights_transposed for the forward kernel of a plan, whose reduction runs over P with a projection."""
    return weights_transposed(cell, dtype, plan.k_split, plan.block_k < (proj or hidden))


def _launch_options(plan: LayerPlan, device: torch.device) -> dict:
    if device.type == "cuda":
        options = dict(enable_fp_fusion=FP_FUSION)
        if plan.persistent:
            # A grid barrier deadlocks unless all programs are resident: ask the driver to guarantee it.
            options["launch_cooperative_grid"] = True
        return options
    if device.type == "cpu":
        check_interpreter()
    return {}


def sync_arguments(launch: dict, plan: LayerPlan) -> dict:
    """A launch's arguments with the synchronisation ``plan`` runs: SYNC (a persistent grid's barrier), and the tagged
    exchange's ring only where the plan is tagged (a tagged plan made stepwise launches as an untagged one)."""
    launch = dict(launch, SYNC=plan.persistent)
    if not plan.tagged:
        launch.pop("ring", None)
        launch.pop("TAGGED", None)
    return launch


def _direction_groups(plan: LayerPlan, directions: int) -> list[tuple[int, int]]:
    """(first direction, number of directions) of each launch: both together when the GPU holds both grids."""
    if directions == 1 or plan.directions_together:
        return [(0, directions)]
    return [(d, 1) for d in range(directions)]


def _warmup_calls(
    cell: str, hidden: int, dtype: torch.dtype, plan: LayerPlan, variant: Variant, device: torch.device
) -> list[tuple[str, object, dict]]:
    """(name, kernel, keyword arguments) that compile the forward and backward kernels of a layer without a launch
    (tiny placeholder tensors: only dtypes, constants and launch options matter)."""
    acc = _acc_dtype(dtype)

    def t(dt=dtype):
        return torch.empty(16, dtype=dt, device=device)

    def common(kernel_plan: LayerPlan, backward: bool) -> dict:
        grid = (kernel_plan.num_programs, _direction_groups(kernel_plan, variant.directions)[0][1])
        constants = _kernel_constants(cell, hidden, dtype, kernel_plan, variant, backward)
        options = _launch_options(kernel_plan, device)
        return dict(counter=t(torch.int32), T=1, B=1, n_steps=1, direction0=0, seed_ptr=t(torch.int64), p_drop=0.5,
                    SYNC=kernel_plan.persistent, grid=grid, **constants, **options)  # fmt: skip

    forward_args = dict(xproj=t(), w_hh=t(), hseq=t(), state=t(acc), saved=t(), y=t(), res=t(), z=t(), t_start=0,
                        SAVE=True, WRITE_Y=variant.write_y, **common(plan, False))  # fmt: skip
    backward_args = dict(w_hh=t(), saved=t(), c0=t(acc), grad_y=t(), grad_z=t(), grad_res=t(), grad_gates=t(),
                         grad_h=t(acc), grad_c=t(acc), u_start=0, finish=1,
                         **common(plan.for_backward(), True))  # fmt: skip
    backward_tagged = plan.for_backward().tagged
    transposed = forward_transposed(cell, dtype, plan, hidden, variant.proj)
    if variant.proj:
        return [
            (
                "forward",
                lstm_proj_fwd_kernel,
                dict(w_hr=t(), mseq=t(), lengths=t(torch.int32), phases=3, W_T=transposed, **forward_args),
            ),
            (
                "backward",
                lstm_proj_bwd_kernel,
                dict(w_hr=t(), grad_hp=t(), lengths=t(torch.int32), phases=3, **backward_args),
            ),
        ]
    tagged = dict(ring=t(_ring_dtype(dtype)) if plan.tagged else None, TAGGED=plan.tagged)
    return [
        (
            "forward",
            rnn_fwd_kernel,
            dict(b_hn=t(), lengths=t(torch.int32), W_T=transposed, HALVES=plan.held_halves, **tagged, **forward_args),
        ),
        (
            "backward",
            rnn_bwd_kernel,
            dict(
                hseq=t(),
                grad_xn=t(),
                lengths=t(torch.int32),
                TAGGED=backward_tagged,
                ring=t(_ring_dtype(dtype)) if backward_tagged else None,
                **backward_args,
            ),
        ),
    ]


@functools.cache
def _gpu_misfit(
    cell: str, hidden: int, dtype: torch.dtype, tf32: bool, plan: LayerPlan, variant: Variant, device_index: int
) -> str | None:
    """Compile both kernels for this GPU (no launch) and say why they cannot run there, or None.

    Triton decides where the resident weights live; the compiled kernel's shared memory is the fact.
    """
    calls = _warmup_calls(cell, hidden, dtype, plan, variant, torch.device("cuda", device_index))
    return compile_misfit(calls, device_index)


def compile_misfit(calls: list[tuple[str, object, dict]], device_index: int, what: str = "") -> str | None:
    """Compile each (name, kernel, keyword arguments) of ``calls`` for the GPU (no launch): why they cannot run
    there, or None. A kernel the installed Triton fails to compile is a misfit too, not the user's error: the caller's
    fallback runs, logged with the compiler's message (it caught Triton 3.6 rejecting a None ``ring``)."""
    max_shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    for name, kernel, kwargs in calls:
        try:
            shared = kernel.warmup(**kwargs).metadata.shared
        except (TritonError, RuntimeError) as error:  # RuntimeError: an MLIR pass that failed
            return f"the {what}{name} kernel does not compile with Triton {triton.__version__} ({_innermost(error)})"
        if shared > max_shared:
            return f"the {what}{name} kernel needs {shared} bytes of shared memory, the GPU has {max_shared}"
    return None


def _innermost(error: BaseException) -> str:
    """The root cause's last line (a CompilationError carries the failing function's source before its message)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).splitlines() if line.strip() and set(line.strip()) != {"^"}]
    return f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"


def _steps(plan: LayerPlan, t0: int, t1: int, two_phases: bool, backward: bool = False) -> list[dict]:
    """The launches running steps [t0, t1) of one direction group (backward: from t1 - 1 down to t0, then the
    carry into dL/dh0 when t0 == 0): all at once with the grid barrier (in chunks where a sequence is too long for
    the barrier's counter), or one step (one phase) per launch."""
    phases = dict(phases=3) if two_phases else {}
    if plan.persistent:
        chunks = persistent_chunks(t0, t1, plan.num_programs, 2 if two_phases else 1)
        if backward:
            return [dict(u_start=b - 1, n_steps=b - a, finish=int(a == 0), **phases) for a, b in reversed(chunks)]
        return [dict(t_start=a, n_steps=b - a, **phases) for a, b in chunks]
    each = [dict(phases=1), dict(phases=2)] if two_phases else [{}]
    if backward:
        steps = [dict(u_start=u, n_steps=1, finish=0, **p) for u in range(t1 - 1, t0 - 1, -1) for p in each]
        return steps + ([dict(u_start=-1, n_steps=0, finish=1, **phases)] if t0 == 0 else [])
    return [dict(t_start=t, n_steps=1, **p) for t in range(t0, t1) for p in each]


class Needs(NamedTuple):
    """Which of a layer's inputs want a gradient (autograd's needs_input_grad for them)."""

    x: bool = True
    h0: bool = True
    c0: bool = True
    w_ih: bool = True
    w_hh: bool = True
    b_ih: bool = True
    b_hh: bool = True
    w_hr: bool = True


ALL_NEEDED = Needs()


class LayerRun:
    """One layer's buffers and kernel launches, able to run its steps in chunks.

    ``forward_steps(t0, t1)`` projects inputs [t0, t1) and runs those steps; ``backward_steps(t0, t1)``
    runs them in reverse and writes dL/dx for those rows. A single layer runs one chunk, the whole
    sequence; the stack wavefront (``WavefrontStackFunction``) interleaves chunks of all layers.
    Chunks apply to one direction only: a bidirectional layer runs [0, T) at once.

    Shapes: x [T, B, I], h0 [D, B, N], c0 [D, B, H] or None, w_ih [D*G*H, I], w_hh [D, G*H, N],
    b_ih, b_hh [D*G*H] or None, w_hr [D, N, H] or None (N = H, or proj_size with w_hr).
    """

    def __init__(
        self, cell, plan, residual, dropout, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save: bool, lengths=None,
        forward_buffers: tuple[Tensor, Tensor, Tensor | None] | None = None,
    ):  # fmt: skip
        """forward_buffers: (hseq, saved, mseq) of an earlier forward of the same layer, to run its backward."""
        T, B, _ = x.shape
        _, gates, n_saved = CELLS[cell]
        D, _, width = w_hh.shape
        hidden = w_hh.shape[1] // gates
        dtype, device = x.dtype, x.device
        acc = _acc_dtype(dtype)
        self.cell, self.plan, self.dropout = cell, plan, dropout
        self.T, self.B, self.D, self.hidden, self.width, self.gates = T, B, D, hidden, width, gates
        self.dtype, self.device, self.acc = dtype, device, acc
        self.variant = _variant(D, residual, dropout, w_hr, lengths)
        # Sequence lengths [B] int32 for a batch of different lengths (none: every row runs all T steps; the kernels
        # read them only with lengths). The kernels read a seed with or without dropout, and use it only with dropout.
        # Values never used: allocated, not filled (a tensor kept for all calls instead could be made during the
        # warm-up run of torch.compile's CUDA graphs, whose memory pool that run's allocations come from).
        self.lengths = lengths if lengths is not None else torch.empty(1, dtype=torch.int32, device=device)
        self.no_seed = torch.empty(1, dtype=torch.int64, device=device) if dropout is None else None
        self.x, self.w_ih, self.w_hh, self.w_hr, self.b_ih, self.b_hh = x, w_ih, w_hh, w_hr, b_ih, b_hh
        # W_hh and W_hr transposed, for the forward kernel where it reads them so (weights_transposed)
        self.w_hh_t = self.w_hr_t = None
        self.c0 = c0
        if forward_buffers is not None:
            self.hseq, self.saved, self.mseq = forward_buffers
            self.save = n_saved > 0
            if not self.save:  # RNN cells save nothing; the kernels still take a pointer of this dtype
                self.saved = torch.zeros(1, dtype=dtype, device=device)
            return
        empty = _plan.empty_buffer  # looked up at the call: tests poison it
        self.xproj = empty(T, B, D * gates * hidden, dtype=dtype, device=device)
        self.hseq = empty(D, T + 1, B, width, dtype=dtype, device=device)
        self.hseq[0, 0] = h0[0]
        if D == 2:
            self.hseq[1, T] = h0[1]
        # LSTM carries c in full precision, GRU its h (the output sequence holds h rounded to dtype); the kernels
        # update it in place: one copy (and cast) of c0 or h0.
        self.state = (c0 if c0 is not None else h0).to(acc, copy=True)
        self.save = save and n_saved > 0
        # What backward needs, in the layer's dtype (kernels/recurrent.py: _cell_fwd); else a placeholder pointer.
        self.saved = empty(D, T, B, n_saved * hidden, dtype=dtype, device=device) if self.save else self.hseq
        self.y = empty(T, B, D * width, dtype=dtype, device=device) if self.variant.write_y else self.hseq[0, 1:]
        self.z = empty(T, B, D * width, dtype=dtype, device=device) if dropout is not None else None
        self.mseq = empty(D, T, B, hidden, dtype=dtype, device=device) if w_hr is not None else None
        self.ring = _tagged_ring(h0, dtype) if plan.tagged else None
        self.bias = None
        if b_ih is not None:
            self.bias = b_ih + b_hh
            if cell == "gru":
                # GRU's b_hn is multiplied by r: it stays in the kernel. Biases are [D*3*H]: (direction, gate, unit).
                self.bias.view(-1, 3, hidden)[:, 2] = b_ih.view(-1, 3, hidden)[:, 2]

    def _seed(self) -> dict:
        if self.dropout is None:
            return dict(seed_ptr=self.no_seed, p_drop=0.0)
        return dict(seed_ptr=self.dropout.seed, p_drop=self.dropout.p)

    def _launch(self, kernel, plan: LayerPlan, t0: int, t1: int, backward: bool, **launch) -> None:
        programs = plan.num_programs * plan.batch_groups * (self.D if plan.directions_together else 1)
        _plan.launched_or_stepwise(
            plan, programs, self.device, lambda run: self._launch_plan(kernel, run, t0, t1, backward, launch)
        )  # fmt: skip

    def _launch_plan(self, kernel, plan: LayerPlan, t0: int, t1: int, backward: bool, launch: dict) -> None:
        launch = sync_arguments(launch, plan)
        launch.update(_kernel_constants(self.cell, self.hidden, self.dtype, plan, self.variant, backward))
        launch.update(_launch_options(plan, self.device))
        if self.w_hr is not None and plan.batch_groups != 1:
            raise ValueError("the projection's kernels run the whole batch in one group")  # kernel_plan's rule
        for direction0, count in _direction_groups(plan, self.D):
            grid = (plan.num_programs, count, plan.batch_groups)
            # A persistent launch counts its barriers from zero, one counter per direction and batch group (one
            # launch per direction group; stepwise launches do not sync).
            counter = torch.zeros(self.D * plan.batch_groups, dtype=torch.int32, device=self.device)
            with on_device(self.device):
                for i, step in enumerate(_steps(plan, t0, t1, self.w_hr is not None, backward)):
                    if i and plan.persistent:
                        counter.zero_()  # a very long sequence's next launch (_plan.persistent_chunks)
                    launch_kernel(kernel, grid, self.device, direction0=direction0, counter=counter, **step, **launch)

    def forward_steps(self, t0: int, t1: int) -> None:
        rows = slice(t0 * self.B, t1 * self.B)
        x2d, out = self.x.reshape(self.T * self.B, -1)[rows], self.xproj.view(self.T * self.B, -1)[rows]
        if self.bias is None:
            torch.mm(x2d, self.w_ih.t(), out=out)
        else:
            torch.addmm(self.bias, x2d, self.w_ih.t(), out=out)
        launch = dict(
            xproj=self.xproj, w_hh=self.w_hh, hseq=self.hseq, state=self.state, saved=self.saved, y=self.y,
            res=self.x, z=self.z if self.z is not None else self.y, T=self.T, B=self.B, SAVE=self.save,
            WRITE_Y=self.variant.write_y, lengths=self.lengths, **self._seed(),
        )  # fmt: skip
        transposed = forward_transposed(self.cell, self.dtype, self.plan, self.hidden, self.variant.proj)
        if transposed and self.w_hh_t is None:  # one copy for all of a call's launches (a long sequence runs several)
            self.w_hh_t = self.w_hh.transpose(1, 2).contiguous()
            if self.w_hr is not None:
                self.w_hr_t = self.w_hr.transpose(1, 2).contiguous()
        if transposed:
            launch.update(w_hh=self.w_hh_t, W_T=True)
        if self.w_hr is not None:
            w_hr = self.w_hr_t if transposed else self.w_hr
            self._launch(lstm_proj_fwd_kernel, self.plan, t0, t1, False, w_hr=w_hr, mseq=self.mseq, **launch)
            return
        if self.ring is not None:
            launch.update(ring=self.ring, TAGGED=True)
        if self.cell != "gru":
            b_hn = self.w_hh  # the kernel reads D*H values of the layer's dtype, which other cells do not use
        elif self.b_hh is not None:
            b_hn = self.b_hh.view(self.D, 3, self.hidden)[:, 2].contiguous()
        else:
            b_hn = torch.zeros(self.D, self.hidden, dtype=self.dtype, device=self.device)
        self._launch(rnn_fwd_kernel, self.plan, t0, t1, False, b_hn=b_hn, HALVES=self.plan.held_halves, **launch)

    def end_forward(self) -> None:
        """Free what only the forward reads (the input projection: one value per gate, unit and step), so that a
        training step does not hold it until backward."""
        self.xproj = self.bias = self.w_hh_t = self.w_hr_t = None

    def outputs(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(y, z, h_n, c_n) once every step has run."""
        hseq, T = self.hseq, self.T
        h_n = torch.stack([hseq[0, T], hseq[1, 0]]) if self.D == 2 else hseq[0, T].unsqueeze(0).clone()
        c_n = self.state.to(self.dtype) if self.cell == "lstm" else None
        return self.y, self.z, h_n, c_n

    def detach_tensors(self, tensors: list[Tensor]) -> None:
        """Hold detached aliases of ``tensors`` (the outputs of an autograd Function that keeps this run) instead of
        the tensors themselves: same memory and version counter, no grad_fn back to the Function."""
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor) and any(value is t for t in tensors):
                setattr(self, name, value.detach())

    # What backward reads of the forward's tensors (backward_steps, grads; b_ih for whether there are biases).
    BACKWARD_READS = ("x", "c0", "w_ih", "w_hh", "w_hr", "b_ih", "b_hh", "lengths", "no_seed", "hseq", "saved", "mseq")

    def let_go(self) -> list[tuple[str, Tensor]]:
        """Drop every tensor this run holds; return those backward reads, by attribute name (to be autograd's saved
        tensors, freed after a backward that does not retain the graph). Not the outputs it does not read (c_n's
        state, the top layer's y): saved, they would make changing them in place an error."""
        kept = [(name, getattr(self, name)) for name in self.BACKWARD_READS if isinstance(getattr(self, name), Tensor)]
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(self, name, None)
        return kept

    def start_backward(
        self, grad_y: Tensor | None, grad_z: Tensor | None, grad_hn, grad_cn, needs: Needs = ALL_NEEDED
    ) -> None:  # fmt: skip
        """Gradient buffers; grad_y / grad_z [T, B, D*N] are read by rows as the chunks run (None: zeros).
        ``needs``: which gradients ``grads`` gives (the others are None): an input that wants none (a stack's data,
        frozen weights) costs no GEMM, and no dL/dx buffer where x wants none."""
        self.needs = needs
        T, B, D, dtype, device, acc = self.T, self.B, self.D, self.dtype, self.device, self.acc
        empty = _plan.empty_buffer  # looked up at the call: tests poison it

        def acc_state(grad: Tensor | None, size: int) -> Tensor:
            if grad is None:
                return torch.zeros(D, B, size, dtype=acc, device=device)
            return grad.to(acc).contiguous().clone()

        def output_grad(grad: Tensor | None) -> Tensor:
            if grad is None:
                return torch.zeros(T, B, D * self.width, dtype=dtype, device=device)
            return grad.contiguous()

        self.c0_acc = self.c0.to(acc) if self.c0 is not None else None  # LSTM's c before the first step
        self.grad_h = acc_state(grad_hn, self.width)
        self.grad_c = acc_state(grad_cn, self.hidden) if self.cell == "lstm" else self.grad_h
        self.grad_y = output_grad(grad_y)
        self.grad_z = output_grad(grad_z) if self.dropout is not None else self.grad_y
        self.grad_res = empty(T, B, D * self.width, dtype=dtype, device=device) if self.variant.residual else None
        self.grad_gates = empty(T, B, D * self.gates * self.hidden, dtype=dtype, device=device)
        if self.cell == "gru":
            self.grad_xn = empty(T, B, D * self.hidden, dtype=dtype, device=device)
            # The input part of n is not multiplied by r: its gradient differs from the recurrent one. Read by the
            # GEMMs of dL/dx and dL/dW_ih alone.
            self.grad_xgates = None
            if needs.x or needs.w_ih:
                self.grad_xgates = empty(T, B, D * self.gates * self.hidden, dtype=dtype, device=device)
        else:
            self.grad_xn = self.grad_xgates = self.grad_gates
        self.grad_hp = empty(T, B, D * self.width, dtype=dtype, device=device) if self.w_hr is not None else None
        # The tagged exchange's words (kernels/sync.py): zeros carry tag 0, which no step uses.
        tagged = self.plan.for_backward().tagged
        words = (D, 2, B, self.gates * self.hidden)
        self.grad_ring = torch.zeros(words, dtype=_ring_dtype(dtype), device=device) if tagged else None
        self.dx = empty(*self.x.shape, dtype=dtype, device=device) if needs.x else None

    def backward_steps(self, t0: int, t1: int) -> None:
        """Steps t1 - 1 down to t0, then dL/dx for rows [t0, t1) where x wants a gradient."""
        plan = self.plan.for_backward()
        launch = dict(
            w_hh=self.w_hh, saved=self.saved, c0=self.c0_acc if self.c0_acc is not None else self.grad_c,
            grad_y=self.grad_y, grad_z=self.grad_z,
            grad_res=self.grad_res if self.grad_res is not None else self.grad_y, grad_gates=self.grad_gates,
            grad_h=self.grad_h, grad_c=self.grad_c, lengths=self.lengths, T=self.T, B=self.B,
            **self._seed(),
        )  # fmt: skip
        if self.w_hr is not None:
            self._launch(lstm_proj_bwd_kernel, plan, t0, t1, True, w_hr=self.w_hr, grad_hp=self.grad_hp, **launch)
        else:
            if self.grad_ring is not None:
                launch.update(ring=self.grad_ring, TAGGED=True)
            self._launch(rnn_bwd_kernel, plan, t0, t1, True, hseq=self.hseq, grad_xn=self.grad_xn, **launch)
        if self.cell == "gru" and self.grad_xgates is not None:
            chunk = self.grad_xgates[t0:t1].view(t1 - t0, self.B, self.D, 3, self.hidden)
            chunk.copy_(self.grad_gates[t0:t1].view_as(chunk))
            chunk[..., 2, :] = self.grad_xn[t0:t1].view(t1 - t0, self.B, self.D, self.hidden)
        if self.dx is None:
            return
        rows = slice(t0 * self.B, t1 * self.B)
        gx2d = self.grad_xgates.view(self.T * self.B, -1)[rows]
        dx2d = self.dx.view(self.T * self.B, -1)[rows]
        if self.grad_res is not None:
            torch.addmm(self.grad_res.view(self.T * self.B, -1)[rows], gx2d, self.w_ih, out=dx2d)
        else:
            torch.mm(gx2d, self.w_ih, out=dx2d)

    def grads(self) -> tuple:
        """(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr) once every step has run backward; None where absent
        or not in ``needs``."""
        T, B, D, hidden, width, dtype, acc = self.T, self.B, self.D, self.hidden, self.width, self.dtype, self.acc
        needs = self.needs
        dh0 = self.grad_h.to(dtype) if needs.h0 else None
        dc0 = self.grad_c.to(dtype) if self.cell == "lstm" and needs.c0 else None
        dw_ih = self.grad_xgates.view(T * B, -1).t() @ self.x.reshape(T * B, -1) if needs.w_ih else None
        dw_hh = None
        if needs.w_hh:
            # Direction d's h_{t-1} in time order: hseq rows 0..T-1 (forward) or 1..T (reverse).
            gh = self.grad_gates.view(T * B, D, -1)
            dw_hh = _stacked([gh[:, d].t() @ self.hseq[d, d : d + T].reshape(T * B, width) for d in range(D)])
        db_ih = db_hh = None
        if self.b_ih is not None and (needs.b_ih or needs.b_hh):
            # Both biases reach every gate alike but GRU's n, whose recurrent part sits inside r * (...): one
            # reduction over all steps serves both, and for GRU one more over n's input part.
            db_hh = self.grad_gates.sum(dim=(0, 1), dtype=acc)
            db_ih = db_hh.clone()
            if self.cell == "gru":
                db_ih.view(D, 3, hidden)[:, 2] = self.grad_xn.sum(dim=(0, 1), dtype=acc).view(D, hidden)
            db_ih, db_hh = (db_ih.to(dtype) if needs.b_ih else None), (db_hh.to(dtype) if needs.b_hh else None)
        dw_hr = None
        if self.w_hr is not None and needs.w_hr:
            ghp = self.grad_hp.view(T * B, D, width)
            dw_hr = _stacked([ghp[:, d].t() @ self.mseq[d].reshape(T * B, hidden) for d in range(D)])
        return self.dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


def _stacked(per_direction: list[Tensor]) -> Tensor:
    """torch.stack, without its copy for one direction."""
    return per_direction[0].unsqueeze(0) if len(per_direction) == 1 else torch.stack(per_direction)


def _variant(
    directions: int, residual: bool, dropout: LayerDropout | None, w_hr: Tensor | None, lengths: Tensor | None = None
) -> Variant:
    mode = dropout.kernel_mode if dropout is not None else int(DROPOUT_NONE.value)
    return Variant(directions, residual, mode, w_hr.shape[1] if w_hr is not None else 0, lengths is not None)
