"""One device call on a lent GPU: stages in order of priority, each in its own process, inside a time budget.

    python3 -m perf.device_session [--plan first] [--stages probe,warm,...] [--budget 540] [--out DIR]

A session gets about 15 minutes of device time in all, starts included, and one command at most 10 (the device
tool's README): what matters most runs first, no stage may eat the others' time, and a hung kernel (a grid
barrier whose programs are not all resident would spin for ever) must cost one stage, not the call. So each stage
runs as a child process in its own session with a timeout (the whole process group is killed when it is spent,
which also ends its kernels), benchmarks stop starting configs when their share runs out and keep the rows they
measured, and whatever happened is packed into at most 8 files under $OUT (the tool brings back no more):
summary.md (each stage's status, time and the tail of its output; printed last), logs.tar.gz, reports.tar.gz
(the benchmark folders with their plots) and each benchmark's results.csv as <stage>.csv.

Plans (``--plan``): see PLANS. Stages: see STAGES; ``--stages`` runs a list of them instead of a plan.
The repository need not be installed there: children run from this tree (PYTHONPATH). The tree sent there
has no git history: set PERF_COMMIT to the commit it was sent from, for the rows' commit column.

A first call on a card, from this machine's checkout (the device tool; 600 s is one command's limit):
    PERF_COMMIT=<git rev-parse --short HEAD> python3 -m perf.device_session --plan first --budget 540
then, from the stages summary.md lists as skipped or failed, a second call while the machine is warm (Triton's
compiled kernels are still in its cache then): ``--stages tests,bars_tagged --budget <what is left>``. The machine
stays warm only some 30 s after a call and a session has 15 minutes of device time, starts included: that second
call must follow at once, and may not fit at all; the first plan's order is its priority.
A suite larger than one call (the quick suite, the README's baseline) continues where an earlier call stopped:
copy the <stage>.csv files that call brought back into an ignored folder of the checkout (perf/results/resume),
name it in the tool's carry, and pass ``--resume perf/results/resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable
# Seconds kept back from the budget for packing the files, and for a benchmark's report after its last config.
PACK_RESERVE_S = 15
REPORT_RESERVE_S = 25
MIN_STAGE_S = 20  # a stage with less time than this left is not started
INTERRUPT_GRACE_S = 10  # a stage past its time is interrupted this long before its end, then ended (run_stage)
TAIL_LINES = 30
MAX_CSV_FILES = 5  # with summary.md, logs.tar.gz and reports.tar.gz: the tool's 8 files
LOG_LIMIT_BYTES = 1 << 20  # per stage log in logs.tar.gz (the tool brings back files up to 16 MiB)
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's lines, left out of the summary's tails
# The switches of the bars_tagged and bars_fused stages, compiled in their own stage after the first plan's main ones
# (compiling them with the plain kernels took time from the GPU tier, and the plan seldom reaches their stages).
WARM_SWITCHES = ["TRITONRNN_EXCHANGE=tagged", "TRITONRNN_WAVEFRONT=fused"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage: at most ``cap_s`` seconds. ``bench``: a ``perf run`` of that suite (the command is built with the
    time left); else ``command`` as it is. ``env``: TRITONRNN_* switches for the stage."""

    cap_s: float
    command: tuple[str, ...] = ()
    bench: str = ""
    providers: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""


def _workers() -> list[str]:
    """Parallel pytest workers where pytest-xdist is there (kernels compile on the CPU, a few seconds each, so one
    worker per few cores pays; tests/conftest.py's ``-n auto`` picks the same)."""
    return ["-n", "auto"] if importlib.util.find_spec("xdist") is not None else []


def _pytest_gpu_command(xml: str) -> tuple[str, ...]:
    """The GPU tier, in parallel workers, each test killed after half the stage's time (at most 150 s) where
    pytest-timeout is there (a test that hangs then fails on its own, its worker is replaced, and the rest still
    run, where a hung test would otherwise hold its worker until the stage is spent)."""
    command = [PY, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-v", "-rfE", "--durations=15",
               f"--junitxml={xml}", *_workers()]  # fmt: skip
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout=@TEST_TIMEOUT@", "--timeout-method=thread"]
    return tuple(command)


def per_test_limit_s(stage_s: float) -> int:
    """One test's limit in a stage of ``stage_s`` seconds: half of it, within [20, 150] s."""
    return round(min(150.0, max(20.0, stage_s / 2)))


def _warm(*suites: str, switches: list[str] | None = None) -> tuple[str, ...]:
    command = [PY, "-m", "perf", "warm"]
    for suite in suites:
        command += ["--suite", suite]
    for entry in switches or ["-"]:
        command += ["--switches", entry]
    return tuple(command)


TAGGED = (("TRITONRNN_EXCHANGE", "tagged"),)
FUSED = (("TRITONRNN_WAVEFRONT", "fused"),)
STREAMS = (("TRITONRNN_WAVEFRONT", "1"),)
OURS = ("tritonrnn",)

STAGES: dict[str, Stage] = {
    "probe": Stage(75, (PY, "-m", "perf.probe"), note="card, barrier floor, one layer of each cell vs cuDNN"),
    "warm": Stage(150, _warm("bars"), note="compile the bars suite's kernels"),
    "bars": Stage(220, bench="bars", note="the issues' bars: tritonrnn vs cuDNN eager and graph"),
    "tests": Stage(240, _pytest_gpu_command("@LOGS@/gpu_tests.xml"), note="pytest -m gpu"),
    "widths": Stage(
        270,
        (PY, "-m", "perf.probe", "--widths"),
        note="the heuristics' widths, reduction chunks and batch tiles against others; float32 W_hh transposed or not",
    ),
    "warm_switches": Stage(
        150, _warm("bars", switches=WARM_SWITCHES), note="compile the bars suite's kernels under the two switches"
    ),
    "bars_tagged": Stage(90, bench="bars", providers=OURS, env=TAGGED, note="bars with the tagged exchange"),
    "bars_fused": Stage(90, bench="bars", providers=OURS, env=FUSED, note="bars with stacks in one launch"),
    "bars_streams": Stage(90, bench="bars", providers=OURS, env=STREAMS, note="bars with the stream wavefront"),
    "warm_quick": Stage(240, _warm("quick"), note="compile the quick suite's kernels"),
    "quick": Stage(540, bench="quick", note="the quick suite: the README table and the baseline"),
    "warm_more": Stage(
        240, _warm("persist", "stacks", "large", "short"), note="compile persist, stacks, large and short"
    ),
    "persist": Stage(240, bench="persist", note="where cuDNN runs its persistent kernel"),
    "stacks": Stage(180, bench="stacks", note="dropout and bidirectional overheads"),
    "large": Stage(180, bench="large", note="hidden sizes read in part every step"),
    "short": Stage(150, bench="short", note="short sequences: a call's fixed cost against cuDNN's"),
    "fuzz": Stage(
        180,
        (PY, "tests/fuzz.py", "--seed", "1", "--minutes", "2.5"),
        note="random modules and stacks vs torch.nn, gradients too (tests/fuzz.py)",
    ),
    "tune": Stage(
        300,
        (
            PY,
            *"-m tritonrnn.autotune --cells lstm --hidden 512 1024 --batch 16 64 --dtypes bf16 --export".split(),
            "@LOGS@/tuned_export.json",
        ),
        env=(("TRITONRNN_CACHE_DIR", "@LOGS@/tuned"),),
        note="tune a few bf16 LSTM keys: the tuner's cost and effect",
    ),
    "rest": Stage(
        240,
        (
            PY,
            *"-m pytest -q -p no:cacheprovider -m".split(),
            "not gpu",
            "--deselect",
            "tests/test_packaging.py",
            *_workers(),
        ),
        note="the CPU tier's tests on the GPU machine",
    ),
}

PLANS: dict[str, list[str]] = {
    # A first session on a card: is it sane, do the kernels run, what do they cost against the issues' bars; then
    # the whole GPU tier; then the widths the heuristics chose from compiles alone, timed against the others; then what
    # the two opt-in switches change on the same rows.
    "first": ["probe", "warm", "bars", "tests", "widths", "warm_switches", "bars_tagged", "bars_fused"],
    # The README's table and the committed baseline.
    "baseline": ["warm_quick", "quick"],
    "more": ["widths", "warm_more", "persist", "stacks", "large", "short", "fuzz"],
}


@dataclasses.dataclass
class Result:
    name: str
    status: str  # "ok", "exit N", "timed out after N s (killed)", "skipped: ..."
    seconds: float
    log: pathlib.Path | None
    note: str = ""


def run_stage(name: str, command: list[str], env: dict[str, str], timeout_s: float, log: pathlib.Path) -> Result:
    """Run ``command`` as its own process group with output to ``log``; end the group when ``timeout_s`` runs out.

    Ending it starts with an interrupt (SIGINT) ``INTERRUPT_GRACE_S`` before the end (a quarter of the time for short
    stages): pytest then still prints the tracebacks of the failures so far, their summary and its XML, which a
    SIGTERM loses (a process blocked in a hung kernel does not see it; the SIGTERM and SIGKILL that follow do)."""
    start = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=_stage_process)  # fmt: skip
        interrupt_at = timeout_s - min(INTERRUPT_GRACE_S, timeout_s / 4)
        try:
            code = child.wait(timeout=interrupt_at)
            status = "ok" if code == 0 else f"exit {code}"
            if _end_group(child):
                status += "; processes it left running were killed"
        except subprocess.TimeoutExpired:
            _end_group(child, interrupt_s=timeout_s - interrupt_at)
            status = f"timed out after {timeout_s:.0f} s (killed)"
    return Result(name, status, time.monotonic() - start, log)


def _stage_process() -> None:
    """In the stage's process before it starts: a process group of its own, which _end_group ends whole, in the
    command's session (a new session would outlive a command the device tool stops, holding the GPU until the machine
    goes back); SIGINT back to its default (a command started in the background of a shell script inherits SIGINT
    ignored, and so would the stage: Python then installs no KeyboardInterrupt handler)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _end_group(child: subprocess.Popen, grace_s: float = 3.0, interrupt_s: float = 0.0) -> bool:
    """End the stage's whole process group: the child and whatever it started (a worker left holding the GPU
    would slow or block the next stages). SIGTERM, then SIGKILL to all of it after ``grace_s``; with
    ``interrupt_s``, SIGINT first and that long to end (a process blocked in a kernel does not). Returns whether
    anything was still running."""
    signalled = False
    steps = [(signal.SIGINT, interrupt_s)] if interrupt_s > 0 else []
    for sig, wait_s in (*steps, (signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return signalled
        signalled = True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            child.poll()  # reap the child itself, so that it does not linger in the group
            try:
                os.killpg(child.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
    child.poll()
    return signalled


def child_env(stage: Stage, logs: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real kernels
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: v.replace("@LOGS@", str(logs)) for k, v in stage.env})
    return env


def stage_command(
    stage: Stage, name: str, timeout_s: float, logs: pathlib.Path, reports: pathlib.Path,
    resume: pathlib.Path | None = None,
) -> list[str]:  # fmt: skip
    """The stage's command line; a benchmark resumes from resume/<stage>.csv where that file exists."""
    if not stage.bench:
        limit = str(per_test_limit_s(timeout_s))
        return [part.replace("@LOGS@", str(logs)).replace("@TEST_TIMEOUT@", limit) for part in stage.command]
    command = [PY, "-m", "perf", "run", "--suite", stage.bench, "--out", str(reports / name),
               "--budget-s", f"{max(1.0, timeout_s - REPORT_RESERVE_S):.0f}"]  # fmt: skip
    if stage.providers:
        command += ["--providers", *stage.providers]
    if resume is not None and (resume / f"{name}.csv").is_file():
        command += ["--resume", str(resume / f"{name}.csv")]
    return command


def tail(path: pathlib.Path | None, lines: int = TAIL_LINES) -> str:
    if path is None or not path.is_file():
        return ""
    with open(path, "rb") as f:  # the end of the file only: a stage may have written megabytes
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace").replace("\r", "\n")  # tqdm redraws its bar with carriage returns
    kept = [line for line in text.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    return "\n".join(_clip(line) for line in kept[-lines:])


def _clip(line: str, width: int = 400) -> str:
    return line if len(line) <= width else f"{line[: width - 40]} ... [{len(line) - width + 40} characters cut]"


def trim_log(path: pathlib.Path, limit: int = LOG_LIMIT_BYTES) -> None:
    """Keep a log within ``limit`` bytes (its head and its tail, where the errors are), so that the logs' archive
    stays within what the device tool brings back."""
    size = path.stat().st_size
    if size <= limit:
        return
    with open(path, "rb") as f:
        head = f.read(limit // 4)
        f.seek(size - (limit - limit // 4))
        end = f.read()
    path.write_bytes(head + f"\n[... {size - len(head) - len(end)} bytes cut ...]\n".encode() + end)


def run_plan(names: list[str], budget_s: float, out: pathlib.Path, resume: pathlib.Path | None = None) -> list[Result]:
    """Run the stages ``names`` in order within ``budget_s`` seconds; logs under out/logs, reports under
    out/reports. A stage gets min(its cap, the time left) and is skipped with too little left. ``resume``: a
    folder of an earlier call's <stage>.csv files, whose complete configs the benchmarks keep."""
    deadline = time.monotonic() + budget_s - PACK_RESERVE_S
    logs, reports = out / "logs", out / "reports"
    logs.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        stage = STAGES[name]
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            results.append(Result(name, f"skipped: {left:.0f} s left", 0.0, None, stage.note))
            print(f"[device_session] {name}: skipped, {left:.0f} s left", flush=True)
            continue
        timeout_s = min(stage.cap_s, left)
        print(f"[device_session] {name} ({stage.note}): up to {timeout_s:.0f} s", flush=True)
        command = stage_command(stage, name, timeout_s, logs, reports, resume)
        result = run_stage(name, command, child_env(stage, logs), timeout_s, logs / f"{name}.log")
        result.note = stage.note
        results.append(result)
        print(f"[device_session] {name}: {result.status} in {result.seconds:.0f} s", flush=True)
        folder = reports / name
        left = deadline - time.monotonic()
        if stage.bench and (folder / "results.csv").is_file() and not (folder / "report.md").is_file() and left > 5:
            # Killed before its report: render the report of the rows it checkpointed.
            command = [PY, "-m", "perf", "report", str(folder)]
            results.append(run_stage(f"{name}_report", command, child_env(Stage(0), logs), min(60.0, left),
                                     logs / f"{name}_report.log"))  # fmt: skip
    return results


def bench_tables(reports: pathlib.Path, name: str) -> str:
    """A benchmark stage's rows as markdown: every config side by side, and for a stage run under switches, its
    tritonrnn times against those of the stage without switches on the same suite (same card, same call)."""
    import pandas as pd

    from perf import report
    from perf.schema import PerfError, read_results

    csv = reports / name / "results.csv"
    if not csv.is_file():
        return ""
    try:
        df = read_results(csv)
    except PerfError as error:  # a stage cut before its first row, say: the summary and the files still come back
        return f"(no table: {error})"
    parts = [report.config_table(df).to_markdown(index=False)]
    stage = STAGES.get(name)
    base = next((n for n, s in STAGES.items() if stage and s.bench == stage.bench and not s.env and not s.providers),
                None)  # fmt: skip
    if stage is not None and stage.env and base and (reports / base / "results.csv").is_file():
        try:
            other = read_results(reports / base / "results.csv")
        except PerfError as error:
            return "\n\n".join([*parts, f"(no comparison with {base}: {error})"])
        keys = ["cell", "dtype", "L", "B", "H", "T", "options", "pass"]
        ours = [
            d[(d["provider"] == "tritonrnn") & (d["status"] == "ok")].set_index(keys)["us_per_step_layer"].rename(n)
            for d, n in ((other, base), (df, name))
        ]
        joined = pd.concat(ours, axis=1, join="inner")
        joined["ratio"] = joined[name] / joined[base]
        parts.append(f"tritonrnn us/step/layer, {base} (default switches) vs {name}:\n\n"
                     + joined.reset_index().to_markdown(index=False, floatfmt=".3g"))  # fmt: skip
    return "\n\n".join(parts)


def summary(results: list[Result], budget_s: float, elapsed_s: float, reports: pathlib.Path) -> str:
    lines = [f"# device session: {len(results)} stages, {elapsed_s:.0f} s of a {budget_s:.0f} s budget", "",
             "| stage | status | s | what |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.note} |" for r in results]
    for result in results:
        try:
            tables = bench_tables(reports, result.name) if STAGES.get(result.name, Stage(0)).bench else ""
        except Exception as error:  # a table that cannot be made (a package missing there): the rest still comes back
            tables = f"(no table: {type(error).__name__}: {error})"
        text = tail(result.log, 8 if tables else TAIL_LINES)
        if text or tables:
            lines += ["", f"## {result.name}: {result.status}", "", "```", text, "```"]
            if tables:
                lines += ["", tables]
    return "\n".join(lines) + "\n"


def pack(out: pathlib.Path, results: list[Result], text: str) -> list[pathlib.Path]:
    """summary.md, logs.tar.gz, reports.tar.gz and each benchmark's results.csv (at most MAX_CSV_FILES) in
    ``out``; the folders they came from are removed. Returns the files."""
    files = [out / "summary.md"]
    reports = out / "reports"
    # In the plan's order (its priority), not the alphabet's; the rest stay in reports.tar.gz.
    csvs = [reports / r.name / "results.csv" for r in results if (reports / r.name / "results.csv").is_file()]
    if len(csvs) > MAX_CSV_FILES:
        left = ", ".join(c.parent.name for c in csvs[MAX_CSV_FILES:])
        text += f"\nOnly the first {MAX_CSV_FILES} results.csv come back as files; in reports.tar.gz only: {left}\n"
    files[0].write_text(text)
    for csv in csvs[:MAX_CSV_FILES]:
        target = out / f"{csv.parent.name}.csv"
        shutil.copyfile(csv, target)
        files.append(target)
    for log in (out / "logs").glob("*.log"):
        trim_log(log)
    for folder, archive in ((out / "logs", "logs.tar.gz"), (reports, "reports.tar.gz")):
        if folder.is_dir() and any(folder.iterdir()):
            with tarfile.open(out / archive, "w:gz") as tar:
                tar.add(folder, arcname=folder.name)
            files.append(out / archive)
        if folder.is_dir():
            shutil.rmtree(folder)
    return files


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m perf.device_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="first", choices=sorted(PLANS))
    parser.add_argument("--stages", help=f"comma-separated, instead of a plan: {', '.join(STAGES)}")
    parser.add_argument("--budget", type=_budget, default=540.0, help="seconds for all stages and the packing")
    parser.add_argument("--out", type=pathlib.Path, help="default $OUT, else perf/results/device_session")
    parser.add_argument(
        "--resume", type=pathlib.Path, metavar="DIR",
        help="an earlier call's <stage>.csv files (carried here): benchmarks keep their complete configs",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the plans and stages and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, stages in PLANS.items():
            print(f"plan {name}: {', '.join(stages)}")
        for name, stage in STAGES.items():
            print(f"stage {name:12} up to {stage.cap_s:4.0f} s: {stage.note}")
        return 0
    names = [n.strip() for n in args.stages.split(",") if n.strip()] if args.stages is not None else PLANS[args.plan]
    if not names:
        parser.error(f"--stages {args.stages!r} names no stage: choose from {', '.join(STAGES)}")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}: choose from {', '.join(STAGES)}")
    if args.resume is not None and not args.resume.is_dir():
        parser.error(f"--resume {args.resume}: not a folder (of an earlier call's <stage>.csv files)")
    if shutil.which("nvidia-smi") is None:
        print("perf.device_session: no nvidia-smi here: this runs on the lent GPU (the device tool)", file=sys.stderr)
        return 2
    out = args.out or pathlib.Path(os.environ.get("OUT") or ROOT / "perf" / "results" / "device_session")
    taken = [name for name in ("logs", "reports") if (out / name).exists()]
    if taken:  # pack() archives and removes them: never someone else's folders
        print(f"perf.device_session: {out} already has {' and '.join(taken)}/; choose an --out without them",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"perf.device_session: cannot use {out} for the results: {error.strerror}", file=sys.stderr)
        return 2
    start = time.monotonic()
    results = run_plan(names, args.budget, out, args.resume)
    try:
        text = summary(results, args.budget, time.monotonic() - start, out / "reports")
    except Exception as error:  # whatever fails here, the files must still be packed and come back
        text = "\n".join([f"# device session: the summary failed ({type(error).__name__}: {error})", "",
                          *(f"- {r.name}: {r.status}, {r.seconds:.0f} s" for r in results)]) + "\n"  # fmt: skip
    files = pack(out, results, text)
    print(text)
    print("files:", " ".join(str(f) for f in files))
    return 0 if all(r.status.startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
