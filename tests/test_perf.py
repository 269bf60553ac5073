"""perf/ tools at tiny sizes: the runner's rows, the report, compare's verdicts and exit codes, bad input.

The smoke suite runs once per module (tritonrnn under the Triton interpreter without a GPU); the other
tests work on copies of its results.csv.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pandas as pd
import pytest
import torch

import perf.__main__ as perf_cli
from perf import runner, schema, suites
from perf.__main__ import main
from perf.compare import classify

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()
PROVIDERS = set(schema.GPU_PROVIDERS if HAS_GPU else schema.CPU_PROVIDERS)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> pathlib.Path:
    """The folder of one smoke-suite run."""
    out = tmp_path_factory.mktemp("smoke")
    assert main(["run", "--suite", "smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def results(smoke) -> pd.DataFrame:
    return schema.read_results(smoke / "results.csv")


def _write(df: pd.DataFrame, path: pathlib.Path) -> pathlib.Path:
    df.to_csv(path, index=False)
    return path


def _tight(results: pd.DataFrame) -> pd.DataFrame:
    """The results with a narrow 20-80% band (1% either side), so a synthetic 30% change is outside the noise."""
    df = results.copy()
    df["ms_p20"], df["ms_p80"] = df["ms_median"] * 0.99, df["ms_median"] * 1.01
    return df


def _scaled(df: pd.DataFrame, mask: pd.Series, factor: float) -> pd.DataFrame:
    df = df.copy()
    for column in ["ms_median", "ms_p20", "ms_p80"]:
        df.loc[mask, column] *= factor
    return df


# --- suites ------------------------------------------------------------------------------------------------


def test_shipped_suites_expand_as_documented():
    quick = suites.load("quick")
    assert len(quick.configs) == 3 * 2 * 4 * 3
    assert {(c.L, c.T) for c in quick.configs} == {(3, 512)}
    assert all(c.input_size == c.H and c.passes == ("fwd", "fwd+bwd") for c in quick.configs)
    full = suites.load("full")
    assert {c.key() for c in quick.configs} <= {c.key() for c in full.configs}
    persist = suites.load("persist")
    assert {(c.cell, c.dtype, c.L, c.T) for c in persist.configs} == {("lstm", "fp16", 1, 1024)}
    assert len(persist.configs) == 3 * 4
    # dropout 0 with either mode is one config: no dropout, two dropout modes, then one layer two ways, then the
    # stack against one layer at B=16
    stacks = suites.load("stacks")
    # and that stack's training step over data (no dL/dx) beside the step with dL/dx, at B=16 and 256
    assert [c.options for c in stacks.configs] == [
        "", "dropout=0.3 standard", "dropout=0.3 variational", "", "bidirectional", "", "", "",
    ]  # fmt: skip
    assert [c.passes for c in stacks.configs] == [("fwd+bwd",)] * 5 + [
        ("fwd", "fwd+bwd"), ("fwd", "fwd+bwd", "train"), ("fwd+bwd", "train")
    ]  # fmt: skip
    assert [(c.B, c.L) for c in stacks.configs[-3:]] == [(16, 1), (16, 3), (256, 3)]
    assert all("train" not in c.passes for name in ("quick", "bars", "persist") for c in suites.load(name).configs)
    smoke = suites.load("smoke")
    assert smoke.cpu_sized and not quick.cpu_sized
    large = suites.load("large")
    assert {(c.dtype, c.H) for c in large.configs[:8]} == {("bf16", 2048), ("fp32", 1024)}
    # and one beyond the kernels, which tritonrnn keeps for its variational dropout (its layers on torch's op)
    assert [(c.H, c.L, c.options, c.passes) for c in large.configs[8:]] == [
        (3072, 2, "dropout=0.3 variational", ("fwd+bwd",))
    ]


def test_suite_cases_merge_passes_of_the_same_config():
    suite = suites.parse(
        {
            "name": "merge",
            "cases": [
                {"cell": "gru", "dtype": "fp32", "B": 1, "H": 8, "T": 2, "L": 1, "passes": "fwd"},
                {"cell": "gru", "dtype": "fp32", "B": [1, 2], "H": 8, "T": 2, "L": 1, "input_size": 8},
            ],
        }
    )
    assert [(c.B, c.passes) for c in suite.configs] == [(1, ("fwd", "fwd+bwd")), (2, ("fwd", "fwd+bwd"))]


def test_config_labels_name_the_projection_and_an_input_size_other_than_h():
    """A config's options (the label in the rows and the report) name proj_size, and input_size where it is not H."""
    case = {"cell": "lstm", "dtype": "bf16", "B": 1, "H": 16, "T": 2, "L": 2, "bidirectional": True, "dropout": 0.3,
            "proj_size": 4, "input_size": [16, 32]}  # fmt: skip
    configs = suites.parse({"name": "labels", "cases": [case]}).configs
    assert [c.options for c in configs] == [
        "bidirectional dropout=0.3 standard proj_size=4",
        "bidirectional dropout=0.3 standard proj_size=4 input_size=32",
    ]
    row = {**dataclasses.asdict(configs[1]), "options": configs[1].options}
    assert schema.label(row) == "lstm bf16 L2 B1 H16 T2 bidirectional dropout=0.3 standard proj_size=4 input_size=32"


# --- the runner ----------------------------------------------------------------------------------------------


def test_run_writes_one_row_per_config_pass_provider(results):
    smoke = suites.load("smoke")
    assert list(results.columns) == schema.COLUMNS
    assert len(results) == sum(len(c.passes) for c in smoke.configs) * len(PROVIDERS)
    assert set(results["provider"]) == PROVIDERS
    assert not results.duplicated(schema.ROW_KEYS).any()
    assert set(results["suite"]) == {"smoke"}
    # the only failure allowed: CUDA-graph capture of cuDNN's dropout, which torch may refuse
    failed = results[(results["status"] != "ok") & ~((results["provider"] == "cudnn_graph") & (results["dropout"] > 0))]
    assert failed.empty, failed[["options", "pass", "provider", "status"]]
    ran = schema.ok_rows(results)
    assert (ran["ms_median"] > 0).all()
    assert ((ran["ms_p20"] <= ran["ms_median"]) & (ran["ms_median"] <= ran["ms_p80"])).all()
    assert (ran["us_per_step_layer"] - ran["ms_median"] * 1e3 / (ran["T"] * ran["L"])).abs().max() < 1e-6
    assert ran["peak_mem_mb"].notna().all() if HAS_GPU else ran["peak_mem_mb"].isna().all()
    assert results["gpu"].iloc[0] == (torch.cuda.get_device_name() if HAS_GPU else "cpu")
    assert not results["tf32"].any()
    assert results["commit"].iloc[0] != ""


def test_run_errors_against_float64(results):
    ran = schema.ok_rows(results)
    assert (ran["dtype"] == "fp32").all()
    ours = ran[ran["provider"] == "tritonrnn"]
    assert (ours["rel_err"] < 1e-5).all(), ours[["options", "pass", "rel_err"]]
    # with dropout in training, tritonrnn is checked against its own float64 copy (same masks)
    dropout = ours[ours["dropout"] > 0]
    assert sorted(dropout["pass"]) == ["fwd+bwd", "fwd+bwd", "train"]
    assert (dropout["note"].str.contains("float64 copy of tritonrnn")).all()
    theirs = ran[ran["provider"] != "tritonrnn"]
    masked = theirs["dropout"] > 0
    assert (theirs[~masked]["rel_err"] < 1e-5).all()
    assert theirs[masked]["rel_err"].isna().all() and theirs[masked]["note"].str.contains("cannot be reproduced").all()


@pytest.mark.parametrize("layers", [1, 2])
def test_the_train_pass_is_the_training_step_without_the_inputs_gradient(layers):
    """The train pass runs the fwd+bwd step over an input without requires_grad: the same output and parameter
    gradients, bit for bit, for every provider, and no dL/dx (so the float64 check compares what is returned)."""
    config = suites.parse(
        {"name": "train", "cases": [{"cell": "gru", "dtype": "fp32", "B": 3, "H": 8, "T": 5, "L": layers}]}
    ).configs[0]
    case = runner.Case(config, torch.device("cpu"))
    for provider in ("tritonrnn", "torch_cpu"):
        module = case.module(provider)
        seen: list[bool] = []
        hook = module.register_forward_pre_hook(lambda _, inputs, seen=seen: seen.append(inputs[0].requires_grad))
        every = runner.make_step(module, case.x, case.grad_out, "fwd+bwd")()
        train = runner.make_step(module, case.x, case.grad_out, "train")()
        hook.remove()
        assert seen == [True, False]  # the module saw data: a backward that forms no dL/dx
        assert len(every) == 2 + len(list(module.parameters())) and len(train) == len(every) - 1
        assert all(torch.equal(a, b) for a, b in zip(train, [every[0], *every[2:]])), provider
    step = runner.make_step(case.ours, case.x, case.grad_out, "train")
    error, note = case.error("tritonrnn", "train", step)
    assert error < 1e-5 and note == ""


def test_a_slow_step_is_timed_ten_times_at_least(monkeypatch):
    """do_bench times a step of over 100 ms once: the runner times it again, long enough for ten calls, so the row
    has a noise band."""
    import triton.testing

    calls = []

    def do_bench(step, warmup, rep, return_mode):
        calls.append(rep)
        return [150.0] if len(calls) == 1 else [150.0 + k for k in range(int(rep // 150))]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    median, p20, p80 = runner.time_gpu(lambda: None)
    assert calls == [200, 1800.0] and (median, p20, p80) == pytest.approx((155.5, 152.2, 158.8))


def test_a_config_that_fails_gets_error_rows_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """A config that cannot be built (its every row) and a step that raises (its row alone) are recorded as errors
    with the exception's first line, never skipped; the other rows are measured, and the report lists the errors."""
    suite = {"name": "failing", "cases": [{"cell": ["gru", "rnn_tanh"], "dtype": "fp32", "B": 2, "H": 8, "T": 3,
                                           "L": 1}]}  # fmt: skip
    path = tmp_path / "failing.json"
    path.write_text(json.dumps(suite))
    real_case, real_measure = runner.Case, runner.measure

    def case(config, device):
        if config.cell == "gru":
            raise MemoryError("no room for the gru\nsecond line")
        return real_case(config, device)

    def measure(case, provider, pass_):
        if provider == "tritonrnn" and pass_ == "fwd":
            raise RuntimeError("the kernel failed")
        return real_measure(case, provider, pass_)

    monkeypatch.setattr(runner, "Case", case)
    monkeypatch.setattr(runner, "measure", measure)
    out = tmp_path / "out"
    assert main(["run", "--suite", str(path), "--out", str(out)]) == 0
    rows = schema.read_results(out / "results.csv")
    status = {(r["cell"], r["provider"], r["pass"]): r["status"] for _, r in rows.iterrows()}
    assert len(status) == 2 * len(PROVIDERS) * 2  # two configs, each provider, both passes
    assert {k: v for k, v in status.items() if k[0] == "gru"} == {
        ("gru", p, pass_): "error: MemoryError: no room for the gru"
        for p in PROVIDERS
        for pass_ in schema.DEFAULT_PASSES
    }
    assert status["rnn_tanh", "tritonrnn", "fwd"] == "error: RuntimeError: the kernel failed"
    assert [k for k, v in status.items() if v == "ok"] == [
        ("rnn_tanh", p, pass_) for p in sorted(PROVIDERS, key=list(schema.PROVIDERS).index)
        for pass_ in schema.DEFAULT_PASSES if (p, pass_) != ("tritonrnn", "fwd")
    ]  # fmt: skip
    errored = rows[rows["status"] != "ok"]
    assert errored[["ms_median", "rel_err"]].isna().all().all()
    assert "## Errors" in (out / "report.md").read_text()


@pytest.mark.fallback
def test_a_tritonrnn_module_handing_dropout_to_torch_nn_has_no_error_to_measure(monkeypatch):
    """Where tritonrnn's module hands a call to torch.nn (a hidden size beyond the kernels), its dropout masks are
    torch.nn's: a float64 copy of tritonrnn (its own masks) is no reference, and no error is measured (it would come
    out near 1, a false alarm in compare)."""
    from tritonrnn import functional

    config = suites.parse(
        {"name": "handed", "cases": [{"cell": "lstm", "dtype": "fp32", "B": 2, "H": 8, "T": 3, "L": 2, "dropout": 0.5}]}
    ).configs[0]
    case = runner.Case(config, torch.device("cpu"))
    step = runner.make_step(case.ours, case.x, case.grad_out, "fwd+bwd")
    assert case.error("tritonrnn", "fwd+bwd", step)[1] == runner.ERROR_VS_OWN_FLOAT64  # on the kernels: measured
    monkeypatch.setattr(functional, "kernel_plan", lambda *args: "too large for the kernels (test)")
    assert case.ours._unsupported(case.x) is not None
    error, note = case.error("tritonrnn", "fwd+bwd", step)
    assert error != error and note == runner.NO_ERROR_WITH_DROPOUT


def test_report_has_tables_overheads_and_embedded_plots(smoke):
    markdown = (smoke / "report.md").read_text()
    page = (smoke / "report.html").read_text()
    assert "## Summary" in markdown and "## Per config" in markdown
    overheads = markdown.split("## Stack overheads")[1].split("##")[0]
    assert "dropout 0.3 standard" in overheads and "dropout 0.3 variational" in overheads
    assert "bidirectional" in overheads
    assert ("CPU comparison, not a GPU benchmark" in markdown) is not HAS_GPU
    pngs = sorted((smoke / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert page.count('src="data:image/png;base64,') == len(pngs)
    # one batch size and one hidden size: those plots are skipped with a line, not an error
    assert "Latency vs batch size: skipped" in markdown


def test_report_command_regenerates_from_csv(smoke, tmp_path, capsys):
    """The same report from a copy of the rows; a plot left by an earlier report of the folder is removed."""
    folder = tmp_path / "copy"
    (folder / "plots").mkdir(parents=True)
    stale = folder / "plots" / "latency_vs_batch_size_of_an_earlier_run.png"
    stale.write_bytes(b"not this run's")
    (folder / "results.csv").write_bytes((smoke / "results.csv").read_bytes())
    assert main(["report", str(folder)]) == 0
    assert (folder / "report.md").read_text() == (smoke / "report.md").read_text()
    assert "report.html" in capsys.readouterr().out
    assert not stale.exists()
    assert sorted(p.name for p in (folder / "plots").iterdir()) == sorted(p.name for p in (smoke / "plots").iterdir())


def test_report_plots_latency_when_sizes_vary(results, tmp_path):
    """Synthetic rows over two batch and two hidden sizes: the latency plots appear."""
    rows = []
    for B in (2, 4):
        for H in (16, 32):
            part = results[(results["options"] == "") & (results["L"] == 1)].copy()
            part["B"], part["H"], part["input_size"] = B, H, H
            rows.append(part)
    folder = tmp_path / "sizes"
    folder.mkdir()
    _write(pd.concat(rows), folder / "results.csv")
    assert main(["report", str(folder)]) == 0
    names = [p.name for p in (folder / "plots").glob("*.png")]
    assert any(n.startswith("latency_vs_batch_size_lstm") for n in names)
    assert any(n.startswith("latency_vs_hidden_size_gru") for n in names)


def test_latency_plots_keep_input_sizes_apart(results, tmp_path):
    """Configs that differ in input size only are separate plots, not one line zig-zagging between them."""
    rows = []
    for B in (2, 4):
        for input_size in (16, 64):
            part = results[(results["options"] == "") & (results["L"] == 1)].copy()
            part["B"], part["H"], part["input_size"] = B, 16, input_size
            part["options"] = "" if input_size == 16 else "input_size=64"
            rows.append(part)
    folder = tmp_path / "inputs"
    folder.mkdir()
    _write(pd.concat(rows), folder / "results.csv")
    assert main(["report", str(folder)]) == 0
    lstm_plots = sorted(p.name for p in (folder / "plots").glob("latency_vs_batch_size_lstm*.png"))
    assert len(lstm_plots) == 2 and any("input-size-64" in n for n in lstm_plots), lstm_plots


def _report_table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the table under ``heading`` ("## Errors") in a markdown report, as {column: cell}."""
    section = markdown.split(f"\n{heading}\n")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_report_shows_failed_rows_missing_providers_and_gpu_memory(results, tmp_path):
    """A GPU run's rows as failures leave them: a tritonrnn row that errored is listed under Errors and shown as
    "error" (with no speedup or overhead from it); a provider that did not run a config shows "-"; a GPU run has
    peak memory columns."""
    df = results.assign(gpu="NVIDIA H100 80GB HBM3", peak_mem_mb=12.0)
    broken = (df["provider"] == "tritonrnn") & (df["L"] == 2) & (df["dropout"] == 0)  # the stack the dropouts need
    df.loc[broken, ["ms_median", "ms_p20", "ms_p80", "us_per_step_layer", "peak_mem_mb", "rel_err"]] = float("nan")
    df.loc[broken, "status"] = "error: RuntimeError: boom"
    other = sorted(set(df["provider"]) - {"tritonrnn"})[0]
    df = df[~((df["provider"] == other) & (df["cell"] == "gru") & (df["pass"] == "fwd"))]
    folder = tmp_path / "run"
    folder.mkdir()
    _write(df, folder / "results.csv")
    assert main(["report", str(folder)]) == 0
    markdown = (folder / "report.md").read_text()
    errors = [row for row in _report_table(markdown, "## Errors") if row["provider"] == "tritonrnn"]
    assert errors == [
        {"config": "lstm fp32 L2 B2 H16 T4", "pass": pass_, "provider": "tritonrnn",
         "status": "error: RuntimeError: boom"} for pass_ in ("fwd+bwd", "train")
    ]  # fmt: skip
    assert "<h2>Errors</h2>" in (folder / "report.html").read_text()
    configs = {(r["cell"], r["L"], r["options"], r["pass"]): r for r in _report_table(markdown, "## Per config")}
    stack = configs["lstm", "2", "", "fwd+bwd"]
    assert (stack["tritonrnn us/step"], stack[f"x vs {other}"], stack["tritonrnn MB"]) == ("error", "-", "-")
    gru = configs["gru", "1", "", "fwd"]
    assert (gru[f"{other} us/step"], gru[f"{other} rel_err"], gru[f"{other} MB"], gru["tritonrnn MB"]) == (
        "-", "-", "-", "12",
    )  # fmt: skip
    assert gru["tritonrnn us/step"] not in ("-", "error") and gru[f"x vs {other}"] == "-"
    # the dropout configs' plain counterpart errored: only the bidirectional overhead is left
    assert [row["feature"] for row in _report_table(markdown, "## Stack overheads")] == ["bidirectional"]


def test_speedup_plots_of_speedups_near_1x_have_fine_ticks(results, tmp_path, monkeypatch):
    """Speedups between 0.7x and 1.4x (tritonrnn about even with its baseline): the axis is marked at 0.6x to 1.5x,
    not at a lone 1x."""
    from perf import report

    df = schema.ok_rows(results).assign(ms_median=1.0)
    theirs = df["provider"] != "tritonrnn"
    df.loc[theirs, "ms_median"] = df.loc[theirs, "cell"].map({"lstm": 0.7, "gru": 1.4})
    ticks = {}

    def save(fig, path, caption):
        ticks[path.name] = list(fig.axes[0].get_xticks())
        report.plt.close(fig)
        return report.Image(path, caption)

    monkeypatch.setattr(report, "_save", save)
    report.plots(df, tmp_path)
    fine = [0.6, 0.7, 0.8, 1, 1.25, 1.5]
    assert ticks == {"speedup_fwd.png": fine, "speedup_fwd-bwd.png": fine, "speedup_train.png": fine}


def test_run_accepts_a_suite_file(tmp_path):
    path = tmp_path / "mine.json"
    case = {"cell": "rnn_relu", "dtype": "fp32", "B": 1, "H": 8, "T": 3, "L": 1, "passes": ["fwd"]}
    path.write_text(json.dumps({"name": "mine", "description": "one tiny config", "cases": [case]}))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(path), "--providers", "tritonrnn", "--out", str(out)]) == 0
    df = schema.read_results(out / "results.csv")
    assert df[["suite", "cell", "pass", "provider", "status"]].values.tolist() == [
        ["mine", "rnn_relu", "fwd", "tritonrnn", "ok"]
    ]


def test_a_run_out_of_budget_keeps_its_rows_and_says_how_many_configs_it_left(smoke, tmp_path, capsys):
    """--resume keeps every config but the last, and the budget is spent before that one starts: the run writes the
    rows it has and says how many configs it did not measure."""
    done = schema.read_results(smoke / "results.csv")
    kept = done[~done["bidirectional"]]
    # a config with a failed row (a GPU's cudnn_graph under dropout) is measured again: it is left too
    failed = done.loc[done["status"] != "ok", schema.CONFIG_KEYS].drop_duplicates()
    out = tmp_path / "out"
    argv = ["run", "--suite", "smoke", "--out", str(out), "--resume", str(_write(kept, tmp_path / "done.csv"))]
    assert main([*argv, "--budget-s", "1e-6"]) == 0
    assert f"budget of 1e-06 s reached: {1 + len(failed)} of 6 configs not measured" in capsys.readouterr().out
    assert len(schema.read_results(out / "results.csv")) == len(kept) - len(kept.merge(failed))


def test_warm_lists_the_pairs_it_could_not_warm(monkeypatch, capsys):
    """Each (config, switches) pair whose warm-up failed is listed with its error, and the count leaves it out. (The
    worker processes are stood in for here; test_device_session runs real ones.)"""
    from perf import warm

    calls = []

    def fake_warm(configs, switch_sets, jobs):
        calls.append((len(configs), switch_sets, jobs))
        return [("lstm fp32 B2 H16 L1", 2.0, ""), ("gru fp32 B2 H16 L1 [TRITONRNN_X=1]", 0.5, "ValueError: bad X")]

    monkeypatch.setattr(warm, "warm", fake_warm)
    assert main(["warm", "--suite", "smoke", "--switches", "TRITONRNN_X=1", "--jobs", "3"]) == 0
    assert calls == [(len(suites.load("smoke").configs), [{"TRITONRNN_X": "1"}], 3)]
    out = capsys.readouterr().out
    assert out.startswith("failed: gru fp32 B2 H16 L1 [TRITONRNN_X=1]: ValueError: bad X\n")
    assert "warmed 1 of 2 (config, switches) pairs" in out and "(slowest: lstm fp32 B2 H16 L1, 2 s)" in out


@pytest.mark.skipif(HAS_GPU, reason="the CPU comparison runs only without a GPU")
def test_run_of_a_gpu_suite_without_gpu_runs_the_cpu_comparison(tmp_path, capsys, monkeypatch):
    """The README's main command without a GPU runs the cpu suite (CPU-sized); here the smoke suite stands in for it
    to keep the test short."""
    assert perf_cli.CPU_SUITE == "cpu" and suites.load("cpu").cpu_sized
    monkeypatch.setattr(perf_cli, "CPU_SUITE", "smoke")
    assert main(["run", "--suite", "quick", "--providers", "torch_cpu", "--out", str(tmp_path)]) == 0
    assert "No CUDA GPU here" in capsys.readouterr().out
    df = schema.read_results(tmp_path / "results.csv")
    assert set(df["suite"]) == {"smoke"} and set(df["gpu"]) == {"cpu"}


# --- compare -------------------------------------------------------------------------------------------------


def test_compare_identical_files_pass(smoke, capsys):
    csv = str(smoke / "results.csv")
    assert main(["compare", csv, csv]) == 0
    assert "Result: PASS" in capsys.readouterr().out


def test_compare_flags_a_tritonrnn_slowdown(results, tmp_path, capsys):
    base = _tight(results)
    slower = _scaled(base, base["provider"] == "tritonrnn", 1.3)
    report = tmp_path / "compare.md"
    args = ["compare", str(_write(base, tmp_path / "b.csv")), str(_write(slower, tmp_path / "c.csv"))]
    assert main([*args, "--out", str(report)]) == 1
    text = report.read_text()
    assert "Result: FAIL" in text and "+30.0%" in text
    regressions = text.split("## tritonrnn slower (regressions)")[1].split("##")[0]
    assert regressions.count("| tritonrnn ") == (base["provider"] == "tritonrnn").sum()
    # a 30% change inside a wider noise band is not a regression
    noisy = base.copy()
    noisy["ms_p20"], noisy["ms_p80"] = noisy["ms_median"] * 0.5, noisy["ms_median"] * 2
    assert main(["compare", str(_write(noisy, tmp_path / "n.csv")), args[2]]) == 0
    capsys.readouterr()


def test_compare_reports_other_providers_as_drift(results, tmp_path, capsys):
    base = _tight(results)
    other = base["provider"] != "tritonrnn"
    slower = _scaled(base, other & (base["pass"] == "fwd+bwd"), 1.3)
    assert main(["compare", str(_write(base, tmp_path / "b.csv")), str(_write(slower, tmp_path / "c.csv"))]) == 0
    out = capsys.readouterr().out
    assert "Result: PASS" in out and "Other providers slower (environment drift, not a failure)" in out
    faster = _scaled(base, base["provider"] == "tritonrnn", 0.7)
    assert main(["compare", str(tmp_path / "b.csv"), str(_write(faster, tmp_path / "f.csv"))]) == 0
    assert "## Faster" in capsys.readouterr().out


def _ours_verdicts(base: pd.DataFrame, current: pd.DataFrame) -> set[str]:
    rows = classify(base, current, 5.0)
    return set(rows.loc[rows["provider"] == "tritonrnn", "verdict"])


def test_compare_judges_tritonrnn_errors_by_how_much_they_grew(results):
    """An error up fivefold, or up to 1e-2, is noise of the inputs; tenfold and past 1e-2 is broken."""
    base = _tight(results).assign(rel_err=1e-3)
    assert _ours_verdicts(base, base.assign(rel_err=5e-3)) == {"unchanged"}
    assert _ours_verdicts(base, base.assign(rel_err=9e-3)) == {"unchanged"}
    assert _ours_verdicts(base, base.assign(rel_err=2e-2)) == {"broken"}
    # Each condition alone is not enough: fiftyfold but below 1e-2, past 1e-2 but fourfold.
    small = base.assign(rel_err=1e-4)
    assert _ours_verdicts(small, small.assign(rel_err=5e-3)) == {"unchanged"}
    large = base.assign(rel_err=5e-3)
    assert _ours_verdicts(large, large.assign(rel_err=2e-2)) == {"unchanged"}


def test_compare_calls_a_row_faster_only_outside_the_noise(results):
    base = _tight(results)
    faster = _scaled(base, base["provider"] == "tritonrnn", 0.9)
    assert _ours_verdicts(base, faster) == {"faster"}
    noisy = base.assign(ms_p20=base["ms_median"] * 0.5, ms_p80=base["ms_median"] * 2)
    assert _ours_verdicts(noisy, _scaled(noisy, noisy["provider"] == "tritonrnn", 0.9)) == {"unchanged"}


def test_compare_weighs_a_slowdown_against_the_first_reference_measured(results):
    """tritonrnn 33% slower where its reference is 30% slower: within the 5% threshold of the machine's change. 50%
    slower: a regression. With a CUDA-graph cuDNN row unchanged in the same config, that reference decides, not the
    slower one after it."""
    base = _tight(results)
    ours, reference = base["provider"] == "tritonrnn", base["provider"] == "torch_cpu"
    assert reference.any()
    moved = _scaled(base, reference, 1.3)
    assert _ours_verdicts(base, _scaled(moved, ours, 1.33)) == {"slower with the reference"}
    assert _ours_verdicts(base, _scaled(moved, ours, 1.5)) == {"slower"}
    graph = base[reference].assign(provider="cudnn_graph")
    with_graph = pd.concat([base, graph], ignore_index=True)
    moved = pd.concat([_scaled(_scaled(base, reference, 1.3), ours, 1.33), graph], ignore_index=True)
    assert _ours_verdicts(with_graph, moved) == {"slower"}


def test_compare_fails_when_a_tritonrnn_row_breaks(results, tmp_path, capsys):
    broken = results.copy()
    broken.loc[broken.index[0], "status"] = "error: RuntimeError: boom"
    assert broken.loc[broken.index[0], "provider"] == "tritonrnn"
    assert main(["compare", str(_write(results, tmp_path / "b.csv")), str(_write(broken, tmp_path / "c.csv"))]) == 1
    assert "tritonrnn broken" in capsys.readouterr().out


def test_compare_refuses_different_gpus_unless_allowed(results, tmp_path, capsys):
    other = results.copy()
    other["gpu"] = "NVIDIA H200"
    args = ["compare", str(_write(results, tmp_path / "b.csv")), str(_write(other, tmp_path / "c.csv"))]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "NVIDIA H200" in err and repr(results["gpu"].iloc[0]) in err
    assert main([*args, "--allow-different-gpu"]) == 0
    assert "WARNING: different GPUs" in capsys.readouterr().out


def test_compare_refuses_files_that_are_not_results(results, tmp_path, capsys):
    good = str(_write(results, tmp_path / "good.csv"))
    missing = str(_write(results.drop(columns=["ms_p80"]), tmp_path / "missing.csv"))
    assert main(["compare", good, missing]) == 2
    assert "missing columns ms_p80" in capsys.readouterr().err
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("name,score\nalice,3\n")
    assert main(["compare", str(foreign), good]) == 2
    assert "not a perf results file" in capsys.readouterr().err
    bad_value = results.copy()
    bad_value["B"] = "many"
    assert main(["compare", good, str(_write(bad_value, tmp_path / "bad.csv"))]) == 2
    assert "column B must hold integers" in capsys.readouterr().err
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["compare", good, str(binary)]) == 2
    assert f"{binary}: not a results CSV" in capsys.readouterr().err


def _one_row_changed(results: pd.DataFrame, **fields) -> pd.DataFrame:
    """The results with ``fields`` set on the first tritonrnn row (status ok)."""
    df = results.astype({c: object for c in fields}).copy()
    first = df.index[(df["provider"] == "tritonrnn") & (df["status"] == "ok")][0]
    for column, value in fields.items():
        df.loc[first, column] = value
    return df


@pytest.mark.parametrize(
    "fields, message",
    [
        pytest.param(dict(B=2.5), "column B must hold integers >= 0, got '2.5'", id="fraction"),
        pytest.param(dict(B="inf"), "column B must hold integers >= 0, got 'inf'", id="infinite"),
        pytest.param(dict(H=1e30), "column H must hold integers >= 0", id="huge"),
        pytest.param(dict(T=-3), "column T must hold integers >= 0, got '-3'", id="negative-size"),
        pytest.param(dict(ms_median=0.0, ms_p20=0.0), "has status ok but timings", id="zero-ms"),
        pytest.param(dict(ms_median=-1.0, ms_p20=-1.0, ms_p80=-1.0), "has status ok but timings", id="negative-ms"),
        pytest.param(dict(ms_median=""), "has status ok but timings", id="empty-ms"),
        pytest.param(dict(ms_p20=1e9), "expected finite, positive and in that order", id="p20-above-median"),
        pytest.param(dict(rel_err="small"), "column rel_err must hold numbers, got 'small'", id="text-number"),
        pytest.param(
            dict(dropout=1.5), "column dropout (a config key) must hold numbers in [0, 1), got '1.5'", id="dropout"
        ),
        pytest.param(dict(bidirectional="yes"), "column bidirectional must hold True or False, got 'yes'", id="bool"),
        pytest.param(
            dict(provider="magic"),
            "column provider must be one of tritonrnn, cudnn, cudnn_graph, torch_cpu, got 'magic'",
            id="unknown-provider",
        ),
        pytest.param(dict(gpu="NVIDIA H200"), "rows from several GPUs (NVIDIA H200, ", id="several-gpus"),
        # the first tritonrnn row (lstm, one layer, fwd) made the fwd+bwd row that follows it
        pytest.param(
            {"pass": "fwd+bwd"}, "duplicate rows for lstm fp32 L1 B2 H16 T4 fwd+bwd tritonrnn", id="duplicate"
        ),
    ],
)
def test_results_with_impossible_values_are_refused(results, fields, message, tmp_path, capsys):
    bad = str(_write(_one_row_changed(results, **fields), tmp_path / "bad.csv"))
    assert main(["compare", str(_write(results, tmp_path / "good.csv")), bad]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.csv").write_bytes(pathlib.Path(bad).read_bytes())
    assert main(["report", str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_compare_refuses_runs_with_no_tritonrnn_row_in_common(results, tmp_path, capsys):
    """A comparison that compared nothing must not pass: no tritonrnn rows, or none of the same configs."""
    base = str(_write(results, tmp_path / "b.csv"))
    theirs_only = results[results["provider"] != "tritonrnn"]
    assert main(["compare", base, str(_write(theirs_only, tmp_path / "theirs.csv"))]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    other_sizes = results.copy()
    other_sizes["H"] += 1
    assert main(["compare", base, str(_write(other_sizes, tmp_path / "other.csv"))]) == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_compare_calls_out_version_and_tf32_differences(results, tmp_path, capsys):
    newer = results.copy()
    newer["torch"], newer["tf32"] = "9.9.9", ~newer["tf32"]
    assert main(["compare", str(_write(results, tmp_path / "b.csv")), str(_write(newer, tmp_path / "c.csv"))]) == 0
    out = capsys.readouterr().out
    banner = out.split("**WARNING: the runs differ in ")[1].split("\n")[0]
    assert f"torch {results['torch'].iloc[0]} -> 9.9.9" in banner and "tf32" in banner and "triton" not in banner


def test_compare_exits_quietly_when_its_reader_goes_away(smoke):
    """`python -m perf compare A B | head`: a reader that stops (here one that never reads) ends the command
    quietly, without a traceback or Python's flush error."""
    csv = str(smoke / "results.csv")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = f"{sys.executable!s} -m perf compare {csv} {csv} | true"
    result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.stderr == ""


# --- readme table -----------------------------------------------------------------------------------------------


def test_readme_without_baselines_says_so(tmp_path, capsys):
    assert main(["readme", "--baselines", str(tmp_path)]) == 0
    assert "No baseline has been committed yet" in capsys.readouterr().out


def test_readme_writes_between_the_markers(results, tmp_path, capsys):
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    gpu = results.assign(suite="quick", gpu="NVIDIA H100 80GB HBM3")
    _write(gpu, baselines / "nvidia-h100-80gb-hbm3.csv")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf-table:start -->\nold table\n<!-- perf-table:end -->\nrest\n")
    assert main(["readme", "--write", "--baselines", str(baselines), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- perf-table:start -->\n") and text.endswith("<!-- perf-table:end -->\nrest\n")
    assert "old table" not in text and "`perf/baselines/nvidia-h100-80gb-hbm3.csv`" in text
    readme.write_text("no markers\n")
    capsys.readouterr()
    assert main(["readme", "--write", "--baselines", str(baselines), "--readme", str(readme)]) == 2
    captured = capsys.readouterr()
    assert "| GPU | pass |" in captured.out and "marker" in captured.err
    assert readme.read_text() == "no markers\n"


def test_readme_table_lists_the_latencies_of_the_headline_configs(results, tmp_path, capsys):
    """A baseline holding a headline config (lstm bf16 B16 H512, 3 layers, T=512): its per-step latency for each pass,
    "-" for the provider it lacks."""
    ours = results[(results["provider"] == "tritonrnn") & (results["cell"] == "lstm") & (results["options"] == "")]
    ours = ours[ours["L"] == 1]
    theirs = ours.assign(provider="cudnn", ms_median=3.0, us_per_step_layer=2.5)
    rows = pd.concat([ours.assign(ms_median=2.0, us_per_step_layer=1.25), theirs], ignore_index=True)
    rows = rows.assign(suite="quick", gpu="NVIDIA H100 80GB HBM3", dtype="bf16", B=16, H=512, input_size=512, L=3,
                       T=512, ms_p20=rows["ms_median"], ms_p80=rows["ms_median"])  # fmt: skip
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    _write(rows, baselines / "nvidia-h100-80gb-hbm3.csv")
    assert main(["readme", "--baselines", str(baselines)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| NVIDIA H100 80GB HBM3 | fwd | 1.50x | - | 1 |" in lines
    latency = [line for line in lines if "| lstm bf16" in line]
    assert latency == [
        f"| NVIDIA H100 80GB HBM3 | lstm bf16 L3 B16 H512 T512 | {pass_} | 1.25 | 2.5 | - |" for pass_ in schema.PASSES
    ]


def test_readme_refuses_files_that_are_not_one_gpus_quick_baseline(results, tmp_path, capsys):
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    _write(results, baselines / "cpu.csv")
    assert main(["readme", "--baselines", str(baselines)]) == 2
    assert "not a baseline" in capsys.readouterr().err


def test_compare_fails_when_a_tritonrnn_row_is_gone(results, tmp_path, capsys):
    """A run killed on a hang, or cut by its budget, leaves rows out: those of tritonrnn fail the comparison."""
    first = results.index[results["provider"] == "tritonrnn"][0]
    assert main(["compare", str(_write(results, tmp_path / "b.csv")),
                 str(_write(results.drop(index=first), tmp_path / "c.csv"))]) == 1  # fmt: skip
    assert "tritonrnn gone" in capsys.readouterr().out


def test_compare_fails_when_tritonrnn_returns_garbage(results, tmp_path, capsys):
    wrong = results.copy()
    wrong.loc[wrong["provider"] == "tritonrnn", "rel_err"] = float("inf")
    assert main(["compare", str(_write(results, tmp_path / "b.csv")), str(_write(wrong, tmp_path / "c.csv"))]) == 1


def test_compare_does_not_blame_tritonrnn_for_a_slowdown_its_reference_shares(results, tmp_path, capsys):
    base = _tight(results)
    slower = _scaled(base, base["status"] == "ok", 1.3)
    assert main(["compare", str(_write(base, tmp_path / "b.csv")), str(_write(slower, tmp_path / "c.csv"))]) == 0
    assert "no more than cuDNN / torch" in capsys.readouterr().out


# --- bad input ---------------------------------------------------------------------------------------------------


def _suite_file(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "suite.json"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["run", "--suite", "nope"], "unknown suite 'nope'", id="unknown-suite"),
        pytest.param(["run", "--suite", "smoke", "--providers", "magic"], "unknown provider 'magic'", id="provider"),
        pytest.param(["report", "{tmp}/absent"], "no such folder", id="missing-dir"),
        pytest.param(["report", "{tmp}"], "results.csv: no such file", id="missing-results"),
        pytest.param(["compare", "{tmp}/a.csv", "{tmp}/b.csv"], "a.csv: no such file", id="missing-csv"),
        pytest.param(
            ["compare", "x.csv", "y.csv", "--threshold", "-1"], "--threshold must be a finite", id="threshold"
        ),
        pytest.param(["compare", "x.csv", "y.csv", "--threshold", "nan"], "--threshold must be a finite", id="nan"),
        pytest.param(["warm", "--suite", "smoke", "--jobs", "0"], "--jobs must be >= 1", id="jobs"),
        pytest.param(["run", "--suite", "{tmp}/absent.json"], "absent.json: no such file", id="missing-suite-file"),
        pytest.param(
            ["run", "--suite", "{tmp}/folder.json"], "folder.json: a folder, not a suite .json file", id="suite-folder"
        ),
        pytest.param(
            ["readme", "--write", "--baselines", "{tmp}", "--readme", "{tmp}/README.md"],
            "README.md: no such file",
            id="missing-readme",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_message(argv, message, tmp_path, capsys):
    (tmp_path / "folder.json").mkdir()
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _one_case(**fields) -> str:
    """A suite file's text with one case: a valid tiny GRU config changed by ``fields``."""
    case = {"cell": "gru", "dtype": "fp32", "B": 1, "H": 8, "T": 2, "L": 1, **fields}
    return json.dumps({"name": "x", "cases": [case]})


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param('{"name": "x", "cases": [', "not valid JSON", id="malformed"),
        pytest.param('["a"]', "expected a JSON object", id="not-an-object"),
        pytest.param('{"name": "x", "cases": [{"cell": "lstm"}]}', "case 1: missing fields", id="missing-field"),
        pytest.param(_one_case(hidden=3), "case 1: unknown fields ['hidden']", id="unknown-field"),
        pytest.param(_one_case(cell="lsmt"), "field 'cell': 'lsmt' is not one of", id="bad-cell"),
        pytest.param(_one_case(B=[1, 0]), "field 'B': 0 is not an integer >= 1", id="bad-size"),
        pytest.param(_one_case(L=2, dropout=1), "field 'dropout': 1 is not a number in [0, 1)", id="bad-dropout"),
        pytest.param(_one_case(proj_size=4), "proj_size applies to lstm only", id="proj-gru"),
        pytest.param(_one_case(passes=["bwd"]), "field 'passes'", id="bad-pass"),
        pytest.param(
            '{"name": "x", "cases": [], "size": 1}',
            "unknown top-level fields ['size'] (allowed: name, description, cases)",
            id="unknown-top-level-field",
        ),
        pytest.param('{"name": "", "cases": [{}]}', '"name" must be a non-empty string', id="empty-name"),
        pytest.param('{"name": "x", "description": 3, "cases": [{}]}', '"description" must be a string', id="desc"),
        pytest.param('{"name": "x", "cases": []}', '"cases" must be a non-empty list of objects', id="no-cases"),
        pytest.param('{"name": "x", "cases": ["lstm"]}', "case 1: a case must be a JSON object", id="case-not-object"),
        pytest.param(_one_case(B=[]), "case 1: field 'B': empty list", id="empty-list"),
        pytest.param(_one_case(cell="lstm", proj_size=8), "proj_size 8 must be smaller than H 8", id="proj-too-big"),
        pytest.param(_one_case(bidirectional=1), "field 'bidirectional': 1 is not true or false", id="bad-bool"),
    ],
)
def test_bad_suite_files_exit_2_with_one_message(text, message, tmp_path, capsys):
    assert main(["run", "--suite", _suite_file(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_files_that_cannot_be_read_exit_2_with_one_message(smoke, tmp_path, monkeypatch, capsys):
    """A suite file or results file that is there but cannot be read: exit 2, one line with the reason. (The denial is
    simulated: the tests may run as root, who reads every file.)"""

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    suite, csv = _suite_file(tmp_path, _one_case()), str(smoke / "results.csv")
    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    monkeypatch.setattr(pd, "read_csv", denied)
    assert main(["run", "--suite", suite]) == 2
    assert capsys.readouterr().err == f"perf: error: suite file {suite}: cannot read it (Permission denied)\n"
    assert main(["compare", csv, csv]) == 2
    assert capsys.readouterr().err == f"perf: error: {csv}: cannot read it (Permission denied)\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(
            ["run", "--suite", "smoke", "--out", "{tmp}/a-file/out"],
            "cannot use {tmp}/a-file/out as the output folder: Not a directory",
            id="run-out-below-a-file",
        ),
        pytest.param(["report", "{tmp}"], "cannot write the report in {tmp}: Is a directory", id="report-md-a-folder"),
        pytest.param(
            ["compare", "{tmp}/results.csv", "{tmp}/results.csv", "--out", "{tmp}/a-folder"],
            "cannot write {tmp}/a-folder: Is a directory",
            id="compare-out-a-folder",
        ),
    ],
)
def test_outputs_that_cannot_be_written_exit_2_with_one_message(argv, message, smoke, tmp_path, capsys):
    """An output path where a file stands in for a folder, or a folder for a file: exit 2, one line saying so."""
    (tmp_path / "results.csv").write_bytes((smoke / "results.csv").read_bytes())
    (tmp_path / "report.md").mkdir()
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("a file\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert capsys.readouterr().err == f"perf: error: {message.replace('{tmp}', str(tmp_path))}\n"


@pytest.mark.skipif(HAS_GPU, reason="GPU providers run where there is a GPU")
def test_gpu_provider_without_gpu_is_refused(capsys):
    assert main(["run", "--suite", "smoke", "--providers", "cudnn"]) == 2
    assert "runs only with a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["run", "--suite", "nope"], "unknown suite", id="unknown-suite"),
        pytest.param(["compare", "{tmp}/binary.csv", "{tmp}/binary.csv"], "not a results CSV", id="not-csv"),
        pytest.param([], "the following arguments are required", id="no-command"),
    ],
)
def test_command_line_errors_have_no_traceback(argv, message, tmp_path):
    """The real `python -m perf`, without the interpreter setting of the tests."""
    (tmp_path / "binary.csv").write_bytes(b"\x00\xff\xfe" * 100)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "perf", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_baseline_file_names_follow_the_gpu():
    assert schema.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert schema.gpu_slug("NVIDIA H200") == "nvidia-h200"


def test_rows_record_tritonrnn_switches(monkeypatch):
    from perf import runner

    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "1")
    monkeypatch.setenv("TRITONRNN_CACHE_DIR", "/somewhere")
    switches = runner.context(torch.device("cpu"))["switches"].split()
    assert "TRITONRNN_WAVEFRONT=1" in switches and not any(s.startswith("TRITONRNN_CACHE_DIR") for s in switches)


def test_rows_take_the_commit_from_perf_commit_where_there_is_no_git_history(monkeypatch):
    from perf import runner

    monkeypatch.setenv("PERF_COMMIT", "abc1234")
    assert runner.context(torch.device("cpu"))["commit"] == "abc1234"


def test_host_cost_times_the_host_code_of_each_call_and_counts_its_device_operations():
    """perf.host_cost in its own process (it turns the interpreter on): a row per cell and layer count, each with a
    time and a count of device operations for an inference call and a training step."""
    command = [sys.executable, "-m", "perf.host_cost", "--cells", "lstm", "gru", "--layers", "2", "--calls", "3",
               "--rounds", "1"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("lstm ", "gru "))]
    assert [row[:2] for row in rows] == [["lstm", "2"], ["gru", "2"]]
    for row in rows:  # cell, layers, us, allocations, +, kernels, us, allocations, +, kernels
        inference_us, training_us = float(row[2]), float(row[6])
        inference_ops, training_ops = int(row[3]) + int(row[5]), int(row[7]) + int(row[9])
        # Times only positive: their order is the machine's load's (under load an inference call once took longer).
        assert inference_us > 0 and training_us > 0 and 0 < inference_ops < training_ops, row
