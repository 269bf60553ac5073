"""Functional API: recurrent stacks on plain tensors, and the autograd Function behind them.

Each layer runs as: the input projection of all steps and directions as one GEMM, one persistent
kernel launch for the recurrence of both directions (kernels/recurrent.py), which also writes the
residual sum and the dropped-out input of the next layer; in backward one persistent reverse-time
launch followed by GEMMs and reductions over all steps for the input and weight gradients.
Weights are plain tensors, so weight dropout or any other transform is applied by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from tritonrnn import autotune, reference, scheduler
from tritonrnn._plan import (
    CELLS,
    MIN_DOT,
    MIN_HELD_ROWS,
    LayerPlan,
    check_interpreter,
    cuda_index,
    forced,
    interpret_mode,
    log_once,
    next_pow2,
    plan_layer,
)
from tritonrnn.dropout import LayerDropout
from tritonrnn.kernels.dropout import DROPOUT_NONE
from tritonrnn.kernels.lstm_proj import lstm_proj_bwd_kernel, lstm_proj_fwd_kernel
from tritonrnn.kernels.recurrent import rnn_bwd_kernel, rnn_fwd_kernel


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels must fill comes from here (tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation precision: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Variant(NamedTuple):
    """What a layer's kernels do besides the recurrence (each choice compiles its own kernels)."""

    directions: int = 1
    residual: bool = False
    dropout_mode: int = int(DROPOUT_NONE.value)  # kernels/dropout.py's DROPOUT_*
    proj: int = 0  # LSTM proj_size (kernels/lstm_proj.py), 0 for none
    varlen: bool = False  # sequences of different lengths (a PackedSequence)

    @property
    def write_y(self) -> bool:
        # A unidirectional layer without residual has its output in hseq already, unless rows end early (their
        # output is zero there, while hseq carries their state).
        return self.directions > 1 or self.residual or self.varlen


def _kernel_constants(cell: str, hidden: int, dtype: torch.dtype, plan: LayerPlan, variant: Variant) -> dict:
    cell_id, gates, n_saved = CELLS[cell]
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
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
        # The projection's kernels hold every row of their slices (no streaming): BLOCK_KH covers H.
        return dict(
            common,
            P=variant.proj,
            BLOCK_KH=max(MIN_DOT, next_pow2(hidden)),
            BLOCK_KP=max(MIN_DOT, next_pow2(variant.proj)),
        )
    return dict(
        common, CELL=cell_id, G=gates, S=n_saved, BLOCK_K=plan.block_k, BLOCK_KS=plan.block_ks, VARLEN=variant.varlen
    )


def _launch_options(plan: LayerPlan, device: torch.device) -> dict:
    # A grid barrier deadlocks unless all programs are resident: ask the driver to guarantee it.
    if plan.persistent and device.type == "cuda":
        return dict(launch_cooperative_grid=True)
    if device.type == "cpu":
        check_interpreter()
    return {}


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

    def common(kernel_plan: LayerPlan) -> dict:
        grid = (kernel_plan.num_programs, _direction_groups(kernel_plan, variant.directions)[0][1])
        constants = _kernel_constants(cell, hidden, dtype, kernel_plan, variant)
        options = _launch_options(kernel_plan, device)
        return dict(counter=t(torch.int32), T=1, B=1, n_steps=1, direction0=0, seed_ptr=t(torch.int64), p_drop=0.5,
                    SYNC=kernel_plan.persistent, grid=grid, **constants, **options)  # fmt: skip

    forward_args = dict(xproj=t(), w_hh=t(), hseq=t(), state=t(acc), saved=t(acc), y=t(), res=t(), z=t(), t_start=0,
                        SAVE=True, WRITE_Y=variant.write_y, **common(plan))  # fmt: skip
    backward_args = dict(w_hh=t(), saved=t(acc), c0=t(acc), grad_y=t(), grad_z=t(), grad_res=t(), grad_gates=t(),
                         grad_h=t(acc), grad_c=t(acc), u_start=0, finish=1, **common(plan.for_backward()))  # fmt: skip
    if variant.proj:
        return [
            ("forward", lstm_proj_fwd_kernel, dict(w_hr=t(), mseq=t(), phases=3, **forward_args)),
            ("backward", lstm_proj_bwd_kernel, dict(w_hr=t(), grad_hp=t(), phases=3, **backward_args)),
        ]
    return [
        ("forward", rnn_fwd_kernel, dict(b_hn=t(), lengths=t(torch.int32), **forward_args)),
        ("backward", rnn_bwd_kernel, dict(hseq=t(), grad_xn=t(), lengths=t(torch.int32), **backward_args)),
    ]


@functools.cache
def _gpu_misfit(
    cell: str, hidden: int, dtype: torch.dtype, tf32: bool, plan: LayerPlan, variant: Variant, device_index: int
) -> str | None:
    """Compile both kernels for this GPU (no launch) and say why they cannot run there, or None.

    Triton decides where the resident weights live; the compiled kernel's shared memory is the fact.
    """
    max_shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    for name, kernel, kwargs in _warmup_calls(cell, hidden, dtype, plan, variant, torch.device("cuda", device_index)):
        compiled = kernel.warmup(**kwargs)
        if compiled.metadata.shared > max_shared:
            return (
                f"the {name} kernel needs {compiled.metadata.shared} bytes of shared memory, the GPU has {max_shared}"
            )
    return None


def _steps(plan: LayerPlan, t0: int, t1: int, two_phases: bool, backward: bool = False) -> list[dict]:
    """The launches running steps [t0, t1) of one direction group (backward: from t1 - 1 down to t0, then the
    carry into dL/dh0 when t0 == 0): all at once with the grid barrier, or one step (one phase) per launch."""
    phases = dict(phases=3) if two_phases else {}
    if plan.persistent:
        if backward:
            return [dict(u_start=t1 - 1, n_steps=t1 - t0, finish=int(t0 == 0), **phases)]
        return [dict(t_start=t0, n_steps=t1 - t0, **phases)]
    each = [dict(phases=1), dict(phases=2)] if two_phases else [{}]
    if backward:
        steps = [dict(u_start=u, n_steps=1, finish=0, **p) for u in range(t1 - 1, t0 - 1, -1) for p in each]
        return steps + ([dict(u_start=-1, n_steps=0, finish=1, **phases)] if t0 == 0 else [])
    return [dict(t_start=t, n_steps=1, **p) for t in range(t0, t1) for p in each]


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
        self, cell, plan, residual, dropout, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save: bool, lengths=None
    ):
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
        # Sequence lengths [B] int32 for a batch of different lengths (none: every row runs all T steps).
        self.lengths = lengths if lengths is not None else torch.zeros(1, dtype=torch.int32, device=device)
        # The kernels read a seed with or without dropout: this one is read and ignored.
        self.no_seed = torch.zeros(1, dtype=torch.int64, device=device) if dropout is None else None
        self.x, self.w_ih, self.w_hh, self.w_hr, self.b_ih, self.b_hh = x, w_ih, w_hh, w_hr, b_ih, b_hh
        self.xproj = _empty(T, B, D * gates * hidden, dtype=dtype, device=device)
        self.hseq = _empty(D, T + 1, B, width, dtype=dtype, device=device)
        self.hseq[0, 0] = h0[0]
        if D == 2:
            self.hseq[1, T] = h0[1]
        # LSTM carries c in full precision, GRU its h (the output sequence holds h rounded to dtype).
        self.c0_acc = c0.to(acc) if c0 is not None else None
        self.state = (self.c0_acc if c0 is not None else h0.to(acc)).clone()
        self.save = save and n_saved > 0
        self.saved = _empty(D, T, B, n_saved * hidden, dtype=acc, device=device) if self.save else self.state
        self.y = _empty(T, B, D * width, dtype=dtype, device=device) if self.variant.write_y else self.hseq[0, 1:]
        self.z = _empty(T, B, D * width, dtype=dtype, device=device) if dropout is not None else None
        self.mseq = _empty(D, T, B, hidden, dtype=dtype, device=device) if w_hr is not None else None
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
        launch.update(_kernel_constants(self.cell, self.hidden, self.dtype, plan, self.variant))
        launch.update(_launch_options(plan, self.device))
        for direction0, count in _direction_groups(plan, self.D):
            grid = (plan.num_programs, count)
            # A persistent launch counts its barriers from zero (one launch per group; stepwise ones do not sync).
            counter = torch.zeros(self.D, dtype=torch.int32, device=self.device)
            for step in _steps(plan, t0, t1, self.w_hr is not None, backward):
                kernel[grid](direction0=direction0, counter=counter, **step, **launch)

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
            SYNC=self.plan.persistent, WRITE_Y=self.variant.write_y, **self._seed(),
        )  # fmt: skip
        if self.w_hr is not None:
            self._launch(lstm_proj_fwd_kernel, self.plan, t0, t1, False, w_hr=self.w_hr, mseq=self.mseq, **launch)
            return
        launch["lengths"] = self.lengths
        if self.cell == "gru" and self.b_hh is not None:
            b_hn = self.b_hh.view(self.D, 3, self.hidden)[:, 2].contiguous()
        else:
            b_hn = torch.zeros(self.D, self.hidden, dtype=self.dtype, device=self.device)
        self._launch(rnn_fwd_kernel, self.plan, t0, t1, False, b_hn=b_hn, **launch)

    def end_forward(self) -> None:
        """Free what only the forward reads (the input projection: as large as the gate activations), so that a
        training step does not hold it until backward."""
        self.xproj = self.bias = None

    def outputs(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(y, z, h_n, c_n) once every step has run."""
        hseq, T = self.hseq, self.T
        h_n = torch.stack([hseq[0, T], hseq[1, 0]]) if self.D == 2 else hseq[0, T].unsqueeze(0).clone()
        c_n = self.state.to(self.dtype) if self.cell == "lstm" else None
        return self.y, self.z, h_n, c_n

    def start_backward(self, grad_y: Tensor | None, grad_z: Tensor | None, grad_hn, grad_cn) -> None:
        """Gradient buffers; grad_y / grad_z [T, B, D*N] are read by rows as the chunks run (None: zeros)."""
        T, B, D, dtype, device, acc = self.T, self.B, self.D, self.dtype, self.device, self.acc

        def acc_state(grad: Tensor | None, size: int) -> Tensor:
            if grad is None:
                return torch.zeros(D, B, size, dtype=acc, device=device)
            return grad.to(acc).contiguous().clone()

        def output_grad(grad: Tensor | None) -> Tensor:
            if grad is None:
                return torch.zeros(T, B, D * self.width, dtype=dtype, device=device)
            return grad.contiguous()

        self.grad_h = acc_state(grad_hn, self.width)
        self.grad_c = acc_state(grad_cn, self.hidden) if self.cell == "lstm" else self.grad_h
        self.grad_y = output_grad(grad_y)
        self.grad_z = output_grad(grad_z) if self.dropout is not None else self.grad_y
        self.grad_res = _empty(T, B, D * self.width, dtype=dtype, device=device) if self.variant.residual else None
        self.grad_gates = _empty(T, B, D * self.gates * self.hidden, dtype=dtype, device=device)
        if self.cell == "gru":
            self.grad_xn = _empty(T, B, D * self.hidden, dtype=dtype, device=device)
            # The input part of n is not multiplied by r: its gradient differs from the recurrent one.
            self.grad_xgates = _empty(T, B, D * self.gates * self.hidden, dtype=dtype, device=device)
        else:
            self.grad_xn = self.grad_xgates = self.grad_gates
        self.grad_hp = _empty(T, B, D * self.width, dtype=dtype, device=device) if self.w_hr is not None else None
        self.dx = _empty(*self.x.shape, dtype=dtype, device=device)

    def backward_steps(self, t0: int, t1: int) -> None:
        """Steps t1 - 1 down to t0, then dL/dx for rows [t0, t1)."""
        plan = self.plan.for_backward()
        launch = dict(
            w_hh=self.w_hh, saved=self.saved, c0=self.c0_acc if self.c0_acc is not None else self.grad_c,
            grad_y=self.grad_y, grad_z=self.grad_z,
            grad_res=self.grad_res if self.grad_res is not None else self.grad_y, grad_gates=self.grad_gates,
            grad_h=self.grad_h, grad_c=self.grad_c, T=self.T, B=self.B, SYNC=plan.persistent, **self._seed(),
        )  # fmt: skip
        if self.w_hr is not None:
            self._launch(lstm_proj_bwd_kernel, plan, t0, t1, True, w_hr=self.w_hr, grad_hp=self.grad_hp, **launch)
        else:
            self._launch(
                rnn_bwd_kernel, plan, t0, t1, True, hseq=self.hseq, grad_xn=self.grad_xn, lengths=self.lengths, **launch
            )  # fmt: skip
        if self.cell == "gru":
            chunk = self.grad_xgates[t0:t1].view(t1 - t0, self.B, self.D, 3, self.hidden)
            chunk.copy_(self.grad_gates[t0:t1].view_as(chunk))
            chunk[..., 2, :] = self.grad_xn[t0:t1].view(t1 - t0, self.B, self.D, self.hidden)
        rows = slice(t0 * self.B, t1 * self.B)
        gx2d = self.grad_xgates.view(self.T * self.B, -1)[rows]
        dx2d = self.dx.view(self.T * self.B, -1)[rows]
        if self.grad_res is not None:
            torch.addmm(self.grad_res.view(self.T * self.B, -1)[rows], gx2d, self.w_ih, out=dx2d)
        else:
            torch.mm(gx2d, self.w_ih, out=dx2d)

    def grads(self) -> tuple:
        """(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr) once every step has run backward."""
        T, B, D, hidden, width, dtype, acc = self.T, self.B, self.D, self.hidden, self.width, self.dtype, self.acc
        gx2d = self.grad_xgates.view(T * B, -1)
        dh0 = self.grad_h.to(dtype)
        dc0 = self.grad_c.to(dtype) if self.cell == "lstm" else None
        dw_ih = gx2d.t() @ self.x.reshape(T * B, -1)
        # Direction d's h_{t-1} in time order: hseq rows 0..T-1 (forward) or 1..T (reverse).
        gh = self.grad_gates.view(T * B, D, -1)
        dw_hh = torch.stack([gh[:, d].t() @ self.hseq[d, d : d + T].reshape(T * B, width) for d in range(D)])
        db_ih = db_hh = None
        if self.b_ih is not None:
            db_ih = self.grad_xgates.sum(dim=(0, 1), dtype=acc).to(dtype)
            db_hh = self.grad_gates.sum(dim=(0, 1), dtype=acc).to(dtype)
        dw_hr = None
        if self.w_hr is not None:
            ghp = self.grad_hp.view(T * B, D, width)
            dw_hr = torch.stack([ghp[:, d].t() @ self.mseq[d].reshape(T * B, hidden) for d in range(D)])
        return self.dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


class RecurrentLayerFunction(torch.autograd.Function):
    """One layer (all its directions) on the persistent kernels, all steps in one chunk. Time-major.

    forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, cell, plan, residual, dropout, lengths) with LayerRun's shapes
    returns (y [T, B, D*N] the layer output (+ x when residual), z [T, B, D*N] = dropout(y) or None,
    h_n [D, B, N], c_n [D, B, H] or None).
    """

    @staticmethod
    def forward(
        ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, cell: str, plan: LayerPlan, residual: bool, dropout, lengths
    ):
        save = any(ctx.needs_input_grad[:8])
        run = LayerRun(cell, plan, residual, dropout, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save, lengths)
        run.forward_steps(0, run.T)
        run.end_forward()
        if save:
            ctx.run = run
            # Saved through autograd too, so that modifying them in place before backward is an error.
            ctx.save_for_backward(x, w_ih, w_hh, w_hr)
        return run.outputs()

    @staticmethod
    def backward(ctx, grad_y, grad_z, grad_hn, grad_cn):
        ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place since forward
        run = ctx.run
        run.start_backward(grad_y, grad_z, grad_hn, grad_cn)
        run.backward_steps(0, run.T)
        return (*run.grads(), None, None, None, None, None)


def _variant(
    directions: int, residual: bool, dropout: LayerDropout | None, w_hr: Tensor | None, lengths: Tensor | None = None
) -> Variant:
    mode = dropout.kernel_mode if dropout is not None else int(DROPOUT_NONE.value)
    return Variant(directions, residual, mode, w_hr.shape[1] if w_hr is not None else 0, lengths is not None)


def kernel_plan(
    cell: str, hidden: int, batch: int, dtype: torch.dtype, device: torch.device, variant: Variant | None = None
) -> LayerPlan | str:
    """How the kernels run a layer on this device, or a string saying why they cannot.

    On a GPU: the autotuned configuration (tritonrnn/autotune.py) where tuning is on, else the heuristics;
    either way both kernels are compiled and checked against the GPU's shared memory before the first launch.
    """
    variant = variant or Variant()
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device type {device.type!r}"
    plan = plan_layer(cell, hidden, batch, dtype, device, variant.directions)
    if device.type == "cuda" and not isinstance(plan, str):
        # The TF32 flag changes the compiled dot, so it is part of the cache key.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        if not forced():
            key = autotune.TuneKey(
                cell, hidden, autotune.batch_bucket(batch), _DTYPE_NAMES[dtype], variant.directions, variant.proj
            )  # fmt: skip
            tuned = autotune.tuned_plan(key, device, lambda: _gpu_tuner(cell, hidden, batch, dtype, device, variant))
            plan = tuned or plan
        while True:
            reason = _gpu_misfit(cell, hidden, dtype, tf32, plan, variant, cuda_index(device))
            # Over shared memory: hold fewer rows of the slice and read the rest every step (not with a projection,
            # whose kernels hold all rows; not under a forced plan).
            if reason is None or variant.proj or forced() or plan.block_k // 2 < MIN_HELD_ROWS:
                return reason or plan
            plan = _halve_held_rows(plan)
    return plan


def _halve_held_rows(plan: LayerPlan) -> LayerPlan:
    backward = dataclasses.replace(plan.backward, block_k=plan.backward.block_k // 2) if plan.backward else None
    return dataclasses.replace(plan, block_k=plan.block_k // 2, backward=backward)


_DTYPE_NAMES = {dtype: name for name, dtype in autotune.DTYPES.items()}


def _gpu_tuner(cell: str, hidden: int, batch: int, dtype: torch.dtype, device: torch.device, variant: Variant):
    """An autotune.Tuner timing this layer's kernels on a random problem of autotune.TUNE_STEPS steps."""
    import triton.testing

    _, gates, _ = CELLS[cell]
    D, width = variant.directions, variant.proj or hidden
    T = autotune.TUNE_STEPS
    tf32 = torch.backends.cuda.matmul.allow_tf32

    def rand(*shape: int) -> Tensor:
        return (torch.randn(*shape, device=device) * hidden**-0.5).to(dtype)

    x = rand(T, batch, hidden)
    h0 = rand(D, batch, width)
    c0 = rand(D, batch, hidden) if cell == "lstm" else None
    w_ih, w_hh, bias = rand(D * gates * hidden, hidden), rand(D, gates * hidden, width), rand(D * gates * hidden)
    w_hr = rand(D, variant.proj, hidden) if variant.proj else None

    def run(plan: LayerPlan, requires_grad: bool):
        inputs = [t.detach().requires_grad_(requires_grad) if t is not None else None for t in (x, w_hh)]
        y, _, _, _ = RecurrentLayerFunction.apply(
            inputs[0], h0, c0, w_ih, inputs[1], bias, bias, w_hr, cell, plan, False, None, None
        )  # fmt: skip
        if requires_grad:
            torch.autograd.grad(y, inputs, torch.ones_like(y))

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")

    return autotune.Tuner(
        misfit=lambda plan: _gpu_misfit(cell, hidden, dtype, tf32, plan, variant, cuda_index(device)),
        time_forward=lambda plan: bench(lambda: run(plan, False)),
        time_backward=lambda fwd, bwd: bench(lambda: run(dataclasses.replace(fwd, backward=bwd), True)),
    )


def _layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    weights: Sequence[reference.Weights],
    residual: bool = False,
    dropout: LayerDropout | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """One layer on the kernels, or on the reference where they cannot run it (``reference.layer``'s contract)."""
    if x.device.type == "cpu" and not interpret_mode():
        return reference.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
    D = len(weights)
    hidden = weights[0][1].shape[0] // CELLS[cell][1]
    w_hr = [w[4] if len(w) > 4 else None for w in weights]
    variant = _variant(D, residual, dropout, w_hr[0], lengths)
    if lengths is not None and variant.proj:
        plan = "sequences of different lengths with proj_size"
    else:
        plan = kernel_plan(cell, hidden, x.shape[1], x.dtype, x.device, variant)
    if isinstance(plan, str):
        log_once(
            f"tritonrnn: {cell} layer with hidden_size={hidden}, {x.dtype}, on {x.device.type}: {plan}; "
            "running the PyTorch reference implementation instead (correct, much slower)"
        )
        return reference.layer(cell, x, h0, c0, weights, residual, dropout, lengths)
    w_ih, w_hh, b_ih, b_hh = (list(t) for t in zip(*(w[:4] for w in weights)))
    if D == 1:
        # No copies for one direction: views of the caller's tensors.
        w_ih, w_hh, b_ih, b_hh, w_hr = w_ih[0], w_hh[0].unsqueeze(0), b_ih[0], b_hh[0], w_hr[0]
        w_hr = w_hr.unsqueeze(0) if w_hr is not None else None
    else:
        w_ih, w_hh = torch.cat(w_ih), torch.stack(w_hh)
        b_ih = torch.cat(b_ih) if b_ih[0] is not None else None
        b_hh = torch.cat(b_hh) if b_hh[0] is not None else None
        w_hr = torch.stack(w_hr) if w_hr[0] is not None else None
    return RecurrentLayerFunction.apply(
        x.contiguous(), h0.contiguous(), c0.contiguous() if c0 is not None else None, w_ih.contiguous(),
        w_hh.contiguous(), b_ih, b_hh, w_hr.contiguous() if w_hr is not None else None, cell, plan, residual, dropout,
        lengths,
    )  # fmt: skip


class WavefrontStackFunction(torch.autograd.Function):
    """A unidirectional stack whose layers overlap in time: layer l + 1 runs chunk k while layer l runs chunk k + 1.

    Each layer runs on its own CUDA stream; an event per (layer, chunk) orders a chunk after the chunk below
    it (forward) or above it (backward). Without CUDA (the interpreter) the same order runs sequentially.
    forward(layers: list of (cell, plan, residual, dropout), chunk, lengths (or None), x, then per layer h0, c0,
    w_ih, w_hh, b_ih, b_hh, w_hr with LayerRun's shapes) returns every layer's y, then every h_n, then every c_n.
    """

    @staticmethod
    def forward(ctx, layers, chunk: int, lengths, x, *tensors):
        save = any(ctx.needs_input_grad)
        runs: list[LayerRun] = []
        inputs = x
        for index, (cell, plan, residual, dropout) in enumerate(layers):
            h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = tensors[7 * index : 7 * index + 7]
            run = LayerRun(cell, plan, residual, dropout, inputs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save, lengths)
            runs.append(run)
            inputs = run.z if run.z is not None else run.y
        chunks = [(t0, min(t0 + chunk, x.shape[0])) for t0 in range(0, x.shape[0], chunk)]
        _wavefront(runs, chunks, lambda run, t0, t1: run.forward_steps(t0, t1), reverse=False)
        for run in runs:
            run.end_forward()  # after _wavefront: the main stream has waited for the layers' streams
        if save:
            ctx.runs = runs
            ctx.chunks = chunks
            ctx.save_for_backward(x, *tensors)
        outputs = [run.outputs() for run in runs]
        return (*[o[0] for o in outputs], *[o[2] for o in outputs], *[o[3] for o in outputs])

    @staticmethod
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place since forward
        runs, chunks = ctx.runs, ctx.chunks
        L = len(runs)
        grad_ys, grad_hns, grad_cns = grads[:L], grads[L : 2 * L], grads[2 * L :]
        add_from_above = [False] * L
        for index in range(L - 1, -1, -1):
            run, grad_y, grad_z = runs[index], grad_ys[index], None
            if index < L - 1:
                above = runs[index + 1].dx  # dL/d(this layer's contribution to the next layer's input), by chunks
                if run.dropout is not None:
                    grad_z = above
                elif grad_y is None:
                    grad_y = above
                else:
                    grad_y = grad_y.clone()
                    add_from_above[index] = True
            run.start_backward(grad_y, grad_z, grad_hns[index], grad_cns[index])

        def step(run: LayerRun, t0: int, t1: int) -> None:
            index = runs.index(run)
            if add_from_above[index]:
                run.grad_y[t0:t1] += runs[index + 1].dx[t0:t1]
            run.backward_steps(t0, t1)

        _wavefront(runs, chunks, step, reverse=True)
        result: list[Tensor | None] = [None, None, None, runs[0].grads()[0]]
        for run in runs:
            _, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = run.grads()
            result += [dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr]
        return tuple(result)


def _wavefront(runs: list[LayerRun], chunks: list[tuple[int, int]], step, reverse: bool) -> None:
    """Run step(run, t0, t1) for every layer and chunk, each chunk after the same chunk of the layer before
    (below in forward, above in backward), layers on their own streams where there is CUDA."""
    order = list(range(len(runs)))
    chunk_order = list(range(len(chunks)))
    if reverse:
        order.reverse()
        chunk_order.reverse()
    if runs[0].device.type != "cuda":
        for k in chunk_order:
            for index in order:
                step(runs[index], *chunks[k])
        return
    main = torch.cuda.current_stream(runs[0].device)
    streams = {index: torch.cuda.Stream(runs[0].device) for index in order}
    events = {(index, k): torch.cuda.Event() for index in order for k in chunk_order}
    for stream in streams.values():
        stream.wait_stream(main)
    for k in chunk_order:
        for position, index in enumerate(order):
            with torch.cuda.stream(streams[index]):
                if position > 0:
                    streams[index].wait_event(events[order[position - 1], k])
                step(runs[index], *chunks[k])
                events[index, k].record(streams[index])
    for stream in streams.values():
        main.wait_stream(stream)


def wavefront_chunk() -> int:
    """Steps per chunk of the layer wavefront (``TRITONRNN_WAVEFRONT``: 0 or unset off, 1 on with 64-step chunks,
    N > 1 on with N-step chunks). Off by default until measured on the GPU (perf/NOTES.md)."""
    value = os.environ.get("TRITONRNN_WAVEFRONT", "0").strip() or "0"
    if not value.isdigit():
        raise ValueError(f"TRITONRNN_WAVEFRONT should be 0, 1 or a number of steps per chunk, got {value!r}")
    number = int(value)
    return 64 if number == 1 else number


def _wavefront_stack(x, layers, h0, c0, residual, lengths, dropouts):
    """The stack through WavefrontStackFunction, or None where it does not apply (then layer by layer)."""
    chunk = wavefront_chunk()
    if not chunk or len(layers) < 2 or x.shape[0] <= chunk or any(len(layer.weights) != 1 for layer in layers):
        return None
    if lengths is not None and any(len(layer.weights[0]) > 4 for layer in layers):
        return None  # the projection's kernels take no lengths
    if x.device.type == "cpu" and not interpret_mode():
        return None
    specs, tensors = [], []
    for layer, drop, h, c in zip(layers, dropouts, h0, c0):
        w_ih, w_hh, b_ih, b_hh, *rest = layer.weights[0]
        hidden = w_hh.shape[0] // CELLS[layer.cell][1]
        w_hr = rest[0].unsqueeze(0).contiguous() if rest else None
        variant = _variant(1, residual, drop, w_hr, lengths)
        plan = kernel_plan(layer.cell, hidden, x.shape[1], x.dtype, x.device, variant)
        if isinstance(plan, str):
            return None
        specs.append((layer.cell, plan, residual, drop))
        tensors += [h.contiguous(), c.contiguous() if c is not None else None, w_ih.contiguous(),
                    w_hh.unsqueeze(0).contiguous(), b_ih, b_hh, w_hr]  # fmt: skip
    outputs = WavefrontStackFunction.apply(specs, chunk, lengths, x.contiguous(), *tensors)
    L = len(layers)
    return list(outputs[:L]), list(outputs[L : 2 * L]), list(outputs[2 * L :])


@torch.compiler.disable  # Dynamo cannot trace the persistent launches: a graph break, the kernels as they are
def stack(
    x: Tensor,
    layers: Sequence[scheduler.StackLayer],
    h0: Sequence[Tensor],
    c0: Sequence[Tensor | None],
    *,
    dropout: float = 0.0,
    dropout_mode: str = "standard",
    residual: bool = False,
    training: bool = False,
    lengths: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
    """A stack of layers (any cells, one or two directions) on the kernels, on plain tensors.

    No validation (the modules do it). Arguments and returns are ``scheduler.run_stack``'s:
    x [T, B, I] time-major; h0[l], c0[l] [D, B, H_l] (c0[l] None for non-LSTM layers);
    layers[l] = StackLayer(cell, ((w_ih, w_hh, b_ih, b_hh[, w_hr]), ...)) in torch.nn's layout and gate order
    (w_hr: an LSTM's projection, torch.nn's weight_hr; h is then proj_size wide).
    lengths: [B] int32 on x's device, each sequence's length (<= T), for a batch of different lengths: rows
    keep their state past their end (so h_n is each sequence's last state) and output zeros there.
    Returns (every layer's output [T, B, D*H_l], h_n per layer, c_n per layer).
    """
    # Drawn once, whichever path runs: the same seeds with and without the wavefront.
    dropouts = scheduler.layer_dropouts(len(layers), dropout, dropout_mode, training, x.device)
    result = _wavefront_stack(x, layers, h0, c0, residual, lengths, dropouts)
    if result is not None:
        return result
    return scheduler.run_stack(
        x, layers, h0, c0, residual=residual, lengths=lengths, dropouts=dropouts, layer_fn=_layer
    )  # fmt: skip
