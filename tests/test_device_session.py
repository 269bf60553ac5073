"""The tools of a device call, on the CPU: stages killed at their time limit with everything they started,
stages skipped when the budget is spent, at most 8 files back, benchmarks that stop on a budget and keep their
rows, and the parallel warm-up of a suite's kernels."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time

import pandas as pd
import pytest
import torch

from perf import device_session, runner, schema, suites, warm
from perf.__main__ import main

TINY = {"name": "tiny", "cases": [{"cell": "gru", "dtype": "fp32", "B": 2, "H": 8, "T": 3, "L": 1, "passes": "fwd"},
                                  {"cell": "rnn_tanh", "dtype": "fp32", "B": 2, "H": 8, "T": 3, "L": 1}]}  # fmt: skip
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended; only its parent has not reaped it yet.
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_a_stage_past_its_time_is_killed_with_the_processes_it_started(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    start = time.monotonic()
    result = device_session.run_stage("hang", [sys.executable, "-c", script], dict(os.environ), 3.0,
                                      tmp_path / "hang.log")  # fmt: skip
    assert time.monotonic() - start < 30
    assert result.status == "timed out after 3 s (killed)"
    assert "started" in (tmp_path / "hang.log").read_text()
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
@pytest.mark.parametrize("stage_ends", ["hangs", "exits"])
def test_processes_a_stage_leaves_are_killed_even_if_they_ignore_sigterm(tmp_path, stage_ends):
    """A worker left running (one that ignores SIGTERM, too) would hold the GPU through the later stages."""
    pid_file = tmp_path / "grandchild.pid"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    script = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {stubborn!r}])\n"
        "time.sleep(0.5)\n"  # its handler is set
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n" + ("time.sleep(120)\n" if stage_ends == "hangs" else "")
    )
    result = device_session.run_stage("stage", [sys.executable, "-c", script], dict(os.environ), 4.0,
                                      tmp_path / "stage.log")  # fmt: skip
    if stage_ends == "hangs":
        assert result.status == "timed out after 4 s (killed)"
    else:
        assert result.status == "ok; processes it left running were killed"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--budget", "nan"], "not a positive number of seconds", id="budget-nan"),
        pytest.param(["--budget", "inf"], "not a positive number of seconds", id="budget-inf"),
        pytest.param(["--budget", "0"], "not a positive number of seconds", id="budget-0"),
        pytest.param(["--stages", ""], "names no stage", id="no-stages"),
        pytest.param(["--stages", ","], "names no stage", id="comma"),
        pytest.param(["--stages", "probe", "--resume", "{tmp}/absent"], "not a folder", id="resume"),
    ],
)
def test_session_arguments_are_checked_before_anything_runs(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        device_session.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_session_does_not_take_over_existing_folders(tmp_path, monkeypatch, capsys):
    """pack() archives and removes out/logs and out/reports: never ones that were there before."""
    monkeypatch.setattr(device_session.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    (tmp_path / "reports" / "mine").mkdir(parents=True)
    assert device_session.main(["--stages", "probe", "--out", str(tmp_path)]) == 2
    assert "already has reports/" in capsys.readouterr().err and (tmp_path / "reports" / "mine").is_dir()


def test_a_stage_records_its_exit_code_and_output(tmp_path):
    result = device_session.run_stage(
        "fails", [sys.executable, "-c", "print('to the log'); raise SystemExit(3)"], dict(os.environ), 30,
        tmp_path / "fails.log",
    )  # fmt: skip
    assert result.status == "exit 3"
    assert device_session.tail(result.log).endswith("to the log")


def test_a_stage_runs_in_a_group_of_its_own_inside_the_commands_session(tmp_path):
    """Its own process group, which the session ends whole; not a session of its own, which would outlive a command
    the device tool stops (holding the GPU until the machine goes back)."""
    probe = "import os; print(os.getsid(0), os.getpgid(0), os.getpid())"
    result = device_session.run_stage("ids", [sys.executable, "-c", probe], dict(os.environ), 30, tmp_path / "ids.log")
    sid, pgid, pid = map(int, device_session.tail(result.log).splitlines()[-1].split())
    assert result.status == "ok" and sid == os.getsid(0) and pgid == pid != os.getpgid(0)


def test_a_summary_that_fails_still_packs_the_files(tmp_path, monkeypatch, capsys):
    """A table that cannot be made (a package missing on the GPU machine) costs that table; a summary that fails
    outright costs the summary's detail: the files come back either way."""
    monkeypatch.setattr(device_session.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    stages = {"bench": device_session.Stage(30, (sys.executable, "-c", "print('ran')"), bench="smoke")}
    monkeypatch.setattr(device_session, "STAGES", stages)
    monkeypatch.setattr(device_session, "stage_command", lambda stage, *args: list(stage.command))

    def no_tabulate(*args):
        raise ImportError("Missing optional dependency 'tabulate'")

    monkeypatch.setattr(device_session, "bench_tables", no_tabulate)
    assert device_session.main(["--stages", "bench", "--out", str(tmp_path / "a")]) == 0
    text = (tmp_path / "a" / "summary.md").read_text()
    assert "| bench | ok |" in text and "(no table: ImportError" in text and "ran" in text
    monkeypatch.setattr(device_session, "summary", no_tabulate)
    assert device_session.main(["--stages", "bench", "--out", str(tmp_path / "b")]) == 0
    files = {f.name for f in (tmp_path / "b").iterdir()}
    assert {"summary.md", "logs.tar.gz"} <= files and "- bench: ok" in (tmp_path / "b" / "summary.md").read_text()


def test_stages_share_the_budget_in_order_and_are_skipped_when_it_is_spent(tmp_path, monkeypatch):
    # Deaf to the interrupt that comes first (as a process blocked in a kernel): it takes all its time.
    sleep = (sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)")
    stages = {
        "quick": device_session.Stage(30, (sys.executable, "-c", "print('done')"), note="prints"),
        "slow": device_session.Stage(300, sleep, note="sleeps past the budget"),
        "late": device_session.Stage(30, (sys.executable, "-c", "print('never')"), note="no time left"),
    }
    monkeypatch.setattr(device_session, "STAGES", stages)
    monkeypatch.setattr(device_session, "PACK_RESERVE_S", 0)
    monkeypatch.setattr(device_session, "MIN_STAGE_S", 2)
    start = time.monotonic()
    results = device_session.run_plan(["quick", "slow", "late"], 8.0, tmp_path)
    assert time.monotonic() - start < 30
    assert [r.status for r in results[:1]] == ["ok"]
    assert results[1].status.startswith("timed out after") and results[1].seconds < 9
    assert results[2].status.startswith("skipped:")
    text = device_session.summary(results, 8.0, time.monotonic() - start, tmp_path / "reports")
    assert "| late | skipped:" in text and "done" in text


def test_a_benchmark_cut_before_its_report_gets_the_report_of_its_rows(tmp_path, monkeypatch):
    """A benchmark stage killed at its time after checkpointing rows (the first GPU session's likely end): the
    session renders the report of those rows in a stage of its own, so they come back readable."""
    context = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", cuda="12.8", cudnn="91000",
                   tf32=False, switches="", commit="abc1234", timestamp="2026-12-07T00:00:00+00:00")  # fmt: skip
    config = dict(suite="bars", cell="lstm", dtype="bf16", B=16, H=512, T=512, L=1, input_size=512,
                  bidirectional=False, dropout=0.0, dropout_mode="standard", proj_size=0, options="")  # fmt: skip

    def row(provider: str, ms: float) -> dict:
        timings = dict(ms_median=ms, ms_p20=ms * 0.99, ms_p80=ms * 1.01, us_per_step_layer=ms * 1e3 / 512)
        measured = dict(peak_mem_mb=10.0, rel_err=1e-3, status="ok", note="")
        return {**config, "pass": "fwd", "provider": provider, **timings, **measured, **context}

    rows = [row("tritonrnn", 1.5), row("cudnn", 9.0)]
    csv = tmp_path / "reports" / "bench" / "results.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=schema.COLUMNS).to_csv(tmp_path / "rows.csv", index=False)
    # Its rows checkpointed, then deaf to the interrupt (as a process blocked in a kernel) until killed.
    write_then_hang = (
        "import shutil, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        f"shutil.copy({str(tmp_path / 'rows.csv')!r}, {str(csv)!r}); time.sleep(60)"
    )
    stage = device_session.Stage(4, (sys.executable, "-c", write_then_hang), bench="bars")
    monkeypatch.setattr(device_session, "STAGES", {"bench": stage})
    monkeypatch.setattr(device_session, "stage_command", lambda stage, *args: list(stage.command))
    monkeypatch.setattr(device_session, "PACK_RESERVE_S", 0)
    results = device_session.run_plan(["bench"], 90.0, tmp_path)
    assert [r.name for r in results] == ["bench", "bench_report"], results
    assert results[0].status.startswith("timed out after") and results[1].status == "ok", results
    text = (csv.parent / "report.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "6.00x" in text, text


def test_at_most_eight_files_come_back(tmp_path):
    logs, reports = tmp_path / "logs", tmp_path / "reports"
    logs.mkdir()
    (logs / "a.log").write_text("a")
    for k in range(7):
        (reports / f"bench{k}").mkdir(parents=True)
        (reports / f"bench{k}" / "results.csv").write_text("x")
        (reports / f"bench{k}" / "report.md").write_text("x")
    # in the plan's order (its priority), not the alphabet's
    results = [device_session.Result(f"bench{k}", "ok", 1.0, None) for k in (6, 5, 4, 3, 2, 1, 0)]
    files = device_session.pack(tmp_path, results, "summary")
    assert len(files) <= 8 and all(f.is_file() for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)
    assert (tmp_path / "summary.md").read_text().startswith("summary")
    assert "in reports.tar.gz only: bench1, bench0" in (tmp_path / "summary.md").read_text()
    assert {"logs.tar.gz", "reports.tar.gz", "bench6.csv", "bench2.csv"} <= {f.name for f in files}
    assert "bench0.csv" not in {f.name for f in files}


def test_a_flood_of_output_is_trimmed_in_the_logs_and_the_summary(tmp_path):
    """A stage that prints megabytes must not push logs.tar.gz past what the tool brings back (every stage's log
    would be lost) nor summary.md into megabytes of one line."""
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "noisy.log"
    log.write_bytes(b"first line\n" + os.urandom(3 << 20).hex().encode() + b"\nthe error at the end\n")
    tail = device_session.tail(log)
    assert tail.endswith("the error at the end") and len(tail) < 2000
    device_session.pack(tmp_path, [], "summary")
    import tarfile

    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        text = tar.extractfile("logs/noisy.log").read()
    assert len(text) <= device_session.LOG_LIMIT_BYTES + 100
    assert text.startswith(b"first line") and text.endswith(b"the error at the end\n") and b"bytes cut" in text


def test_every_plan_names_known_stages_and_benchmarks_name_shipped_suites():
    for plan in device_session.PLANS.values():
        assert set(plan) <= set(device_session.STAGES)
    for stage in device_session.STAGES.values():
        assert stage.cap_s <= 600 and (bool(stage.bench) != bool(stage.command))
        if stage.bench:
            suites.load(stage.bench)
    first = device_session.PLANS["first"]
    assert first[:2] == ["probe", "warm"]


def test_the_widths_probe_times_each_forced_width_and_reports_what_does_not_run(monkeypatch, capsys):
    """perf.probe --widths (a device session's ``widths`` stage) with the GPU's parts replaced: each width's fields
    are forced while its plan is made and its layer timed, and cleared after; a width whose kernels do not fit is
    said so and not timed; one that fails, or errs above 1.5x cuDNN, makes the exit code 1."""
    from perf import probe
    from tritonrnn import _plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe, "card", lambda: "a card")
    monkeypatch.setattr(probe.runner, "Case", lambda config, device: config)
    monkeypatch.setattr(probe, "WIDTH_CASES", [("lstm", 1024, "bf16", tuple(probe.WIDTHS))])
    monkeypatch.setattr(probe, "TRANSPOSED_CASES", [])
    monkeypatch.setattr(probe, "BATCH_TILE_CASES", [])
    seen = []

    def kernel_plan(cell, hidden, batch, dtype, device):
        seen.append(dict(_plan._forced_plan))
        if _plan._forced_plan.get("k_split") == 4:
            return "needs 300000 bytes of shared memory"
        return _plan.LayerPlan(16, 16, 1024, 64, 8, True, k_split=_plan._forced_plan.get("k_split", 8))

    def measure(case, provider, pass_):
        if provider == "tritonrnn" and _plan._forced_plan.get("block_h") == 32 and pass_ == "fwd+bwd":
            raise RuntimeError("an illegal memory access")
        error = 2e-3 if provider == "tritonrnn" and _plan._forced_plan.get("block_h") == 16 else 1e-3
        return dict(us_per_step_layer=3.0, rel_err=error)

    monkeypatch.setattr(probe.functional, "kernel_plan", kernel_plan)
    monkeypatch.setattr(probe.runner, "measure", measure)
    assert probe.widths() == 1
    assert seen == list(probe.WIDTHS.values()) and not _plan._forced_plan
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()[2:]}
    assert "| ok | 64 programs x 16 units, 8 chunk(s)" in lines["heuristics"]
    assert "FAILED RuntimeError: an illegal memory access" in lines["32 units"]
    assert "ERROR ABOVE 1.5x cuDNN" in lines["16 units"] and "ERROR ABOVE" in lines["16 units, 8 chunks"]
    assert "does not run here (needs 300000 bytes" in lines["32 units, 4 chunks"]


def test_the_widths_probe_times_float32_widths_in_ieee(monkeypatch, capsys):
    """The widths stage's float32 cases (the FMA dots in chunks or in one, _plan.fma_chunks): planned and timed in
    float32 with TF32 off for tritonrnn and cuDNN alike, judged against 1.5x cuDNN's error with a 1e-5 floor."""
    from perf import probe
    from tritonrnn import _plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe, "card", lambda: "a card")
    monkeypatch.setattr(probe.runner, "Case", lambda config, device: config)
    monkeypatch.setattr(probe, "WIDTH_CASES", [("gru", 256, "fp32", ("heuristics", "16 units"))])
    monkeypatch.setattr(probe, "TRANSPOSED_CASES", [])
    monkeypatch.setattr(probe, "BATCH_TILE_CASES", [])
    planned = []

    def kernel_plan(cell, hidden, batch, dtype, device):
        planned.append((dtype, _plan.tf32_matmul()))
        own = None if _plan._forced_plan else _plan.LayerPlan(16, 16, 256, 16, 8, True, num_stages=1, k_split=4)
        return _plan.LayerPlan(16, 16, 256, 16, 8, True, k_split=_plan._forced_plan.get("k_split", 8), backward=own)

    def measure(case, provider, pass_):
        assert case.dtype == "fp32" and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        one_chunk = provider == "tritonrnn" and _plan._forced_plan.get("k_split") == 1
        return dict(us_per_step_layer=5.0, rel_err=2e-5 if one_chunk else 1e-6)

    monkeypatch.setattr(probe.functional, "kernel_plan", kernel_plan)
    monkeypatch.setattr(probe.runner, "measure", measure)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the autouse fixture restores
    assert probe.widths() == 1
    assert planned == [(torch.float32, False)] * 2
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("gru fp32 B16 H256 T256 cuDNN")
    assert "| ok | 16 programs x 16 units, 8 chunk(s)" in lines[2]
    assert lines[2].endswith("; backward 4 chunk(s), 1 stage(s)")  # a backward plan of its own is said
    assert "16 units" in lines[3] and "ERROR ABOVE 1.5x cuDNN" in lines[3] and "1 chunk(s)" in lines[3]
    assert "backward" not in lines[3]


def test_the_widths_probe_times_batch_tiles_at_their_batch(monkeypatch, capsys):
    """The widths stage's batch-tile cases: cuDNN and each width timed at the case's batch (B=256), the 32-row tile
    forced while its plan is made and timed, its tile size said."""
    from perf import probe
    from tritonrnn import _plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe, "card", lambda: "a card")
    monkeypatch.setattr(probe.runner, "Case", lambda config, device: config)
    monkeypatch.setattr(probe, "WIDTH_CASES", [])
    monkeypatch.setattr(probe, "TRANSPOSED_CASES", [])
    monkeypatch.setattr(
        probe, "BATCH_TILE_CASES", [("lstm", 2048, "bf16", 256, ("heuristics", "32-row tiles, 2 stages"))]
    )
    planned, timed = [], []

    def kernel_plan(cell, hidden, batch, dtype, device):
        planned.append((batch, dict(_plan._forced_plan)))
        return _plan.LayerPlan(16, _plan._forced_plan.get("block_b", 16), 1024, 128, 8, True, k_split=8)

    def measure(case, provider, pass_):
        timed.append((provider, case.B, _plan._forced_plan.get("block_b")))
        return dict(us_per_step_layer=30.0, rel_err=1e-3)

    monkeypatch.setattr(probe.functional, "kernel_plan", kernel_plan)
    monkeypatch.setattr(probe.runner, "measure", measure)
    assert probe.widths() == 0
    assert planned == [(256, {}), (256, dict(block_b=32, num_stages=2))] and not _plan._forced_plan
    assert timed == [("cudnn", 256, None)] * 2 + [("tritonrnn", 256, None)] * 2 + [("tritonrnn", 256, 32)] * 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("lstm bf16 B256 H2048 T256 cuDNN")
    assert lines[2].endswith("1024 held rows, 16-row tiles") and lines[3].endswith("1024 held rows, 32-row tiles")


def test_the_widths_probe_times_float32_with_the_weights_transposed_and_row_major(monkeypatch, capsys):
    """The widths stage's float32 part: both layouts of the forward's W_hh timed with TF32 off, as the library would
    run each (layer_run.weights_transposed patched for the timing, restored after), and half the slice held in chunks
    (forced, cleared after); one erring makes the code 1."""
    from perf import probe
    from tritonrnn import _plan, layer_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe.runner, "Case", lambda config, device: config)
    monkeypatch.setattr(probe, "TRANSPOSED_CASES", [("gru", 512)])
    monkeypatch.setattr(_plan, "_sm_count", lambda index: 132)
    monkeypatch.setattr(probe.functional, "kernel_plan", lambda *args: _plan.plan_layer(*args))
    original = layer_run.weights_transposed
    seen = []

    def measure(case, provider, pass_):
        assert case.dtype == "fp32" and not torch.backends.cuda.matmul.allow_tf32
        transposed = layer_run.weights_transposed("gru", torch.float32)
        plan = probe.functional.kernel_plan("gru", 512, 16, torch.float32, torch.device("cuda", 0))
        seen.append((provider, transposed, plan.block_k, plan.held_halves))
        error = 3e-5 if provider == "tritonrnn" and not transposed else 1e-6
        return dict(us_per_step_layer=9.0, rel_err=error)

    monkeypatch.setattr(probe.runner, "measure", measure)
    assert probe.transposed(torch.device("cuda", 0)) == 1
    assert layer_run.weights_transposed is original and not _plan._forced_plan
    ours = [row for provider, *row in seen if provider == "tritonrnn"]
    assert ours == [[True, 512, True]] * 2 + [[False, 512, True]] * 2 + [[True, 256, False]] * 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gru fp32 B16 H512 T256 cuDNN")
    assert "W_hh transposed" in lines[1] and "| ok" in lines[1] and "8 chunk(s)" in lines[1]
    assert "W_hh row-major" in lines[2] and "ERROR ABOVE 1.5x cuDNN" in lines[2]
    assert "256 held, 8 chunks" in lines[3] and "8 chunk(s), 8 warps, 3 stage(s), 256 held rows" in lines[3]


def test_the_session_refuses_to_run_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(device_session.shutil, "which", lambda name: None)
    assert device_session.main(["--plan", "first"]) == 2
    assert "lent GPU" in capsys.readouterr().err


def test_a_benchmark_stops_at_its_deadline_and_checkpoints_its_rows(tmp_path, monkeypatch):
    """No config starts past the deadline: one that passes during the first config leaves the second unmeasured, and
    the checkpoint holds the first config's rows once it is done (read while the second is measured in a full run)."""
    suite = suites.parse(TINY)
    providers = runner.select_providers(None, DEVICE)
    checkpoint = tmp_path / "results.csv"
    rows, left = runner.run_suite(suite, providers, DEVICE, deadline=time.monotonic() - 1, checkpoint=checkpoint)
    assert rows.empty and left == 2 and not checkpoint.exists()

    class Clock:
        """time, with a monotonic clock that the first measurement moves past the deadline."""

        now = 0.0

        def __getattr__(self, name):
            return getattr(time, name)

        def monotonic(self) -> float:
            return self.now

    clock, measure, during_second = Clock(), runner.measure, []

    def measured(case, provider, pass_):
        if case.config.cell == "rnn_tanh" and not during_second:
            during_second.append(schema.read_results(checkpoint))
        result = measure(case, provider, pass_)
        clock.now = 10.0
        return result

    monkeypatch.setattr(runner, "time", clock)
    monkeypatch.setattr(runner, "measure", measured)
    rows, left = runner.run_suite(suite, providers, DEVICE, deadline=5.0, checkpoint=checkpoint)
    assert left == 1 and len(rows) == len(providers) and set(rows["cell"]) == {"gru"}  # the first: one pass
    pd.testing.assert_frame_equal(schema.read_results(checkpoint), schema.read_results(_csv(rows, tmp_path)))

    checkpoint.unlink()
    rows, left = runner.run_suite(suite, providers, DEVICE, checkpoint=checkpoint)
    assert left == 0 and len(rows) == 3 * len(providers)
    pd.testing.assert_frame_equal(schema.read_results(checkpoint), schema.read_results(_csv(rows, tmp_path)))
    first = rows[rows["cell"] == "gru"].reset_index(drop=True)
    assert len(during_second) == 1 and len(during_second[0]) == len(first)
    assert list(during_second[0]["provider"]) == list(first["provider"])


def _csv(rows: pd.DataFrame, tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "returned.csv"
    rows.to_csv(path, index=False)
    return path


def test_a_run_whose_budget_ends_before_the_first_config_says_so(tmp_path, capsys, monkeypatch):
    import perf.__main__

    class HourAgo:
        """time, with a monotonic clock an hour behind: the deadline is set from it, so it has passed."""

        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def monotonic() -> float:
            return time.monotonic() - 3600

    suite_file = tmp_path / "tiny.json"
    suite_file.write_text(json.dumps(TINY))
    monkeypatch.setattr(perf.__main__, "time", HourAgo())
    assert main(["run", "--suite", str(suite_file), "--out", str(tmp_path / "out"), "--budget-s", "5"]) == 2
    assert "nothing measured: the budget of 5 s ran out" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["0", "-3", "soon"])
def test_a_budget_must_be_a_positive_number_of_seconds(budget, capsys):
    assert main(["run", "--suite", "smoke", "--budget-s", budget]) == 2
    assert "positive number of seconds" in capsys.readouterr().err


def test_warm_runs_each_config_under_each_switch_set_in_worker_processes(tmp_path, capsys):
    suite_file = tmp_path / "tiny.json"
    suite_file.write_text(json.dumps(TINY))
    argv = ["warm", "--suite", str(suite_file), "--switches", "-", "--switches", "TRITONRNN_EXCHANGE=tagged",
            "--jobs", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warmed 4 of 4 (config, switches) pairs" in out and "with 2 processes" in out


def test_warm_reports_a_config_that_fails(tmp_path):
    config = suites.parse(TINY).configs[0]
    results = warm.warm([config], [{"TRITONRNN_EXCHANGE": "bogus"}], jobs=1)
    assert len(results) == 1
    label, seconds, error = results[0]
    assert "TRITONRNN_EXCHANGE=bogus" in label and "TRITONRNN_EXCHANGE should be one of" in error


@pytest.mark.parametrize("text", ["EXCHANGE=tagged", "TRITONRNN_EXCHANGE", "TRITONRNN_X=", ""])
def test_warm_switches_are_checked(text):
    with pytest.raises(schema.PerfError, match="expected TRITONRNN_NAME=VALUE"):
        warm.parse_switches(text)
    assert warm.parse_switches("-") == {}
    assert warm.parse_switches("TRITONRNN_EXCHANGE=tagged,TRITONRNN_WAVEFRONT=fused") == {
        "TRITONRNN_EXCHANGE": "tagged", "TRITONRNN_WAVEFRONT": "fused"}  # fmt: skip


def test_summary_of_a_switch_stage_sets_its_times_beside_the_default_run(tmp_path):
    suite = suites.parse(TINY)
    base, _ = runner.run_suite(suite, runner.select_providers(None, DEVICE), DEVICE)
    switched = base[base["provider"] == "tritonrnn"].copy()
    switched["us_per_step_layer"] *= 2
    for name, rows in (("bars", base), ("bars_tagged", switched)):
        (tmp_path / name).mkdir()
        rows.to_csv(tmp_path / name / "results.csv", index=False)
    text = device_session.bench_tables(tmp_path, "bars_tagged")
    assert "bars (default switches) vs bars_tagged" in text
    ratios = [line for line in text.splitlines() if line.startswith("| gru") or line.startswith("| rnn_tanh")]
    assert len(ratios) == 3 + 3 and all(line.split("|")[-2].strip() == "2" for line in ratios[3:])


def test_a_run_resumes_from_the_complete_configs_of_an_earlier_one(tmp_path, monkeypatch):
    suite = suites.parse(TINY)
    providers = runner.select_providers(None, DEVICE)
    earlier, _ = runner.run_suite(suite, providers, DEVICE)
    path = tmp_path / "earlier.csv"
    earlier.to_csv(path, index=False)
    done = schema.read_results(path)
    # Complete: nothing is measured again, and the rows are the earlier ones.
    monkeypatch.setattr(runner, "measure", lambda *args: pytest.fail("measured a config that was complete"))
    rows, left = runner.run_suite(suite, providers, DEVICE, done=done)
    assert left == 0
    pd.testing.assert_frame_equal(schema.read_results(_csv(rows, tmp_path)), done)
    # The second config's training row failed: that config (both its passes, every provider) is measured again.
    broken = done.copy()
    broken.loc[(broken["cell"] == "rnn_tanh") & (broken["pass"] == "fwd+bwd"), "status"] = "error: earlier"
    measured = []
    monkeypatch.setattr(runner, "measure", lambda case, provider, pass_: measured.append((provider, pass_)) or dict(
        ms_median=1.0, ms_p20=1.0, ms_p80=1.0, us_per_step_layer=1.0, peak_mem_mb=1.0, rel_err=0.0, status="ok",
        note=""))  # fmt: skip
    rows, left = runner.run_suite(suite, providers, DEVICE, done=broken)
    assert sorted(measured) == sorted((p, q) for p in providers for q in ("fwd", "fwd+bwd"))
    assert len(rows) == len(done) and (rows["status"] == "ok").all()


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("gpu", "Some Other GPU", "measured on Some Other GPU"),
        ("switches", "TRITONRNN_WAVEFRONT=fused", "measured with switches 'TRITONRNN_WAVEFRONT=fused'"),
        ("triton", "3.1.0", "measured with triton '3.1.0'"),
    ],
)
def test_rows_of_another_gpu_or_setup_are_not_resumed_from(column, value, message, tmp_path):
    """Rows measured elsewhere, under other switches or versions, do not belong in one run with this one's."""
    suite = suites.parse(TINY)
    providers = runner.select_providers(None, DEVICE)
    earlier, _ = runner.run_suite(suite, providers, DEVICE)
    earlier[column] = value
    with pytest.raises(schema.PerfError, match=message):
        runner.run_suite(suite, providers, DEVICE, done=earlier)


def test_benchmark_stages_resume_from_a_carried_folder(tmp_path):
    stage = device_session.STAGES["quick"]
    logs, reports, resume = tmp_path / "logs", tmp_path / "reports", tmp_path / "resume"
    command = device_session.stage_command(stage, "quick", 300, logs, reports, resume)
    assert "--resume" not in command and command[command.index("--budget-s") + 1] == "275"
    resume.mkdir()
    (resume / "quick.csv").write_text("rows")
    command = device_session.stage_command(stage, "quick", 300, logs, reports, resume)
    assert command[-2:] == ["--resume", str(resume / "quick.csv")]
    assert "--resume" not in device_session.stage_command(device_session.STAGES["bars"], "bars", 300, logs, reports,
                                                          resume)  # fmt: skip


def test_run_command_resumes_from_a_results_file(tmp_path, monkeypatch):
    suite_file = tmp_path / "tiny.json"
    suite_file.write_text(json.dumps(TINY))
    assert main(["run", "--suite", str(suite_file), "--out", str(tmp_path / "first")]) == 0
    monkeypatch.setattr(runner, "measure", lambda *args: pytest.fail("measured a config that was complete"))
    argv = ["run", "--suite", str(suite_file), "--out", str(tmp_path / "again"), "--resume",
            str(tmp_path / "first" / "results.csv")]  # fmt: skip
    assert main(argv) == 0
    pd.testing.assert_frame_equal(
        schema.read_results(tmp_path / "again" / "results.csv"), schema.read_results(tmp_path / "first" / "results.csv")
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_a_stage_past_its_time_is_interrupted_before_it_is_ended(tmp_path):
    """A stage cut by its time gets SIGINT first, and time to report (pytest prints its failures' tracebacks, their
    summary and its XML on an interrupt, and loses them to a SIGTERM; perf/NOTES.md), then what is left is ended;
    also where the session itself was started with SIGINT ignored."""
    script = (
        "import time\n"
        "print('started', flush=True)\n"
        "try:\n    time.sleep(120)\n"
        "except KeyboardInterrupt:\n    print('interrupted', 'in time', flush=True)\n"  # the log echoes the script
    )
    # As where the session runs in the background of a shell script (CI, perhaps the device tool): SIGINT ignored,
    # which a child inherits unless the stage restores it.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time.monotonic()
        result = device_session.run_stage("cut", [sys.executable, "-c", script], dict(os.environ), 8.0,
                                          tmp_path / "cut.log")  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, before)
    assert time.monotonic() - start < 20
    assert result.status == "timed out after 8 s (killed)"
    assert "interrupted in time" in (tmp_path / "cut.log").read_text()


def test_one_tests_limit_is_half_its_stages_time_within_bounds(tmp_path):
    stage = device_session.Stage(240, ("pytest", "--timeout=@TEST_TIMEOUT@", "--junitxml=@LOGS@/x.xml"))
    for stage_s, limit in ((400, 150), (240, 120), (100, 50), (30, 20)):
        command = device_session.stage_command(stage, "tests", stage_s, tmp_path, tmp_path)
        assert command == ["pytest", f"--timeout={limit}", f"--junitxml={tmp_path}/x.xml"]


@pytest.mark.parametrize("content", ["", ",".join(schema.COLUMNS) + "\n", "cell,dtype\nlstm,bf16,extra,fields\n"])
def test_a_benchmark_cut_before_its_first_row_still_gets_a_summary(tmp_path, content):
    """A results.csv with no rows, or one cut mid-line, is named in the summary instead of stopping it (the files
    are packed after the summary)."""
    for name in ("bars", "bars_tagged"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text(content)
    results = [device_session.Result(n, "timed out after 9 s (killed)", 9.0, None) for n in ("bars", "bars_tagged")]
    text = device_session.summary(results, 60.0, 20.0, tmp_path)
    assert text.count("(no table: ") == 2 and "| bars | timed out" in text
