"""A stack of equal layers in one persistent launch (kernels/stack.py): the layer wavefront inside the kernel
(``TRITONRNN_WAVEFRONT=fused``; off by default until measured on a GPU, perf/NOTES.md).

Equal layers: the same cell and hidden size, one direction, no projection, no residual, all sequences of the
same length. Other stacks run layer by layer (or on streams); a stack asked to fuse that cannot says why, once.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from tritonrnn import _plan
from tritonrnn._capture import launch as launch_kernel
from tritonrnn._plan import (
    CELLS,
    LayerPlan,
    cuda_index,
    fixed_tf32,
    interpret_mode,
    log_once,
    on_device,
    plan_stack,
    refuse_batched_gradients,
    refuse_double_backward,
    tf32_matmul,
    unpack_saved,
    with_exchange,
)
from tritonrnn.dropout import LayerDropout
from tritonrnn.kernels.dropout import DROPOUT_NONE
from tritonrnn.kernels.stack import stack_bwd_kernel, stack_fwd_kernel
from tritonrnn.layer_run import (
    Variant,
    _acc_dtype,
    _kernel_constants,
    _launch_options,
    _ring_dtype,
    _tagged_ring,
    compile_misfit,
    sync_arguments,
    weights_transposed,
)


def _constants(cell: str, hidden: int, dtype: torch.dtype, plan: LayerPlan, dropout_mode: int) -> dict:
    constants = _kernel_constants(cell, hidden, dtype, plan, Variant(dropout_mode=dropout_mode))
    for single_layer_only in ("D", "RESIDUAL", "VARLEN"):
        del constants[single_layer_only]
    return constants


def _folded_bias(cell: str, b_ih: Tensor, b_hh: Tensor, hidden: int) -> Tensor:
    """b_ih + b_hh, except GRU's n gate, whose b_hh sits inside r * (...): b_ih alone there."""
    bias = b_ih + b_hh
    if cell == "gru":
        bias[2 * hidden :] = b_ih[2 * hidden :]
    return bias


def _warmup_calls(
    cell: str, hidden: int, n_layers: int, dtype: torch.dtype, plan: LayerPlan, dropout_mode: int, device: torch.device
) -> list[tuple[str, object, dict]]:
    """(name, kernel, keyword arguments) that compile both stack kernels without a launch (placeholder tensors).
    The backward as a loss on the top layer's output launches it (ALL_LAYERS=False); with every layer's output in the
    loss it reads more rows of grad_y, and compiles at its first launch."""
    acc = _acc_dtype(dtype)

    def t(dt=dtype):
        return torch.empty(16, dtype=dt, device=device)

    common = dict(counter=t(torch.int32), seed_ptr=t(torch.int64), T=1, B=1, s_start=0, n_steps=1, p_drop=0.5,
                  w_ih=t(), w_hh=t(), hseq=t(), saved=t(), SYNC=plan.persistent, grid=(plan.num_programs, n_layers),
                  **_constants(cell, hidden, dtype, plan, dropout_mode), **_launch_options(plan, device))  # fmt: skip
    common.update(ring=t(_ring_dtype(dtype)) if plan.tagged else None, TAGGED=plan.tagged)
    return [
        ("forward", stack_fwd_kernel, dict(xproj=t(), bias=t(), b_hn=t(), state=t(acc), z=t(), SAVE=True,
                                           W_T=weights_transposed(cell, dtype, plan.k_split), **common)),
        ("backward", stack_bwd_kernel, dict(c0=t(acc), grad_y=t(), grad_above=t(acc), grad_gates=t(), grad_xgates=t(),
                                            grad_h=t(acc), grad_c=t(acc), finish=1, ALL_LAYERS=False, **common)),
    ]  # fmt: skip


@functools.cache
def _gpu_misfit(
    cell: str, hidden: int, n_layers: int, dtype: torch.dtype, tf32: bool, plan: LayerPlan, dropout_mode: int,
    device_index: int,
) -> str | None:  # fmt: skip
    """Compile both stack kernels for this GPU (no launch) and say why they cannot run there, or None."""
    device = torch.device("cuda", device_index)
    return compile_misfit(_warmup_calls(cell, hidden, n_layers, dtype, plan, dropout_mode, device), device_index,
                          "stack ")  # fmt: skip


def fused_plan(
    cells: list[str], hidden_sizes: list[int], batch: int, dtype: torch.dtype, device: torch.device, dropout_mode: int
) -> LayerPlan | str:
    """The stack kernel's plan for these layers, or why it cannot run them."""
    if len(set(cells)) > 1 or len(set(hidden_sizes)) > 1:
        return "its layers differ in cell or hidden size"
    if device.type == "cpu" and not interpret_mode():
        return "no Triton interpreter on the CPU"
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device type {device.type!r}"
    plan = plan_stack(cells[0], hidden_sizes[0], len(cells), batch, dtype, device)
    if not isinstance(plan, str):
        plan = with_exchange(plan, hidden_sizes[0], dtype, 0)
        if plan.tagged and plan.num_programs == 1:
            # No grid barrier and one program a layer: the interpreter runs the layers in one launch too (each
            # waits only for its neighbour, which runs first in program order).
            plan = dataclasses.replace(plan, persistent=True)
    if device.type == "cuda" and not isinstance(plan, str):
        tf32 = tf32_matmul()
        candidates = []
        for exchange in [plan, dataclasses.replace(plan, tagged=False)] if plan.tagged else [plan]:
            candidates.append(exchange)
            if exchange.num_stages > 1:
                # One pipeline stage can fit where three do not (_plan.smaller_plan).
                candidates.append(dataclasses.replace(exchange, num_stages=1))
        for candidate in candidates:  # the tagged kernels first where asked for; the barrier's if they do not fit
            reason = _gpu_misfit(
                cells[0], hidden_sizes[0], len(cells), dtype, tf32, candidate, dropout_mode, cuda_index(device)
            )  # fmt: skip
            if reason is None:
                return candidate
        return reason
    return plan


def fused_stack(
    x: Tensor, layers, h0: list[Tensor], c0: list[Tensor | None], residual: bool, lengths: Tensor | None,
    dropouts: list[LayerDropout | None],
) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]] | None:  # fmt: skip
    """The stack through FusedStackFunction, or None where the stack kernel cannot run it (logged once)."""
    if len(layers) < 2 or (x.device.type == "cpu" and not interpret_mode()):
        return None  # one layer: the single-layer kernels are the same loop; CPU tensors: torch's CPU op, by design
    cells = [layer.cell for layer in layers]
    hidden = [layer.weights[0][1].shape[0] // CELLS[layer.cell][1] for layer in layers]
    reason = None
    if any(len(layer.weights) != 1 for layer in layers):
        reason = "it is bidirectional"
    elif any(len(layer.weights[0]) > 4 for layer in layers):
        reason = "it has a projection (proj_size)"
    elif len({layer.weights[0][2] is None for layer in layers}) > 1:
        reason = "some of its layers have biases and some not"  # one bias flag for the whole stack kernel
    elif residual:
        reason = "it has residual connections"
    elif lengths is not None:
        reason = "its sequences differ in length"
    drop = next((d for d in dropouts if d is not None), None)
    mode = drop.kernel_mode if drop is not None else int(DROPOUT_NONE.value)
    plan = reason or fused_plan(cells, hidden, x.shape[1], x.dtype, x.device, mode)
    if isinstance(plan, str):
        log_once(f"tritonrnn: TRITONRNN_WAVEFRONT=fused: a stack of {cells} layers of hidden sizes {hidden} runs "
                 f"layer by layer: {plan}")  # fmt: skip
        return None
    tensors = []
    for layer, h, c in zip(layers, h0, c0):
        tensors += [h.contiguous(), c.contiguous() if c is not None else None, *layer.weights[0]]
    outputs = FusedStackFunction.apply(cells[0], plan, dropouts, x.contiguous(), *tensors)
    L = len(layers)
    return list(outputs[:L]), list(outputs[L : 2 * L]), list(outputs[2 * L :])


def _launches(plan: LayerPlan, n_steps: int, n_layers: int, backward: bool) -> list[dict]:
    """All wavefront steps in one launch (in chunks where a sequence is too long for the grid barrier's counter;
    TAGGED counts each program's steps instead, never reset), or one launch per step and, in backward, the carry
    into dL/dh0 as a last launch."""
    if plan.persistent:
        if plan.tagged:
            chunks = [(0, n_steps)]  # no grid barrier: the counts of steps done (int32) would wrap only past 2**31
        else:
            chunks = _plan.persistent_chunks(0, n_steps, plan.num_programs * n_layers, 1)
        last = dict(finish=1) if backward else {}
        first = dict(finish=0) if backward else {}
        return [dict(s_start=a, n_steps=b - a, **(last if b == n_steps else first)) for a, b in chunks]
    steps = [dict(s_start=s, n_steps=1, **(dict(finish=0) if backward else {})) for s in range(n_steps)]
    return steps + ([dict(s_start=0, n_steps=0, finish=1)] if backward else [])


def _launch_all(
    kernel, plan: LayerPlan, n_layers: int, n_steps: int, backward: bool, device: torch.device, launch: dict
) -> LayerPlan:  # fmt: skip
    """Run every wavefront step of the stack in one direction; the plan that ran them (stepwise where the driver
    refused the cooperative launch: _plan.launched_or_stepwise)."""

    def run(plan: LayerPlan) -> None:
        arguments = dict(sync_arguments(launch, plan), **_launch_options(plan, device))
        counter = arguments["counter"]
        with on_device(device):
            for i, step in enumerate(_launches(plan, n_steps, n_layers, backward)):
                if i and plan.persistent:
                    counter.zero_()  # the next chunk of a very long sequence (_plan.persistent_chunks)
                launch_kernel(kernel, (plan.num_programs, n_layers), device, **step, **arguments)

    return _plan.launched_or_stepwise(plan, plan.num_programs * n_layers, device, run)


class FusedStackFunction(torch.autograd.Function):
    """forward(cell, plan, dropouts (one per layer, None above the top), x [T, B, I], then per layer h0 [1, B, H],
    c0 [1, B, H] or None, w_ih, w_hh, b_ih, b_hh (torch.nn's layout, biases None without bias)) returns every layer's
    y [T, B, H], then every h_n [1, B, H], then every c_n (None for other cells)."""

    @staticmethod
    def forward(ctx, cell: str, plan: LayerPlan, dropouts, x: Tensor, *tensors):
        L = len(dropouts)
        T, B, _ = x.shape
        h0s, c0s, w_ihs, w_hhs, b_ihs, b_hhs = (list(tensors[k::6]) for k in range(6))
        _, gates, n_saved = CELLS[cell]
        hidden = w_hhs[0].shape[1]
        dtype, device, acc = x.dtype, x.device, _acc_dtype(x.dtype)
        save = any(ctx.needs_input_grad) and n_saved > 0
        empty = _plan.empty_buffer  # looked up at the call: tests poison it
        has_bias = b_ihs[0] is not None
        drop = next((d for d in dropouts if d is not None), None)
        mode = drop.kernel_mode if drop is not None else int(DROPOUT_NONE.value)

        x2d = x.view(T * B, -1)
        if has_bias:
            xproj = torch.addmm(_folded_bias(cell, b_ihs[0], b_hhs[0], hidden), x2d, w_ihs[0].t())
            bias = torch.stack([_folded_bias(cell, b_ihs[k], b_hhs[k], hidden) for k in range(1, L)])
            b_hn = torch.stack([b[2 * hidden :] for b in b_hhs]) if cell == "gru" else None
        else:
            xproj = x2d @ w_ihs[0].t()
            bias = torch.zeros(L - 1, gates * hidden, dtype=dtype, device=device)
            b_hn = None
        if b_hn is None:
            b_hn = torch.zeros(L, hidden, dtype=dtype, device=device)
        w_ih = torch.stack(w_ihs[1:])
        w_hh = torch.stack(w_hhs)
        hseq = empty(L, T + 1, B, hidden, dtype=dtype, device=device)
        hseq[:, 0] = torch.cat(h0s)
        state = torch.cat(c0s if cell == "lstm" else h0s).to(acc)
        saved = empty(L, T, B, n_saved * hidden, dtype=dtype, device=device) if save else hseq
        z = empty(L - 1, T, B, hidden, dtype=dtype, device=device) if drop is not None else hseq
        seeds = torch.zeros(L, dtype=torch.int64, device=device)
        for k, d in enumerate(dropouts):
            if d is not None:
                seeds[k : k + 1] = d.seed
        counter = torch.zeros(L, plan.num_programs, dtype=torch.int32, device=device)  # kernels/stack.py
        tagged = dict(ring=_tagged_ring(torch.cat(h0s), dtype), TAGGED=True) if plan.tagged else {}
        weights = dict(w_ih=w_ih, w_hh=w_hh)
        if weights_transposed(cell, dtype, plan.k_split):  # for the forward only (the backward reads them as they are)
            weights = dict(w_ih=w_ih.transpose(1, 2).contiguous(), w_hh=w_hh.transpose(1, 2).contiguous(), W_T=True)
        launch = dict(
            xproj=xproj, bias=bias, b_hn=b_hn, **weights, hseq=hseq, state=state, saved=saved, z=z,
            counter=counter, seed_ptr=seeds, T=T, B=B, p_drop=drop.p if drop is not None else 0.0, SAVE=save,
            **tagged, **_constants(cell, hidden, dtype, plan, mode),
        )  # fmt: skip
        plan = _launch_all(stack_fwd_kernel, plan, L, T + L - 1, False, device, launch)

        if any(ctx.needs_input_grad):
            ctx.set_materialize_grads(False)  # the outputs the loss does not reach: None in backward, not zeros
            ctx.cell, ctx.plan, ctx.mode, ctx.p_drop, ctx.has_bias = cell, plan, mode, launch["p_drop"], has_bias
            ctx.tf32 = tf32_matmul()  # the backward runs at the forward's precision
            # The buffers as saved tensors, not on ctx: autograd frees them after a backward that does not retain the
            # graph (else a training loop's outputs, alive into the next step, would hold them).
            c0 = torch.cat(c0s).to(acc) if cell == "lstm" else None
            buffers = (hseq, saved, z if drop is not None else None, seeds, w_ih, w_hh, c0)
            ctx.save_for_backward(x, *tensors, *buffers)
        ys = [hseq[k, 1:] for k in range(L)]
        h_n = [hseq[k, T].unsqueeze(0).clone() for k in range(L)]
        c_n = [state[k].unsqueeze(0).to(dtype) if cell == "lstm" else None for k in range(L)]
        return (*ys, *h_n, *c_n)

    @staticmethod
    def backward(ctx, *grads):
        with fixed_tf32(ctx.tf32):
            return FusedStackFunction._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        refuse_double_backward("the fused stack (TRITONRNN_WAVEFRONT=fused)")
        refuse_batched_gradients("the fused stack (TRITONRNN_WAVEFRONT=fused)", grads)
        # Raises if an input was modified in place since forward, or was freed (a second backward).
        x, *tensors, hseq, saved, z, seeds, w_ih, w_hh, c0 = unpack_saved(ctx)
        cell, plan = ctx.cell, ctx.plan
        L, T1, B, hidden = hseq.shape
        T = T1 - 1
        gates = CELLS[cell][1]
        dtype, device, acc = x.dtype, x.device, _acc_dtype(x.dtype)
        grad_ys, grad_hns, grad_cns = grads[:L], grads[L : 2 * L], grads[2 * L :]
        empty = _plan.empty_buffer

        def zeros_or(grad: Tensor | None, shape, dt) -> Tensor:
            return torch.zeros(shape, dtype=dt, device=device) if grad is None else grad.to(dt).contiguous()

        all_layers = any(g is not None for g in grad_ys[:-1])
        if all_layers:
            grad_y = torch.stack([zeros_or(g, (T, B, hidden), dtype) for g in grad_ys])
        else:
            grad_y = zeros_or(grad_ys[-1], (T, B, hidden), dtype).contiguous()
        grad_h = torch.cat([zeros_or(g, (1, B, hidden), acc) for g in grad_hns])
        grad_c = torch.cat([zeros_or(g, (1, B, hidden), acc) for g in grad_cns]) if cell == "lstm" else grad_h
        grad_gates = empty(L, T, B, gates * hidden, dtype=dtype, device=device)
        grad_xgates = empty(L, T, B, gates * hidden, dtype=dtype, device=device) if cell == "gru" else grad_gates
        counter = torch.zeros(L, plan.num_programs, dtype=torch.int32, device=device)  # kernels/stack.py
        launch = dict(
            w_ih=w_ih, w_hh=w_hh, hseq=hseq, saved=saved, c0=c0 if c0 is not None else grad_c, grad_y=grad_y,
            grad_above=empty(L, B, hidden, dtype=acc, device=device), grad_gates=grad_gates, grad_xgates=grad_xgates,
            grad_h=grad_h, grad_c=grad_c, counter=counter, seed_ptr=seeds,
            T=T, B=B, p_drop=ctx.p_drop, ALL_LAYERS=all_layers, **_constants(cell, hidden, dtype, plan, ctx.mode),
        )  # fmt: skip
        if plan.tagged:
            launch.update(
                ring=torch.zeros(L, 2, B, gates * hidden, dtype=_ring_dtype(dtype), device=device), TAGGED=True
            )
        _launch_all(stack_bwd_kernel, plan, L, T + L - 1, True, device, launch)

        # The GEMMs and reductions of the inputs that want a gradient only (a stack's data, frozen weights: none).
        needs = ctx.needs_input_grad[3:]  # x, then each layer's h0, c0, w_ih, w_hh, b_ih, b_hh
        gx = grad_xgates.view(L, T * B, gates * hidden)
        gh = grad_gates.view(L, T * B, gates * hidden)
        result: list[Tensor | None] = [None, None, None, (gx[0] @ tensors[2]).view_as(x) if needs[0] else None]
        for k in range(L):
            need_h0, need_c0, need_w_ih, need_w_hh, need_b_ih, need_b_hh = needs[1 + 6 * k : 7 + 6 * k]
            below = x if k == 0 else (z[k - 1] if z is not None else hseq[k - 1, 1:])
            dw_ih = gx[k].t() @ below.reshape(T * B, -1) if need_w_ih else None
            dw_hh = gh[k].t() @ hseq[k, :T].reshape(T * B, hidden) if need_w_hh else None
            db_ih = db_hh = None
            if ctx.has_bias and (need_b_ih or need_b_hh):
                db_hh = gh[k].sum(0, dtype=acc).to(dtype)
                # The same gate gradients but for GRU (its n's input part differs): one reduction for both.
                db_ih = gx[k].sum(0, dtype=acc).to(dtype) if cell == "gru" else db_hh.clone()
                db_ih, db_hh = (db_ih if need_b_ih else None), (db_hh if need_b_hh else None)
            dh0 = grad_h[k : k + 1].to(dtype) if need_h0 else None
            dc0 = grad_c[k : k + 1].to(dtype) if cell == "lstm" and need_c0 else None
            result += [dh0, dc0, dw_ih, dw_hh, db_ih, db_hh]
        return tuple(result)
