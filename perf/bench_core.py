"""First benchmark: tritonrnn against cuDNN, forward and forward+backward.

    python -m perf.bench_core [--quick] [--out perf/results/core.csv]
    python -m perf.bench_core --smoke          # tiny sizes on the CPU (also what runs without a GPU)

Providers: ``tritonrnn``; ``cudnn`` (torch.nn eager, weights flattened); ``cudnn_graph`` (the same
call replayed from a CUDA graph: the strongest cuDNN). Matrix: LSTM/GRU/RNN x bf16/fp32 x 1 and 3
layers x B in {1, 16, 64, 256} x H in {256, 512, 1024}, T = 512, input size = H. Medians and 20/80
quantiles of ``triton.testing.do_bench`` (ms); fp32 runs with TF32 off for both torch flags (IEEE).
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

import tritonrnn

CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn": ("RNN", {"nonlinearity": "tanh"})}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _time_gpu(fn: Callable[[], object]) -> tuple[float, float, float]:
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=50, rep=200, quantiles=[0.5, 0.2, 0.8]))


def _time_cpu(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5)
    return statistics.median(times), q[0], q[-1]


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (after warm-up on a side stream, as torch's docs prescribe)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _passes(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    params = list(module.parameters())
    grad_out = torch.randn_like(module(x)[0])

    def forward():
        return module(x)

    def forward_backward():
        out, _ = module(x)
        return torch.autograd.grad(out, [x, *params], grad_out)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def bench_config(cell: str, dtype: torch.dtype, L: int, B: int, H: int, T: int, device: torch.device) -> list[dict]:
    name, kwargs = CELLS[cell]
    torch.manual_seed(0)
    ours = getattr(tritonrnn, name)(H, H, num_layers=L, **kwargs).to(device=device, dtype=dtype)
    theirs = getattr(nn, name)(H, H, num_layers=L, **kwargs).to(device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    theirs.flatten_parameters()
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    providers = {"tritonrnn": _passes(ours, x), "cudnn" if device.type == "cuda" else "torch_cpu": _passes(theirs, x)}
    if device.type == "cuda":
        providers["cudnn_graph"] = {p: _graphed(fn) for p, fn in _passes(theirs, x).items()}
    timer = _time_gpu if device.type == "cuda" else _time_cpu
    rows = []
    for provider, passes in providers.items():
        for pass_name, fn in passes.items():
            median, p20, p80 = timer(fn)
            rows.append(
                dict(cell=cell, dtype=str(dtype).removeprefix("torch."), L=L, B=B, H=H, T=T, pass_=pass_name,
                     provider=provider, ms_median=median, ms_p20=p20, ms_p80=p80,
                     us_per_step_layer=median * 1e3 / (T * L))
            )  # fmt: skip
    return rows


def summarize(df: pd.DataFrame) -> str:
    """Speedups of tritonrnn over each other provider, one line per config and pass."""
    keys = ["cell", "dtype", "L", "B", "H", "T", "pass_"]
    wide = df.pivot_table(index=keys, columns="provider", values="ms_median").reset_index()
    for provider in [c for c in wide.columns if c not in keys and c != "tritonrnn"]:
        wide[f"x_vs_{provider}"] = wide[provider] / wide["tritonrnn"]
    wide["tritonrnn_us_step_layer"] = wide["tritonrnn"] * 1e3 / (wide["T"] * wide["L"])
    return wide.to_markdown(index=False, floatfmt=".3g") if _has_tabulate() else wide.to_string(index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B in {16, 64}, H in {256, 512}, L=1 only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("perf/results/core.csv"))
    args = parser.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU: comparing tritonrnn's CPU path with torch.nn on the CPU at small sizes instead")
        args.smoke = True
    if args.smoke:
        device, T = torch.device("cpu"), 4
        matrix = itertools.product(["lstm", "gru"], ["fp32"], [1], [2], [16])
    else:
        device, T = torch.device("cuda"), 512
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if args.quick:
            matrix = itertools.product(CELLS, DTYPES, [1], [16, 64], [256, 512])
        else:
            matrix = itertools.product(CELLS, DTYPES, [1, 3], [1, 16, 64, 256], [256, 512, 1024])
    rows = []
    for cell, dtype, L, B, H in matrix:
        rows.extend(bench_config(cell, DTYPES[dtype], L, B, H, T, device))
        print(f"done {cell} {dtype} L={L} B={B} H={H}", flush=True)
    df = pd.DataFrame(rows)
    df["gpu"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    df["torch"] = torch.__version__
    df["triton"] = __import__("triton").__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(summarize(df))
    print(f"rows written to {args.out}")
    return df


if __name__ == "__main__":
    main()
