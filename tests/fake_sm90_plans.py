"""The GPU's own compile check, run without a GPU: ``layer_op.kernel_plan`` and ``fused_stack.fused_plan`` on a
``cuda`` device, against a stand-in Triton driver whose target is an H100's sm_90 (132 SMs, 227 KB of shared memory).

On a GPU, a layer's first call compiles its forward and backward kernels with exactly the arguments a launch passes
(``layer_run._warmup_calls``, which a CPU test checks against recorded launches) and reads their shared memory
(``_gpu_misfit``). perf/compile_report.py compiles the kernels from its own signatures; this runs the library's path
itself with Triton's real compiler, nothing launched: a kernel that only the installed Triton's GPU compiler rejects
for the arguments a launch passes (Triton 3.6 and a None ``ring``, twenty-sixth session) fails here, on the CPU.

    python tests/fake_sm90_plans.py     # TRITON_INTERPRET unset; exit code 1 on any failure
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("fake_sm90_plans.py compiles for sm_90: run it with TRITON_INTERPRET unset")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

SM_COUNT, MAX_SHARED = 132, 232448  # ANCHORS.md's H100 (the H200: the same), as perf/compile_report.py


class _Utils:
    def get_device_properties(self, index):
        return {"max_shared_mem": MAX_SHARED, "max_num_regs": 65536, "multiprocessor_count": SM_COUNT, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}  # fmt: skip


class _Driver:
    """What Triton's JIT asks of its active driver to compile (``warmup``) for sm_90 without launching."""

    utils = _Utils()

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


class _Properties:
    multi_processor_count = SM_COUNT
    name = "NVIDIA H100 80GB HBM3"


def install() -> None:
    """The stand-in driver, torch.cuda's device queries, and CUDA placeholder tensors allocated on the CPU (only
    their dtypes and alignment matter to a compile)."""
    driver.set_active(_Driver())
    torch.cuda.get_device_properties = lambda *args, **kwargs: _Properties()
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda *args, **kwargs: _Properties.name
    torch.cuda.is_current_stream_capturing = lambda: False
    empty = torch.empty

    def on_the_cpu(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return empty(*args, device=device, **kwargs)

    torch.empty = on_the_cpu


# (cell, hidden, batch, dtype, variant options); every variant a launch can compile differently.
LAYERS = [
    ("lstm", 64, 16, torch.bfloat16, {}),
    ("gru", 100, 16, torch.float16, {}),
    ("rnn_tanh", 64, 16, torch.float32, {}),
    ("rnn_relu", 64, 64, torch.bfloat16, {}),
    ("lstm", 100, 16, torch.float32, dict(directions=2, residual=True, dropout_mode=1, varlen=True)),
    ("gru", 64, 16, torch.bfloat16, dict(directions=2, dropout_mode=2)),
    ("lstm", 64, 16, torch.bfloat16, dict(directions=2, residual=True, dropout_mode=1, varlen=True, proj=16)),
    ("lstm", 256, 16, torch.float32, dict(proj=64)),  # the FMA dots in chunks, W_hh and W_hr transposed
    ("gru", 512, 16, torch.float32, {}),  # the FMA forward's held rows in two halves (_plan.fma_halves)
]
STACKS = [("lstm", 64, 16, torch.bfloat16, 0), ("gru", 100, 16, torch.float32, 1)]


def main() -> int:
    install()
    from tritonrnn import _plan, fused_stack, layer_op
    from tritonrnn._plan import LayerPlan
    from tritonrnn.layer_run import Variant

    device, failures = torch.device("cuda", 0), 0
    for exchange in ("barrier", "tagged"):
        os.environ["TRITONRNN_EXCHANGE"] = exchange
        for cell, hidden, batch, dtype, options in LAYERS:
            plan = layer_op.kernel_plan(cell, hidden, batch, dtype, device, Variant(**options))
            ok = isinstance(plan, LayerPlan) and (exchange == "barrier" or options.get("proj") or plan.tagged)
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} layer {cell} H={hidden} B={batch} {dtype} {options} {exchange}: {plan}")
        for cell, hidden, batch, dtype, dropout_mode in STACKS:
            plan = fused_stack.fused_plan([cell] * 3, [hidden] * 3, batch, dtype, device, dropout_mode)
            ok = isinstance(plan, LayerPlan) and plan.tagged == (exchange == "tagged")
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} stack 3 x {cell} H={hidden} B={batch} {dtype} {exchange}: {plan}")
    # Weight rows streamed each step (H=2048 bf16: the held slice halved until it fits), and a step-by-step grid.
    os.environ["TRITONRNN_EXCHANGE"] = "barrier"
    plan = layer_op.kernel_plan("lstm", 2048, 64, torch.bfloat16, device, Variant())
    ok = isinstance(plan, LayerPlan) and plan.block_k < 2048
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} layer lstm H=2048 B=64 bf16, rows streamed: {plan}")
    # float32 without TF32, rows streamed: both kernels in chunks, the held rows in halves (_plan.fma_halves), whose
    # three pipeline stages do not fit: two do (_plan.smaller_plan).
    plan = layer_op.kernel_plan("lstm", 1024, 16, torch.float32, device, Variant())
    ok = isinstance(plan, LayerPlan) and plan.backward is None
    ok = ok and (plan.k_split, plan.held_halves, plan.num_stages, plan.block_k) == (8, True, 2, 512)
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} layer lstm H=1024 B=16 fp32, rows streamed, two stages: {plan}")
    # With a projection: the forward holds W_hh's rows over P (one stage), the backward streams half its rows over H,
    # whose three stages do not fit (it held them all before: 344 KB, the fallback).
    plan = layer_op.kernel_plan("lstm", 1024, 16, torch.float32, device, Variant(proj=256))
    ok = isinstance(plan, LayerPlan) and (plan.block_k, plan.num_stages, plan.for_backward().num_stages) == (512, 1, 2)
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} layer lstm H=1024 P=256 B=16 fp32, backward rows streamed: {plan}")
    _plan.force_plan(persistent=False)
    try:
        plan = layer_op.kernel_plan("gru", 64, 16, torch.float32, device, Variant(directions=2))
    finally:
        _plan.force_plan()
    ok = isinstance(plan, LayerPlan) and not plan.persistent
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} layer gru H=64 B=16 fp32 bidirectional, step by step: {plan}")
    failures += not _a_kernel_that_does_not_compile_is_a_fallback(layer_op, device)
    failures += not _a_first_launch_during_capture_loads_with_the_capture_relaxed(layer_op, device)
    print(f"{failures} failed")
    return int(failures > 0)


def _a_kernel_that_does_not_compile_is_a_fallback(layer_op, device) -> bool:
    """A kernel the installed Triton rejects (here a tagged backward given no ring) is a reason for the fallback,
    with the compiler's message, not an exception in the user's forward."""
    from tritonrnn import layer_run
    from tritonrnn.layer_run import Variant

    os.environ["TRITONRNN_EXCHANGE"] = "barrier"
    real = layer_run._warmup_calls

    def broken(*args):
        calls = real(*args)
        name, kernel, kwargs = calls[-1]
        return [*calls[:-1], (name, kernel, dict(kwargs, ring=None, TAGGED=True))]

    layer_run._warmup_calls = broken
    try:
        reason = layer_op.kernel_plan("gru", 48, 16, torch.bfloat16, device, Variant())
    finally:
        layer_run._warmup_calls = real
    ok = isinstance(reason, str) and "the backward kernel does not compile with Triton" in reason
    print(f"{'ok ' if ok else 'BAD'} a backward kernel that does not compile: {reason}")
    return ok


def _a_first_launch_during_capture_loads_with_the_capture_relaxed(layer_op, device) -> bool:
    """A kernel first launched while a CUDA graph is captured: ``_capture.launch`` loads its module through Triton's
    own loading code (the driver's load recorded here) with the thread's capture mode relaxed, puts the mode back,
    then launches; a second launch loads nothing. Checks that the Triton installed still loads as we call it."""
    from tritonrnn import _capture, layer_run
    from tritonrnn.layer_run import Variant

    mode, events = [0], []  # this thread's capture mode (0: global, torch's default), what the driver saw

    def exchange(pointer) -> int:  # cuThreadExchangeStreamCaptureMode: swap the thread's mode and *pointer
        mode[0], pointer._obj.value = pointer._obj.value, mode[0]
        return 0

    def load_binary(name, kernel, shared, device_index):
        events.append(("load", mode[0]))
        return 1, 2, 64, 0, 1024  # module, function, registers, spills, most threads

    os.environ["TRITONRNN_EXCHANGE"] = "barrier"
    plan = layer_op.kernel_plan("gru", 40, 16, torch.bfloat16, device, Variant())
    _, kernel, kwargs = layer_run._warmup_calls("gru", 40, torch.bfloat16, plan, Variant(), device)[0]
    grid = kwargs.pop("grid")
    _capture._exchange_function = lambda: exchange
    driver.active.utils.load_binary = load_binary
    driver.active.utils.unload_module = lambda module: None
    driver.active.launcher_cls = lambda src, metadata: lambda *args: events.append(("launch", mode[0]))
    torch.cuda.is_current_stream_capturing = lambda: True
    _capture.launch(kernel, grid, device, **kwargs)
    _capture.launch(kernel, grid, device, **kwargs)
    ok = events == [("load", 2), ("launch", 0), ("launch", 0)]
    print(f"{'ok ' if ok else 'BAD'} a first launch during capture loads relaxed, then launches: {events}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
