"""Compile the kernels a suite will launch, in parallel processes, before the suite is timed.

    python -m perf warm --suite bars [--suite ...] [--switches TRITONRNN_EXCHANGE=tagged ...] [--jobs N]

A Triton kernel compiles on one CPU core when it is first launched, a few seconds for each variant (cell,
dtype, hidden size, batch tile, forward or backward, exchange...); a suite launches dozens, so on a lent GPU
with minutes to spend, compiling them one after another inside the timed run costs more than the run.
Each worker process runs tritonrnn's steps of its share of the configs once, at a few time steps (T and B are
never compile-time constants, so a short sequence compiles exactly the kernels of the long one), and Triton's
on-disk cache hands the compiled kernels to the later run. Each ``--switches`` entry is a set of TRITONRNN_*
variables (``NAME=VALUE[,NAME=VALUE]``, ``-`` for none) under which every config is warmed too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Sequence

from perf.schema import PASSES, PerfError
from perf.suites import Config

WARM_STEPS = 8


def parse_switches(text: str) -> dict[str, str]:
    """``NAME=VALUE[,NAME=VALUE]`` (TRITONRNN_* names only), or ``-`` for none."""
    if text.strip() == "-":
        return {}
    switches = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or not name.startswith("TRITONRNN_") or not value:
            raise PerfError(f"switches {text!r}: expected TRITONRNN_NAME=VALUE[,TRITONRNN_NAME=VALUE] or '-'")
        switches[name] = value
    return switches


def _warm_one(config: Config, switches: dict[str, str]) -> tuple[str, float, str]:
    """In a worker: tritonrnn's steps of ``config`` once at WARM_STEPS steps. Returns (label, seconds, error)."""
    import torch

    from perf import runner

    saved = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    start = time.perf_counter()
    error = ""
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case = runner.Case(dataclasses.replace(config, T=min(config.T, WARM_STEPS)), device)
        with runner.tritonrnn_log(None):
            for pass_ in config.passes:
                runner.make_step(case.ours, case.x, case.grad_out, pass_)()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # reported by the parent; the timed run meets (and records) the same error
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    label = f"{config.cell} {config.dtype} B{config.B} H{config.H} L{config.L} {config.options or ''}".strip()
    if switches:
        label += " [" + ",".join(f"{k}={v}" for k, v in switches.items()) + "]"
    return label, time.perf_counter() - start, error


def warm(configs: Sequence[Config], switch_sets: Sequence[dict[str, str]], jobs: int) -> list[tuple[str, float, str]]:
    """Run every (config, switches) pair once in ``jobs`` spawned processes; their results in submission order."""
    tasks = [(dataclasses.replace(c, passes=tuple(p for p in PASSES if p in c.passes)), s) for s in switch_sets
             for c in configs]  # fmt: skip
    # spawn: a forked child cannot use CUDA once the parent has touched it.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        futures = [pool.submit(_warm_one, config, switches) for config, switches in tasks]
        return [future.result() for future in futures]


def cores() -> int:
    """The cores this process may run on (a container or VM may allow fewer than the host has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs() -> int:
    """One worker per core but one (each holds a CUDA context: a few hundred MB of GPU memory)."""
    return max(1, cores() - 1)
