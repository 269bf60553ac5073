"""One layer (all its directions) as two torch.library custom ops, and how the kernels are planned for it.

``tritonrnn::layer`` runs the layer on the persistent kernels (``layer_run.LayerRun``), or where they cannot run it
on torch's own op (``native``; logged once; its backward then runs the layer again under torch.func.vjp: torch's op
on CPU tensors, else the reference), and returns the buffers its backward reads;
``tritonrnn::layer_backward`` runs the backward from them. As custom ops, torch.compile sees each layer as one
node (``fullgraph=True`` included) and the kernels stay out of its tracing.

Every output has a shape fixed by the arguments' shapes, dtype and device alone (``_output_shapes``), whichever
path runs, since the compiler allocates by those shapes; an absent output is an empty tensor (so are the kernels'
buffers where the device, dtype or hidden size alone rule the kernels out: ``_certain_fallback``). Outside
torch.compile the same two implementations run through ``_EagerLayer``, an autograd.Function, without the custom op's
dispatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

# autotune is imported where a GPU plan is made, not with the package: `python -m tritonrnn.autotune` then runs a
# module that is not imported already (runpy warns about that, and two copies of its state would exist).
from tritonrnn import native, reference
from tritonrnn._plan import (
    CELLS,
    MIN_DOT,
    LayerPlan,
    cuda_index,
    fixed_tf32,
    forced,
    in_one_group,
    interpret_mode,
    log_once,
    plan_layer,
    resident_programs,
    single_group,
    smaller_plan,
    tf32_matmul,
    unpack_saved,
    with_batch_groups,
    with_exchange,
    with_projection_chunks,
)
from tritonrnn.dropout import LayerDropout
from tritonrnn.dropout import mask as _dropout_mask
from tritonrnn.layer_run import ALL_NEEDED, LayerRun, Needs, Variant, _gpu_misfit, _variant, writes_y


def kernel_plan(
    cell: str, hidden: int, batch: int, dtype: torch.dtype, device: torch.device, variant: Variant | None = None,
    one_group: bool = False,
) -> LayerPlan | str:  # fmt: skip
    """How the kernels run a layer on this device, or a string saying why they cannot.

    On a GPU: the autotuned configuration (tritonrnn/autotune.py) where tuning is on, else the heuristics;
    either way both kernels are compiled and checked against the GPU's shared memory before the first launch.
    ``one_group``: the caller runs the whole batch in one group of programs (the stream wavefront's layers, whose
    grids run at once); the projection's kernels always do.
    """
    variant = variant or Variant()
    one_group = one_group or bool(variant.proj)
    if device.type not in ("cpu", "cuda"):
        return f"no kernels for device type {device.type!r}"
    # The projection's kernels keep the narrow slice (the dots of their second phase were not analysed for the wide),
    # their reductions in chunks where they can be.
    plan = plan_layer(cell, hidden, batch, dtype, device, variant.directions, MIN_DOT if variant.proj else None)
    if variant.proj and not isinstance(plan, str) and device.type == "cuda":
        plan = with_projection_chunks(plan, hidden, variant.proj, dtype)
    if not isinstance(plan, str) and one_group:
        plan = in_one_group(plan, batch, hidden, dtype, variant.proj) if device.type == "cuda" else single_group(plan)
    if device.type == "cpu" and not isinstance(plan, str):
        return with_exchange(plan, hidden, dtype, variant.proj)
    if device.type == "cuda" and not isinstance(plan, str):
        # The TF32 flag changes the compiled dot, so it is part of the cache key.
        tf32 = tf32_matmul()
        if not forced():
            from tritonrnn import autotune

            key = autotune.TuneKey(
                cell, hidden, autotune.batch_bucket(batch), autotune.DTYPE_NAMES[dtype], variant.directions,
                variant.proj, tf32=tf32 and dtype == torch.float32,
            )  # fmt: skip
            # Timed at the bucket's batch: the entry serves the whole bucket, whichever batch of it comes first.
            tuned = autotune.tuned_plan(
                key, device, lambda: _gpu_tuner(cell, hidden, key.batch_bucket, dtype, device, variant)
            )  # fmt: skip
            if tuned is not None:
                # Tuned for the batch bucket: the groups of this batch (one for the projection's kernels).
                sm_count = resident_programs(cuda_index(device))
                plan = single_group(tuned) if one_group else with_batch_groups(
                    tuned, batch, variant.directions, sm_count
                )  # fmt: skip
        full, attempt = plan, plan
        while attempt is not None:
            plan = attempt
            reason = _gpu_misfit(cell, hidden, dtype, tf32, plan, variant, cuda_index(device))
            if reason is None or forced():
                break
            attempt = smaller_plan(plan, full, batch)
        if reason is not None:
            return reason
        # The tagged exchange where it is asked for, on the slice the barrier's kernels hold (its own kernels could
        # fit shared memory where those did not, but only by spilling its wider tiles: perf/NOTES.md).
        tagged = with_exchange(plan, hidden, dtype, variant.proj)
        if tagged != plan and _gpu_misfit(cell, hidden, dtype, tf32, tagged, variant, cuda_index(device)) is None:
            return tagged
    return plan


def _gpu_tuner(cell: str, hidden: int, batch: int, dtype: torch.dtype, device: torch.device, variant: Variant):
    """An autotune.Tuner timing this layer's kernels on a random problem of autotune.TUNE_STEPS steps."""
    import triton.testing

    from tritonrnn import autotune

    _, gates, _ = CELLS[cell]
    D, width = variant.directions, variant.proj or hidden
    T = autotune.TUNE_STEPS
    tf32 = tf32_matmul()

    # Its own generator: tuning must not move the user's random numbers (the dropout masks drawn next, say).
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return (torch.randn(*shape, device=device, generator=generator) * hidden**-0.5).to(dtype)

    x = rand(T, batch, hidden)
    h0 = rand(D, batch, width)
    c0 = rand(D, batch, hidden) if cell == "lstm" else None
    w_ih, w_hh, bias = rand(D * gates * hidden, hidden), rand(D, gates * hidden, width), rand(D * gates * hidden)
    w_hr = rand(D, variant.proj, hidden) if variant.proj else None

    def run(plan: LayerPlan, backward: bool):
        # The forward as a training step runs it (saving what backward reads): training is what the tuning is for.
        layer = LayerRun(cell, plan, False, None, x, h0, c0, w_ih, w_hh, bias, bias, w_hr, True)
        layer.forward_steps(0, T)
        if backward:
            layer.end_forward()
            layer.start_backward(torch.ones_like(layer.y), None, None, None)
            layer.backward_steps(0, T)
            layer.grads()

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")

    return autotune.Tuner(
        misfit=lambda plan: _gpu_misfit(cell, hidden, dtype, tf32, plan, variant, cuda_index(device)),
        time_forward=lambda plan: bench(lambda: run(plan, False)),
        time_backward=lambda fwd, bwd: bench(lambda: run(dataclasses.replace(fwd, backward=bwd), True)),
    )


# --- the custom ops ----------------------------------------------------------------------------------------------


def _dropout(seed: Tensor | None, p_drop: float, variational: bool) -> LayerDropout | None:
    return LayerDropout(p_drop, variational, seed) if seed is not None else None


def _certain_fallback(cell: str, x: Tensor, w_hh: Tensor, variant: Variant) -> bool:
    """Whether the layer runs on the fallback whatever the GPU's compile check finds, decided from the device, dtype
    and shapes alone, so that the fake implementation knows it too: the outputs then leave out the kernels' buffers
    (saved values, the projection's sequence, an unused hseq), which the fallback's backward never reads."""
    device = x.device
    if device.type == "cpu":
        if not interpret_mode():
            return True
    elif device.type != "cuda":
        return True
    elif not torch.cuda.is_available():
        return False  # fake CUDA tensors on a machine without a GPU: no real run to agree with, the full shapes
    hidden = w_hh.shape[1] // CELLS[cell][1]
    # plan_layer's reasons (the device, dtype and hidden size) do not depend on the batch: 1, not a symbolic size
    # that a dynamic-shape trace would guard on.
    return isinstance(plan_layer(cell, hidden, 1, x.dtype, device, variant.directions), str)


def _output_shapes(
    cell: str, x: Tensor, w_hh: Tensor, w_hr: Tensor | None, variant: Variant, save: bool, fallback: bool
) -> list:
    """(shape, dtype) of tritonrnn::layer's outputs: hseq, y, z, h_n, c_n, saved, mseq ((0,) where absent).
    ``fallback``: ``_certain_fallback``'s answer (its outputs are those the fallback's backward reads)."""
    T, B, _ = x.shape
    _, gates, n_saved = CELLS[cell]
    D, _, width = w_hh.shape
    hidden = w_hh.shape[1] // gates
    dtype, none = x.dtype, (0,)
    kernels = not fallback
    return [
        # h_t at row t + 1 - d (LayerRun); the fallback's only where it carries the output
        ((D, T + 1, B, width) if kernels or not variant.write_y else none, dtype),
        ((T, B, D * width) if variant.write_y else none, dtype),  # else the output is hseq[0, 1:]
        ((T, B, D * width) if variant.dropout_mode else none, dtype),
        ((D, B, width), dtype),
        ((D, B, hidden) if cell == "lstm" else none, dtype),
        ((D, T, B, n_saved * hidden) if kernels and save and n_saved else none, dtype),
        ((D, T, B, hidden) if kernels and w_hr is not None else none, dtype),
    ]


def _directions(w_ih, w_hh, b_ih, b_hh, w_hr) -> list[tuple]:
    """Per direction (w_ih, w_hh, b_ih, b_hh[, w_hr]), as reference.layer takes them."""
    D = w_hh.shape[0]
    pieces = [w_ih.chunk(D), w_hh.unbind(0), b_ih.chunk(D) if b_ih is not None else [None] * D]
    pieces.append(b_hh.chunk(D) if b_hh is not None else [None] * D)
    if w_hr is not None:
        pieces.append(w_hr.unbind(0))
    return list(zip(*pieces))


def plan_or_reason(cell: str, x: Tensor, w_hh: Tensor, variant: Variant) -> LayerPlan | str:
    """The kernels' plan for this layer, or why they cannot run it (logged once, except for CPU tensors without
    the interpreter: they run torch's CPU op by design, tritonrnn/native.py). w_hh: [G*H, N] or [D, G*H, N]."""
    if x.device.type == "cpu" and not interpret_mode():
        return "no Triton interpreter on the CPU"
    hidden = w_hh.shape[-2] // CELLS[cell][1]
    plan = kernel_plan(cell, hidden, x.shape[1], x.dtype, x.device, variant)
    if isinstance(plan, str):
        instead = (
            "torch's own RNN op instead (what torch.nn runs there: cuDNN on an NVIDIA GPU)"
            if native.compute_dtype(x.device, x.dtype) is not None
            else "the PyTorch reference implementation instead (correct, much slower)"
        )
        log_once(f"tritonrnn: {cell} layer with hidden_size={hidden}, {x.dtype}, on {x.device.type}: {plan}; {instead}")
    return plan


def _layer_impl(
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],  # noqa: UP045 - torch.library reads the annotations
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],  # noqa: UP045
    b_hh: Optional[Tensor],  # noqa: UP045
    w_hr: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    seed: Optional[Tensor],  # noqa: UP045
    cell: str,
    residual: bool,
    p_drop: float,
    variational: bool,
    save: bool,
    tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer with LayerRun's shapes; returns (hseq, y, z, h_n, c_n, saved, mseq) as ``_output_shapes``.
    ``tf32``: float32's dots as TF32 (``tf32_matmul()`` where the call was made; its backward runs at the same)."""
    return _layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, cell, residual, p_drop, variational,
                          save, tf32)  # fmt: skip


def _layer_forward(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, cell, residual, p_drop, variational, save, tf32,
    plan=None,
):  # fmt: skip
    """``_layer_impl`` with the layer's plan (or the reason it has none) given, where the caller has it already."""
    with fixed_tf32(tf32):
        dropout = _dropout(seed, p_drop, variational)
        variant = _variant(w_hh.shape[0], residual, dropout, w_hr, lengths)
        if plan is None:
            plan = plan_or_reason(cell, x, w_hh, variant)
        fallback = isinstance(plan, str) and _certain_fallback(cell, x, w_hh, variant)
        shapes = _output_shapes(cell, x, w_hh, w_hr, variant, save, fallback)
        if isinstance(plan, str):
            # torch's own op (or where that cannot, the reference), as in eager (functional._layer).
            with torch.no_grad():
                y, z, h_n, c_n = native.layer(
                    cell, x, h0, c0, _directions(w_ih, w_hh, b_ih, b_hh, w_hr), residual, dropout, lengths
                )  # fmt: skip
            # Nothing of it is kept: the backward runs the layer again (_fallback_backward). hseq only carries the
            # output view; saved and mseq are empty unless the GPU's compile check alone turned the kernels down (the
            # fake shapes cannot know).
            out = [torch.zeros(shape, dtype=dtype, device=x.device) for shape, dtype in shapes]
            for index, value in ((1 if variant.write_y else 0, y), (2, z), (3, h_n), (4, c_n)):
                if value is not None:
                    (out[index] if index else out[0][0, 1:]).copy_(value)
            return tuple(out)
        run = LayerRun(cell, plan, residual, dropout, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, save, lengths)
        run.forward_steps(0, run.T)
        run.end_forward()
        y, z, h_n, c_n = run.outputs()
        saved = run.saved if run.save else None
        out = [run.hseq, y if variant.write_y else None, z, h_n, c_n, saved, run.mseq]
        return tuple(t if t is not None else x.new_empty(shape, dtype=dtype) for t, (shape, dtype) in zip(out, shapes))


layer = torch.library.custom_op("tritonrnn::layer", _layer_impl, mutates_args=())


@layer.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, cell, residual, p_drop, variational, save, tf32):
    variant = _variant(w_hh.shape[0], residual, _dropout(seed, p_drop, variational), w_hr, lengths)
    shapes = _output_shapes(cell, x, w_hh, w_hr, variant, save, _certain_fallback(cell, x, w_hh, variant))
    return tuple(x.new_empty(shape, dtype=dtype) for shape, dtype in shapes)


def _layer_backward_impl(
    grad_hseq: Optional[Tensor],  # noqa: UP045
    grad_y: Optional[Tensor],  # noqa: UP045
    grad_z: Optional[Tensor],  # noqa: UP045
    grad_hn: Optional[Tensor],  # noqa: UP045
    grad_cn: Optional[Tensor],  # noqa: UP045
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],  # noqa: UP045
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],  # noqa: UP045
    b_hh: Optional[Tensor],  # noqa: UP045
    w_hr: Optional[Tensor],  # noqa: UP045
    lengths: Optional[Tensor],  # noqa: UP045
    seed: Optional[Tensor],  # noqa: UP045
    hseq: Tensor,
    saved: Tensor,
    mseq: Tensor,
    cell: str,
    residual: bool,
    p_drop: float,
    variational: bool,
    tf32: bool,
    needs: Optional[list[bool]] = None,  # noqa: UP045
) -> list[Tensor]:
    """Gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) (empty where that input is None or not in ``needs``;
    None: all), at the forward's precision ``tf32``.

    The ops' schemas grow by arguments with defaults alone: torch.compile's caches do not key on a custom op's schema
    or its autograd formula (pytorch/pytorch#144344), so a backward graph compiled and cached by an older tritonrnn
    calls this op as that version did (here, without ``needs``)."""
    return _layer_grads(
        grad_hseq, grad_y, grad_z, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, hseq,
        saved, mseq, cell, residual, p_drop, variational, tf32, needs,
    )  # fmt: skip


def _layer_grads(
    grad_hseq, grad_y, grad_z, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, hseq, saved,
    mseq, cell, residual, p_drop, variational, tf32, needs, reference_only=False, plan=None,
) -> list[Tensor]:  # fmt: skip
    """_layer_backward_impl's gradients, on the kernels or (where they cannot run it, or ``reference_only``) by the
    reference. ``plan``: the forward's (``plan_or_reason``), where the caller kept it."""
    needs = Needs(*needs) if needs is not None else ALL_NEEDED
    with fixed_tf32(tf32):
        dropout = _dropout(seed, p_drop, variational)
        variant = _variant(w_hh.shape[0], residual, dropout, w_hr, lengths)
        if not variant.write_y:
            grad_y = grad_hseq[0, 1:] if grad_hseq is not None else None  # the output was a view of hseq
        inputs = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]
        if reference_only:
            plan = "reference only"
        elif plan is None:
            plan = plan_or_reason(cell, x, w_hh, variant)
        if isinstance(plan, str):
            grads = _fallback_backward(
                cell, inputs, lengths, dropout, residual, (grad_y, grad_z, grad_hn, grad_cn), needs,
                torch_op=not reference_only,
            )  # fmt: skip
        else:
            run = LayerRun(
                cell, plan, residual, dropout, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, True, lengths,
                forward_buffers=(hseq, saved, mseq if w_hr is not None else None),
            )  # fmt: skip
            run.start_backward(grad_y, grad_z, grad_hn, grad_cn, needs)
            run.backward_steps(0, run.T)
            grads = list(run.grads())
        return [g if g is not None else x.new_empty(0) for g in grads]


layer_backward = torch.library.custom_op("tritonrnn::layer_backward", _layer_backward_impl, mutates_args=())


@layer_backward.register_fake
def _(
    grad_hseq, grad_y, grad_z, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, hseq, saved,
    mseq, cell, residual, p_drop, variational, tf32, needs=None,
):  # fmt: skip
    inputs, needs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), needs if needs is not None else ALL_NEEDED
    return [torch.empty_like(t) if t is not None and need else x.new_empty(0) for t, need in zip(inputs, needs)]


def _fallback_backward(
    cell, inputs, lengths, dropout, residual, grads, needs: Needs, torch_op: bool
) -> list[Tensor | None]:  # fmt: skip
    """The fallback's backward: its forward again (nothing of it was kept), differentiated with torch.func.vjp
    (autograd itself is switched off inside a custom op) with respect to the inputs in ``needs``. ``torch_op``: that
    forward on torch's own op where it runs under vjp (``native.layer``: CPU tensors, where it is several times faster
    than the reference's step loop, perf/NOTES.md), else the reference, which ``reference_only`` callers need (its
    backward can be differentiated)."""
    present = [index for index, t in enumerate(inputs) if t is not None and needs[index]]
    mask = None
    if dropout is not None:
        T, B, _ = inputs[0].shape
        mask = _dropout_mask(dropout, T, B, inputs[4].shape[0] * inputs[4].shape[2], inputs[0].device)

    def forward(*tensors):
        full = list(inputs)
        for index, t in zip(present, tensors):
            full[index] = t
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = full
        weights = _directions(w_ih, w_hh, b_ih, b_hh, w_hr)
        y, z, h_n, c_n = (native.layer if torch_op else reference.layer)(
            cell, x, h0, c0, weights, residual, dropout, lengths, mask
        )  # fmt: skip
        return y, (z if z is not None else y.new_zeros(0)), h_n, (c_n if c_n is not None else y.new_zeros(0))

    # Grad on for torch's op: vjp runs it in the grad mode it began in, and a custom op's backward runs with grad off
    # (native._transform_in_the_way). Below autograd's dispatch, so nothing outside records it.
    with torch.enable_grad() if torch_op else contextlib.nullcontext():
        outputs, vjp = torch.func.vjp(forward, *[inputs[index] for index in present])
        cotangents = [g if g is not None else torch.zeros_like(out) for g, out in zip(grads, outputs)]
        found = iter(vjp(tuple(cotangents)))
    return [next(found) if index in present else None for index in range(len(inputs))]


def _setup_context(ctx, inputs, output) -> None:
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, cell, residual, p_drop, variational, _, tf32 = inputs
    hseq, _, _, _, _, saved, mseq = output
    ctx.options = (cell, residual, p_drop, variational, tf32)
    ctx.present = [t is not None for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)]
    # Through autograd, so that modifying an input or hseq in place before backward is an error.
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, seed, hseq, saved, mseq)


def _backward(
    ctx, grad_hseq, grad_y, grad_z, grad_hn, grad_cn, _grad_saved, _grad_mseq, impl=None, saved=None, needs=None
):  # fmt: skip
    impl = impl or torch.ops.tritonrnn.layer_backward
    if saved is None:
        saved = _unpack_at_forwards_precision(ctx)
    if needs is None:
        # The op's 16 inputs end every caller's (_EagerLayerPlain's begin with its plan); x to w_hr begin them.
        needs = list(ctx.needs_input_grad[-16:][:8])
    grads = impl(grad_hseq, grad_y, grad_z, grad_hn, grad_cn, *saved, *ctx.options, needs)
    grads = [g if present and need else None for g, present, need in zip(grads, ctx.present, needs)]
    return (*grads, None, None, None, None, None, None, None, None)  # lengths, seed and the options


def _unpack_at_forwards_precision(ctx) -> tuple:
    """ctx's saved tensors. Under torch.utils.checkpoint(use_reentrant=False) the first unpack runs the checkpointed
    forward again: at the forward's precision, as the backward runs (the options end with it)."""
    with fixed_tf32(ctx.options[-1]):
        return unpack_saved(ctx)


layer.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """tritonrnn::layer outside torch.compile: the same implementation and autograd rule, without the custom op's
    dispatch (each op call runs inside a Dynamo-disabled frame; the interpreter tests ran 2.5x slower through it,
    perf/NOTES.md)."""

    @staticmethod
    def forward(*args):
        return _layer_impl(*args)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, *grads):
        # The reference's backward, in PyTorch ops, where the kernels' cannot serve: under a torch.func transform
        # (grad, jacrev, ...) the tensors are functorch's wrappers, which a kernel cannot read; with create_graph=True
        # (a gradient penalty) the backward must itself be differentiable (cuDNN's is not).
        # (is_grads_batched and jacobian(vectorize=True) hand in the older vmap's batched tensors, also wrappers.)
        # ctx.saved_tensors is read once: torch.utils.checkpoint(use_reentrant=False) allows one unpack per backward.
        saved = _unpack_at_forwards_precision(ctx)
        tensors = [t for t in (*grads, *saved) if t is not None]
        functorch = torch._C._functorch
        transformed = any(
            functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors
        )
        if transformed:
            reason = "a torch.func transform or a batched gradient differentiates a layer"
        elif torch.is_grad_enabled():
            reason = "a backward with create_graph=True"
        else:
            # The forward's plan where it was kept (_EagerLayerPlain): the backward need not plan again.
            impl = functools.partial(_layer_grads, plan=getattr(ctx, "plan", None))
            return _backward(ctx, *grads, impl=impl, saved=saved)
        log_once(f"tritonrnn: {reason}: its backward runs the reference, which can be differentiated")
        # Every gradient under a transform, as before: what needs_input_grad says at a transform's level is untested.
        needs = list(ALL_NEEDED) if transformed else None
        return _backward(ctx, *grads, impl=_reference_grads, saved=saved, needs=needs)


class _EagerLayerPlain(torch.autograd.Function):
    """_EagerLayer where no torch.func transform is active: the same forward, context and backward, in the old
    form (forward takes ctx), with the plan the caller made. torch's Function.apply binds the default arguments of a
    function that defines setup_context through inspect.signature at every call: a sixth of a one-layer call's host
    time (perf/NOTES.md). torch.func transforms need setup_context, so under them _EagerLayer runs."""

    @staticmethod
    def forward(ctx, plan, *args):
        output = _layer_forward(*args, plan=plan)
        # An output's gradient stays None where the loss does not reach it, rather than a tensor of zeros: saved
        # (the size of every gate of every step) has none, and neither do h_n and c_n unless the loss reads them.
        ctx.set_materialize_grads(False)
        _setup_context(ctx, args, output)
        ctx.plan = plan
        return output

    @staticmethod
    def backward(ctx, *grads):
        return None, *_EagerLayer.backward(ctx, *grads)


def _reference_grads(*args) -> list[Tensor]:
    return _layer_grads(*args, reference_only=True)


def without_data(x: Tensor) -> bool:
    """A meta tensor or one of FakeTensorMode (shape inference, torch.export): nothing a kernel or the reference
    could read; the custom op's fake implementation gives the shapes."""
    return x.device.type == "meta" or is_fake(x)


def run_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, residual, dropout, lengths, plan=None):
    """tritonrnn::layer with LayerRun's shapes: (y [T, B, D*N], z or None, h_n [D, B, N], c_n or None).
    ``plan``: the layer's ``plan_or_reason``, where the caller has made it (eager calls then skip planning again)."""
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    seed, p_drop, variational = (dropout.seed, dropout.p, dropout.variational) if dropout else (None, 0.0, False)
    # The custom op under torch.compile, and for tensors without data, whose outputs its fake implementation gives;
    # eager calls skip its dispatch (see _EagerLayer).
    if torch.compiler.is_compiling() or without_data(x):
        run = layer
    elif torch._C._functorch.peek_interpreter_stack() is not None:
        run = _EagerLayer.apply
    else:
        run = functools.partial(_EagerLayerPlain.apply, plan)
    hseq, y, z, h_n, c_n, _, _ = run(*tensors, lengths, seed, cell, residual, p_drop, variational, save, tf32_matmul())
    # A function, not Variant.write_y: torch 2.10's dynamo cannot read a NamedTuple's property (fullgraph breaks).
    if not writes_y(w_hh.shape[0], residual, lengths is not None):
        # One direction: squeeze, whose backward is a view, where hseq[0] would make backward build a zero-filled
        # hseq-sized gradient beside the one slicing builds.
        y = hseq.squeeze(0)[1:]
    return y, (z if dropout is not None else None), h_n, (c_n if cell == "lstm" else None)
