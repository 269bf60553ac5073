"""The host code of a call, without a GPU: what a decoder calling one step at a time pays before its kernels run.

    python -m perf.host_cost [--cells lstm gru rnn_tanh] [--layers 1 3] [--dtype bf16] [--calls 1000] [--rounds 5]

Runs tritonrnn's modules on CPU tensors with the Triton interpreter's plan and every Triton launch replaced by a
function that does nothing, at T=1, B=4, H=32 (bf16 by default, as on a GPU), so what is timed is the library's
Python and the torch operations around the kernels (allocations, the input GEMM, copies). Per cell and layer count,
for an inference call (no grad) and a training step (forward and backward): the median over rounds of the mean time
per call, and the torch operations a GPU would see (views, host only, not counted), as allocations without a kernel
+ kernel launches: the CPU pays for each (the dispatcher, the caching allocator, a launch). The Triton launches
themselves are not in it (Triton's launcher: some 20 us of Python each on the session machine, perf/NOTES.md), nor
the time a GPU runs. The TRITONRNN_* switches of the environment apply. Compare versions only on the same machine in
the same hour: the figures are a 2-core CPU's and move with its load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

CELLS = ("lstm", "gru", "rnn_tanh")
DTYPES = ("bf16", "fp16", "fp32")
T, B, HIDDEN = 1, 4, 32


def _interpreter_on() -> None:
    """The Triton interpreter's plan (no GPU needed): set before triton is imported, or already set."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("perf.host_cost runs with the Triton interpreter: start it as its own process")


@contextlib.contextmanager
def launches_stubbed() -> Iterator[None]:
    """Every Triton launch of a layer does nothing (the outputs are then garbage, which nothing here reads)."""
    from tritonrnn import fused_stack, layer_run

    def nothing(*args, **kwargs):
        return None

    with mock.patch.object(layer_run, "launch_kernel", nothing):
        with mock.patch.object(fused_stack, "launch_kernel", nothing):
            yield


def per_call_us(call: Callable[[], object], calls: int, rounds: int) -> float:
    """The median over ``rounds`` of the mean time of ``calls`` calls, after a warm-up, in microseconds."""
    for _ in range(max(1, calls // 10)):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
# Views make a new tensor header and nothing on the device; _unsafe_view is one that its schema does not mark.
HOST_ONLY = ("_unsafe_view",)


def device_ops(call: Callable[[], object]) -> tuple[int, int]:
    """The torch operations of one call that a GPU would see: (allocations without a kernel, kernel launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        allocations = kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ALLOCATIONS:
                self.allocations += 1
            elif not func.is_view and name not in HOST_ONLY:
                self.kernels += 1
            return func(*args, **(kwargs or {}))

    call()
    with Count() as counter:
        call()
    return counter.allocations, counter.kernels


def measure(cell: str, layers: int, dtype: str, calls: int, rounds: int) -> dict:
    import torch

    import tritonrnn

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    module = {"lstm": tritonrnn.LSTM, "gru": tritonrnn.GRU, "rnn_tanh": tritonrnn.RNN}[cell](HIDDEN, HIDDEN, layers)
    module = module.to(dtype)
    x = torch.randn(T, B, HIDDEN, dtype=dtype)
    x_grad = x.clone().requires_grad_()

    def inference():
        with torch.no_grad():
            module(x)

    def training_step():
        module(x_grad)[0].sum().backward()

    with launches_stubbed():
        return dict(
            cell=cell,
            layers=layers,
            inference_us=per_call_us(inference, calls, rounds),
            inference_ops=device_ops(inference),
            training_us=per_call_us(training_step, max(1, calls // 3), rounds),
            training_ops=device_ops(training_step),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.host_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--calls", type=int, default=1000, help="calls per round (a training step: a third of it)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or min(args.layers) < 1:
        parser.error("--calls, --rounds and --layers must be at least 1")
    _interpreter_on()
    import torch

    torch.set_num_threads(1)
    print(f"host code a call, T={T} B={B} H={HIDDEN} {args.dtype}, launches stubbed (torch {torch.__version__}, one "
          "thread)")  # fmt: skip
    print("(ops: allocations without a kernel + kernel launches, Triton's excepted)")
    print("cell      layers  inference us      ops  training step us      ops")
    for cell in args.cells:
        for layers in args.layers:
            row = measure(cell, layers, args.dtype, args.calls, args.rounds)
            inference, training = ("{:>2} + {:>2}".format(*row[key]) for key in ("inference_ops", "training_ops"))
            print(f"{cell:<9} {layers:>6}  {row['inference_us']:>12.1f}  {inference:>7}  "
                  f"{row['training_us']:>16.1f}  {training:>7}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
