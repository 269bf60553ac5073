"""Functional API: recurrent stacks on plain tensors, and the autograd Function behind them.

Each layer runs as: the input projection for all steps as one GEMM, one persistent kernel launch for
the recurrence (kernels/recurrent.py), and in backward one persistent reverse-time launch followed
by GEMMs and reductions over all steps for the input and weight gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from tritonrnn import reference
from tritonrnn._plan import CELLS, LayerPlan, cuda_index, interpret_mode, log_once, plan_layer
from tritonrnn.kernels.recurrent import rnn_bwd_kernel, rnn_fwd_kernel

LayerWeights = tuple[Tensor, Tensor, "Tensor | None", "Tensor | None"]


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels must fill comes from here (tests poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """State and accumulation precision: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_constants(cell: str, hidden: int, dtype: torch.dtype, plan: LayerPlan) -> dict:
    cell_id, gates, n_saved = CELLS[cell]
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(
        H=hidden,
        CELL=cell_id,
        G=gates,
        S=n_saved,
        BLOCK_H=plan.block_h,
        BLOCK_B=plan.block_b,
        BLOCK_K=plan.block_k,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        DOT_PRECISION="tf32" if tf32 else "ieee",
        DOT_UPCAST=dtype == torch.bfloat16 and interpret_mode(),
        num_warps=plan.num_warps,
    )


def _launch_options(plan: LayerPlan, device: torch.device) -> dict:
    # A grid barrier deadlocks unless all programs are resident: ask the driver to guarantee it.
    if plan.persistent and device.type == "cuda":
        return dict(launch_cooperative_grid=True)
    return {}


@functools.cache
def _gpu_misfit(
    cell: str, hidden: int, dtype: torch.dtype, tf32: bool, plan: LayerPlan, device_index: int
) -> str | None:
    """Compile both kernels for this GPU (no launch) and say why they cannot run there, or None.

    Triton decides where the resident weights live; the compiled kernel's shared memory is the fact.
    """
    device = torch.device("cuda", device_index)
    acc = _acc_dtype(dtype)
    constants = _kernel_constants(cell, hidden, dtype, plan)
    options = _launch_options(plan, device)

    def t(dt=dtype):
        return torch.empty(16, dtype=dt, device=device)

    counter = t(torch.int32)
    forward = rnn_fwd_kernel.warmup(
        xproj=t(), w_hh=t(), b_hn=t(), hseq=t(), state=t(acc), saved=t(acc), counter=counter, B=1, t_start=0,
        n_steps=1, SAVE=True, SYNC=plan.persistent, grid=(plan.num_programs,), **constants, **options,
    )  # fmt: skip
    backward = rnn_bwd_kernel.warmup(
        w_hh=t(), hseq=t(), saved=t(acc), c0=t(acc), grad_out=t(), grad_gates=t(), grad_xn=t(), grad_h=t(acc),
        grad_c=t(acc), counter=counter, T=1, B=1, t_start=0, n_steps=1, finish=1, SYNC=plan.persistent,
        grid=(plan.num_programs,), **constants, **options,
    )  # fmt: skip
    max_shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    for name, kernel in (("forward", forward), ("backward", backward)):
        if kernel.metadata.shared > max_shared:
            return f"the {name} kernel needs {kernel.metadata.shared} bytes of shared memory, the GPU has {max_shared}"
    return None


def _input_projection(cell: str, x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """x @ W_ih^T plus every bias that can be added before the recurrence, as one GEMM: [T, B, G*H]."""
    T, B, _ = x.shape
    x2d = x.reshape(T * B, -1)
    if b_ih is None:
        return (x2d @ w_ih.t()).view(T, B, -1)
    bias = b_ih
    if b_hh is not None:
        if cell == "gru":
            # GRU's b_hn is multiplied by r: it stays in the kernel.
            hidden = w_ih.shape[0] // 3
            bias = b_ih + torch.cat([b_hh[: 2 * hidden], b_hh.new_zeros(hidden)])
        else:
            bias = b_ih + b_hh
    return torch.addmm(bias, x2d, w_ih.t()).view(T, B, -1)


class RecurrentLayerFunction(torch.autograd.Function):
    """One unidirectional layer on the persistent kernels. Inputs and outputs are time-major."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell: str, plan: LayerPlan):
        T, B, _ = x.shape
        hidden = w_hh.shape[1]
        dtype, device = x.dtype, x.device
        acc = _acc_dtype(dtype)
        _, _, n_saved = CELLS[cell]
        xproj = _input_projection(cell, x, w_ih, b_ih, b_hh)
        if cell == "gru" and b_hh is not None:
            b_hn = b_hh[2 * hidden :].contiguous()
        else:
            b_hn = torch.zeros(hidden, dtype=dtype, device=device)
        hseq = _empty(T + 1, B, hidden, dtype=dtype, device=device)
        hseq[0] = h0
        # LSTM carries c in full precision, GRU its h (the output sequence holds h rounded to dtype).
        c0_acc = c0.to(acc) if c0 is not None else None
        state = (c0_acc if c0 is not None else h0.to(acc)).clone()
        save = any(ctx.needs_input_grad[:7])
        saved = _empty(T, B, n_saved * hidden, dtype=acc, device=device) if save and n_saved else state
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        launch = dict(
            xproj=xproj, w_hh=w_hh, b_hn=b_hn, hseq=hseq, state=state, saved=saved, counter=counter, B=B,
            SAVE=save and n_saved > 0, SYNC=plan.persistent,
            **_kernel_constants(cell, hidden, dtype, plan), **_launch_options(plan, device),
        )  # fmt: skip
        grid = (plan.num_programs,)
        if plan.persistent:
            rnn_fwd_kernel[grid](t_start=0, n_steps=T, **launch)
        else:
            for t in range(T):
                rnn_fwd_kernel[grid](t_start=t, n_steps=1, **launch)
        ctx.cell, ctx.plan = cell, plan
        ctx.has_bias = b_ih is not None
        if save:
            ctx.save_for_backward(x, c0_acc, w_ih, w_hh, hseq, saved)
        c_n = state.to(dtype) if cell == "lstm" else None
        return hseq[1:], hseq[T].clone(), c_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn):
        x, c0_acc, w_ih, w_hh, hseq, saved = ctx.saved_tensors
        cell, plan = ctx.cell, ctx.plan
        T, B, _ = x.shape
        hidden = w_hh.shape[1]
        dtype, device = x.dtype, x.device
        acc = _acc_dtype(dtype)
        _, gates, _ = CELLS[cell]

        def acc_state(grad: Tensor | None) -> Tensor:
            if grad is None:
                return torch.zeros(B, hidden, dtype=acc, device=device)
            return grad.to(acc).contiguous().clone()

        grad_h = acc_state(grad_hn)
        grad_c = acc_state(grad_cn) if cell == "lstm" else grad_h
        grad_out = grad_out.contiguous() if grad_out is not None else torch.zeros_like(hseq[1:])
        grad_gates = _empty(T, B, gates * hidden, dtype=dtype, device=device)
        grad_xn = _empty(T, B, hidden, dtype=dtype, device=device) if cell == "gru" else grad_gates
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        launch = dict(
            w_hh=w_hh, hseq=hseq, saved=saved, c0=c0_acc if c0_acc is not None else grad_h, grad_out=grad_out,
            grad_gates=grad_gates, grad_xn=grad_xn, grad_h=grad_h, grad_c=grad_c, counter=counter, T=T, B=B,
            SYNC=plan.persistent, **_kernel_constants(cell, hidden, dtype, plan), **_launch_options(plan, device),
        )  # fmt: skip
        grid = (plan.num_programs,)
        if plan.persistent:
            rnn_bwd_kernel[grid](t_start=T - 1, n_steps=T, finish=1, **launch)
        else:
            for t in range(T - 1, -1, -1):
                rnn_bwd_kernel[grid](t_start=t, n_steps=1, finish=0, **launch)
            rnn_bwd_kernel[grid](t_start=-1, n_steps=0, finish=1, **launch)

        if cell == "gru":
            # The input part of n is not multiplied by r: its gradient differs from the recurrent one.
            grad_xgates = torch.cat([grad_gates[..., : 2 * hidden], grad_xn], dim=-1)
        else:
            grad_xgates = grad_gates
        gx2d = grad_xgates.view(T * B, -1)
        gh2d = grad_gates.view(T * B, -1)
        needs = ctx.needs_input_grad
        dx = (gx2d @ w_ih).view(x.shape) if needs[0] else None
        dh0 = grad_h.to(dtype) if needs[1] else None
        dc0 = grad_c.to(dtype) if cell == "lstm" and needs[2] else None
        dw_ih = gx2d.t() @ x.reshape(T * B, -1) if needs[3] else None
        dw_hh = gh2d.t() @ hseq[:-1].reshape(T * B, hidden) if needs[4] else None
        db_ih = grad_xgates.sum(dim=(0, 1), dtype=acc).to(dtype) if ctx.has_bias and needs[5] else None
        db_hh = grad_gates.sum(dim=(0, 1), dtype=acc).to(dtype) if ctx.has_bias and needs[6] else None
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None


def kernel_plan(cell: str, hidden: int, batch: int, dtype: torch.dtype, device: torch.device) -> LayerPlan | str:
    """How the kernels run a layer on this device, or a string saying why they cannot."""
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device type {device.type!r}"
    plan = plan_layer(cell, hidden, batch, dtype, device)
    if device.type == "cuda" and not isinstance(plan, str):
        # The TF32 flag changes the compiled dot, so it is part of the cache key.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return _gpu_misfit(cell, hidden, dtype, tf32, plan, cuda_index(device)) or plan
    return plan


def _layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer on the kernels, or on the reference where they cannot run it."""
    if x.device.type == "cpu" and not interpret_mode():
        return reference.layer_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    plan = kernel_plan(cell, w_hh.shape[1], x.shape[1], x.dtype, x.device)
    if isinstance(plan, str):
        log_once(
            f"tritonrnn: {cell} layer with hidden_size={w_hh.shape[1]}, {x.dtype}, on {x.device.type}: {plan}; "
            "running the PyTorch reference implementation instead (correct, much slower)"
        )
        return reference.layer_forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return RecurrentLayerFunction.apply(
        x.contiguous(), h0.contiguous(), c0.contiguous() if c0 is not None else None,
        w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh, cell, plan,
    )  # fmt: skip


def rnn(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, layers: Sequence[LayerWeights]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A unidirectional stack of one cell type, on plain tensors (no validation: the modules do it).

    Args:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        x: [T, B, I] time-major input.
        h0: [L, B, H] initial hidden states; c0: [L, B, H] initial cell states for LSTM, else None.
        layers: L tuples (w_ih [G*H, I_l], w_hh [G*H, H], b_ih [G*H] or None, b_hh [G*H] or None),
            torch.nn's layout and gate order.

    Returns:
        (output [T, B, H] of the top layer, h_n [L, B, H], c_n [L, B, H] or None).
    """
    return reference.stack_forward(cell, x, h0, c0, layers, layer_fn=_layer)
