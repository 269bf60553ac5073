"""The layer wavefront: a unidirectional stack whose layers overlap in time, in chunks of steps on one CUDA
stream per layer (``TRITONRNN_WAVEFRONT``; off by default until measured on a GPU, perf/NOTES.md)."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from tritonrnn._plan import fixed_tf32, refuse_batched_gradients, refuse_double_backward, tf32_matmul, unpack_saved
from tritonrnn.layer_run import LayerRun, Needs


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
        outputs = [run.outputs() for run in runs]
        returned = (*[o[0] for o in outputs], *[o[2] for o in outputs], *[o[3] for o in outputs])
        if save:
            ctx.set_materialize_grads(False)  # the outputs the loss does not reach: None in backward, not zeros
            # ctx must not hold a tensor it returns: output -> its grad_fn -> ctx -> output is a cycle through C++
            # that Python's garbage collector cannot see, and every training step's buffers would stay alive.
            kept = [t for t in returned if t is not None]
            for run in runs:
                run.detach_tensors(kept)
            # The inputs (checked for changes in place at backward) and what backward reads of the runs, as saved
            # tensors, not on ctx: autograd frees them after a backward that does not retain the graph (else a
            # training loop's outputs, alive into the next step, would hold them). Each tensor once: a saved-tensor
            # hook (save_on_cpu) would copy it as often as it is saved.
            held, ctx.slots = [x, *tensors], []
            positions = {id(t): k for k, t in enumerate(held) if t is not None}  # held keeps each alive: ids unique
            for index, run in enumerate(runs):
                for name, tensor in run.let_go():
                    if id(tensor) not in positions:
                        positions[id(tensor)] = len(held)
                        held.append(tensor)
                    ctx.slots.append((index, name, positions[id(tensor)]))
            ctx.runs = runs
            ctx.chunks = chunks
            ctx.tf32 = tf32_matmul()  # the backward runs at the forward's precision
            ctx.save_for_backward(*held)
        return returned

    @staticmethod
    def backward(ctx, *grads):
        with fixed_tf32(ctx.tf32):
            return WavefrontStackFunction._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        refuse_double_backward("the stack on streams (TRITONRNN_WAVEFRONT=N)")
        refuse_batched_gradients("the stack on streams (TRITONRNN_WAVEFRONT=N)", grads)
        saved = unpack_saved(ctx)  # raises if an input was modified in place since forward, or was freed
        runs, chunks = ctx.runs, ctx.chunks
        for index, name, position in ctx.slots:
            setattr(runs[index], name, saved[position])
        L = len(runs)
        grad_ys, grad_hns, grad_cns = grads[:L], grads[L : 2 * L], grads[2 * L :]
        add_from_above = [False] * L
        # Which gradients each layer gives: its inputs' (needs_input_grad after layers, chunk and lengths: x, then
        # each layer's 7 tensors). A layer runs backward where it or a layer below wants a gradient (frozen lower
        # layers over data run none: as autograd prunes them layer by layer); dL/dx where the layer below runs.
        needs = ctx.needs_input_grad[3:]
        own = [needs[1 + 7 * index : 8 + 7 * index] for index in range(L)]
        input_wants = [needs[0]]  # layer k's input (x, or layer k - 1's output) wants a gradient
        for index in range(L - 1):
            input_wants.append(input_wants[-1] or any(own[index]))
        first = next((index for index in range(L) if input_wants[index] or any(own[index])), L)
        for index in range(L - 1, first - 1, -1):
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
            run.start_backward(grad_y, grad_z, grad_hns[index], grad_cns[index], Needs(input_wants[index], *own[index]))

        def step(run: LayerRun, t0: int, t1: int) -> None:
            index = runs.index(run)
            if add_from_above[index]:
                run.grad_y[t0:t1] += runs[index + 1].dx[t0:t1]
            run.backward_steps(t0, t1)

        _wavefront(runs[first:], chunks, step, reverse=True)
        grads = [(None,) * 8] * first + [run.grads() for run in runs[first:]]  # each run's GEMMs and sums once
        for run in runs:
            run.let_go()  # the backward's buffers, and the forward's (autograd holds them while it must)
        result: list[Tensor | None] = [None, None, None, grads[0][0]]
        for _, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr in grads:
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


def wavefront_setting() -> int | str:
    """``TRITONRNN_WAVEFRONT``: 0 (unset) off; 1 on streams with 64-step chunks, N > 1 on streams with N-step chunks;
    "fused": one launch for a stack of equal layers (tritonrnn/fused_stack.py). Off by default until measured on the
    GPU (perf/NOTES.md)."""
    value = os.environ.get("TRITONRNN_WAVEFRONT", "0").strip() or "0"
    if value == "fused":
        return value
    if not (value.isascii() and value.isdigit()):  # isdigit alone takes "²", which int() refuses
        raise ValueError(f"TRITONRNN_WAVEFRONT should be 0, 1, a number of steps per chunk or 'fused', got {value!r}")
    number = int(value)
    return 64 if number == 1 else number


def wavefront_chunk() -> int:
    """Steps per chunk of the wavefront on streams, 0 when it is off (or fused)."""
    setting = wavefront_setting()
    return setting if isinstance(setting, int) else 0
