"""Functional API: recurrent stacks on plain tensors, and the autograd Function behind them.

Each layer runs as: the input projection of all steps and directions as one GEMM, one persistent
kernel launch for the recurrence of both directions (kernels/recurrent.py), which also writes the
residual sum and the dropped-out input of the next layer; in backward one persistent reverse-time
launch followed by GEMMs and reductions over all steps for the input and weight gradients.
Weights are plain tensors, so weight dropout or any other transform is applied by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from tritonrnn import autotune, reference, scheduler
from tritonrnn._plan import CELLS, MIN_HELD_ROWS, LayerPlan, cuda_index, forced, interpret_mode, log_once, plan_layer
from tritonrnn.dropout import LayerDropout
from tritonrnn.layer_run import LayerRun, Variant, _gpu_misfit, _variant
from tritonrnn.wavefront import WavefrontStackFunction, wavefront_chunk


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
