"""tritonrnn's benchmarks against cuDNN: run a suite, report it, compare two runs, refresh the README table.

    python -m perf run [--suite quick|bars|full|persist|stacks|large|short|cpu|smoke|PATH.json] [--out DIR]
                       [--providers ...] [--tf32] [--budget-s S] [--resume EARLIER.csv]
    python -m perf warm --suite NAME [--suite ...] [--switches TRITONRNN_X=V ...] [--jobs N]
    python -m perf report DIR
    python -m perf compare BASELINE.csv CURRENT.csv [--threshold PCT] [--out REPORT.md] [--allow-different-gpu]
    python -m perf readme [--write]

Without a CUDA GPU, ``run`` compares tritonrnn's CPU path with torch.nn on the CPU (the cpu suite when the one
asked for is GPU-sized, about half a minute): not a GPU benchmark.
Exit codes: 0 done; 1 compare found a tritonrnn regression; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

from perf import compare, readme_table, report, schema, suites
from perf.schema import PROVIDERS, PerfError, gpu_slug

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
CPU_SUITE = "cpu"  # what ``run`` measures instead of a GPU-sized suite without a GPU


def _run(args: argparse.Namespace) -> int:
    suite = suites.load(args.suite)
    # torch, triton and tritonrnn load here only: report, compare and readme work without them.
    import torch

    from perf import runner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    providers = runner.select_providers([p for item in args.providers or [] for p in item.split(",") if p], device)
    if device.type == "cpu" and not suite.cpu_sized:
        print(
            f"No CUDA GPU here: the {suite.name!r} suite is GPU-sized. Running the CPU comparison instead "
            f"(tritonrnn's CPU path against torch.nn on the CPU, the {CPU_SUITE!r} suite): not a GPU benchmark."
        )
        suite = suites.load(CPU_SUITE)
    out = args.out or RESULTS_DIR / suite.name
    _make_dir(out)
    csv = out / "results.csv"
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    done = schema.read_results(args.resume) if args.resume else None
    results, left = runner.run_suite(
        suite, providers, device, tf32=args.tf32, deadline=deadline, checkpoint=csv, done=done
    )  # fmt: skip
    if results.empty:
        raise PerfError(f"nothing measured: the budget of {args.budget_s:g} s ran out before the first config")
    results.to_csv(csv, index=False)
    markdown, html = report.write(out)
    print(report.summary_markdown(results))
    if left:
        print(f"\nbudget of {args.budget_s:g} s reached: {left} of {len(suite.configs)} configs not measured")
    print(f"\nrows: {csv}\nreport: {markdown}\n        {html}")
    if suite.name == "quick" and device.type == "cuda" and not left:
        slug = gpu_slug(results["gpu"].iloc[0])
        print(f"as this GPU's baseline (perf/baselines/README.md): cp {csv} perf/baselines/{slug}.csv")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _make_dir(path: pathlib.Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PerfError(f"cannot use {path} as the output folder: {error.strerror}") from None


def _warm(args: argparse.Namespace) -> int:
    from concurrent.futures.process import BrokenProcessPool

    from perf import warm

    configs = list({config.key(): config for name in args.suite for config in suites.load(name).configs}.values())
    switch_sets = [warm.parse_switches(text) for text in args.switches or ["-"]]
    if args.jobs is not None and args.jobs < 1:
        raise PerfError(f"--jobs must be >= 1, got {args.jobs}")
    jobs = args.jobs or warm.default_jobs()
    start = time.perf_counter()
    try:
        results = warm.warm(configs, switch_sets, jobs)
    except BrokenProcessPool as error:  # a worker died (a crash inside a launch): say so, do not hang or trace
        raise PerfError(f"a warm-up worker died: {error}") from None
    failed = [(label, error) for label, _, error in results if error]
    for label, error in failed:
        print(f"failed: {label}: {error}")
    label, seconds, _ = max(results, key=lambda r: r[1])
    elapsed = time.perf_counter() - start
    print(f"warmed {len(results) - len(failed)} of {len(results)} (config, switches) pairs in {elapsed:.0f} s "
          f"with {jobs} processes (slowest: {label}, {seconds:.0f} s)")  # fmt: skip
    return 0


def _report(args: argparse.Namespace) -> int:
    markdown, html = report.write(args.dir)
    print(f"report: {markdown}\n        {html}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    text, code = compare.compare_files(args.baseline, args.current, args.threshold, args.allow_different_gpu)
    print(text)
    if args.out:
        try:
            args.out.write_text(text)
        except OSError as error:
            raise PerfError(f"cannot write {args.out}: {error.strerror}") from None
        print(f"\nwritten to {args.out}")
    return code


def _readme(args: argparse.Namespace) -> int:
    table = readme_table.table(args.baselines)
    if not args.write:
        print(table)
        return 0
    readme_table.write(args.readme, table)
    print(f"updated the speed table in {args.readme}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="benchmark a suite; writes DIR/results.csv and the report")
    run.add_argument("--suite", default="quick", help=f"{', '.join(suites.available())}, or a suite .json file")
    run.add_argument("--out", type=pathlib.Path, help="output folder (default perf/results/<suite>)")
    run.add_argument("--providers", nargs="+", metavar="NAME", help=f"a subset of {', '.join(PROVIDERS)}")
    run.add_argument("--tf32", action="store_true", help="let fp32 use TF32 (default IEEE); recorded in the rows")
    run.add_argument(
        "--budget-s", type=_positive_seconds, metavar="S",
        help="start no config after S seconds (configs run in the suite's order; the rows so far are kept)",
    )  # fmt: skip
    run.add_argument(
        "--resume", type=pathlib.Path, metavar="CSV",
        help="an earlier results.csv of this GPU: its complete configs are kept, not measured again",
    )  # fmt: skip
    run.set_defaults(func=_run)

    warm = commands.add_parser("warm", help="compile the kernels of suites in parallel processes (Triton's cache)")
    warm.add_argument("--suite", action="append", required=True, help="a suite name or .json file; repeatable")
    warm.add_argument(
        "--switches", action="append", metavar="NAME=VALUE[,...]",
        help="TRITONRNN_* variables to warm under as well, or '-' for none (default: none); repeatable",
    )  # fmt: skip
    warm.add_argument("--jobs", type=int, help="worker processes (default: the cores but one)")
    warm.set_defaults(func=_warm)

    rep = commands.add_parser("report", help="(re)write DIR/report.md and DIR/report.html from DIR/results.csv")
    rep.add_argument("dir", type=pathlib.Path)
    rep.set_defaults(func=_report)

    cmp = commands.add_parser("compare", help="a run against a baseline; exit 1 if tritonrnn got slower")
    cmp.add_argument("baseline", type=pathlib.Path)
    cmp.add_argument("current", type=pathlib.Path)
    cmp.add_argument("--threshold", type=float, default=5.0, metavar="PCT", help="change that counts (default 5)")
    cmp.add_argument("--out", type=pathlib.Path, help="also write the markdown report here")
    cmp.add_argument("--allow-different-gpu", action="store_true", help="compare runs from different GPUs anyway")
    cmp.set_defaults(func=_compare)

    readme = commands.add_parser("readme", help="the README speed table from perf/baselines/*.csv")
    readme.add_argument("--write", action="store_true", help="replace the table between the markers in README.md")
    readme.add_argument("--baselines", type=pathlib.Path, default=readme_table.BASELINES_DIR)
    readme.add_argument("--readme", type=pathlib.Path, default=readme_table.README)
    readme.set_defaults(func=_readme)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and its message
        return int(exit_.code or 0)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a reader gone away is met here, not at exit
        return code
    except PerfError as error:
        print(f"perf: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly, as a shell tool does, and keep Python's
        # exit from writing its flush error to stderr.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the shell's code for it


if __name__ == "__main__":
    sys.exit(main())
