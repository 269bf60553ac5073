"""A run against a baseline: which rows got slower or faster, beyond the threshold and outside the noise.

Rows are joined on the config keys + pass + provider. A row is slower when its current median exceeds
the baseline median by more than the threshold AND its current 20% quantile lies above the baseline's
80% quantile (the two distributions barely overlap); faster symmetrically. Only tritonrnn's rows can
fail the comparison (exit 1): a slower row; a broken one, which ran in the baseline and errors now or
whose error against float64 is no longer finite or grew tenfold past 1e-2; and a gone one, which ran in
the baseline and is absent now (a run stopped by its budget or killed on a hang). A tritonrnn row no
slower, relative to its baseline, than the reference of its config and pass (cuDNN from a CUDA graph,
else cuDNN, else torch on the CPU) within the threshold is "slower with the reference": the machine
moved, not the code; listed, not failing. The other providers' changes are reported as environment
drift (driver, clocks, library versions).
"""

from __future__ import annotations

import math
import pathlib

import pandas as pd

from perf.schema import CONFIG_KEYS, CONTEXT, ROW_KEYS, PerfError, label, read_results

# The providers whose change between the same two runs says what the machine did, in order: the fastest cuDNN first,
# torch on the CPU.
REFERENCES = ["cudnn_graph", "cudnn", "torch_cpu"]

# Every verdict, in the order the summary counts them.
VERDICTS = ["slower", "slower with the reference", "faster", "unchanged", "broken", "gone", "fixed", "errors"]
VERDICTS += ["missing", "new"]

# Context that changes timings besides the code: a difference is called out above the verdict.
VERSION_CONTEXT = ["torch", "triton", "cuda", "cudnn", "tf32", "switches"]


def classify(baseline: pd.DataFrame, current: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Every row of either table with its verdict: slower, slower with the reference, faster, unchanged, broken, gone,
    fixed, errors, missing, new."""
    columns = [*ROW_KEYS, "options", "status", "ms_median", "ms_p20", "ms_p80", "rel_err"]
    joined = baseline[columns].merge(current[columns], on=ROW_KEYS, how="outer", suffixes=("_base", "_cur"),
                                     indicator=True, sort=False)  # fmt: skip
    joined["options"] = joined["options_base"].fillna(joined["options_cur"])
    base_ok, cur_ok = joined["status_base"] == "ok", joined["status_cur"] == "ok"
    limit = threshold / 100
    slower = (joined["ms_median_cur"] > joined["ms_median_base"] * (1 + limit)) & (
        joined["ms_p20_cur"] > joined["ms_p80_base"]
    )
    faster = (joined["ms_median_cur"] < joined["ms_median_base"] * (1 - limit)) & (
        joined["ms_p80_cur"] < joined["ms_p20_base"]
    )
    verdict = pd.Series("unchanged", index=joined.index)
    verdict[base_ok & cur_ok & slower] = "slower"
    verdict[base_ok & cur_ok & faster] = "faster"
    both = joined["_merge"] == "both"
    verdict[both & base_ok & ~cur_ok] = "broken"
    # Wrong results are a regression too: non-finite now, or 10x the baseline's error and above 1e-2.
    err_base, err_cur = joined["rel_err_base"], joined["rel_err_cur"]
    wrong = err_base.map(math.isfinite) & (~err_cur.map(math.isfinite) | ((err_cur > 10 * err_base) & (err_cur > 1e-2)))
    verdict[both & base_ok & cur_ok & wrong.fillna(False).astype(bool)] = "broken"
    verdict[both & ~base_ok & cur_ok] = "fixed"
    verdict[both & ~base_ok & ~cur_ok] = "errors"
    # A row measured in the baseline and absent now (a run cut short by its budget, or killed on a hang) is
    # "gone": for tritonrnn it fails the comparison like a broken row; a row that errored in the baseline is "missing".
    verdict[joined["_merge"] == "left_only"] = "missing"
    verdict[(joined["_merge"] == "left_only") & base_ok] = "gone"
    verdict[joined["_merge"] == "right_only"] = "new"
    joined["change_pct"] = (joined["ms_median_cur"] / joined["ms_median_base"] - 1) * 100
    # A tritonrnn row that slowed down no more than the reference of its config and pass did in the same two runs
    # (clocks, load, a driver: both moved) is "slower with the reference": listed, not a failure. The reference is the
    # first of REFERENCES measured in both runs.
    ratio = joined["ms_median_cur"] / joined["ms_median_base"]
    keys = [*CONFIG_KEYS, "pass"]
    reference_ratio = pd.Series(math.nan, index=joined.index)
    for reference in reversed(REFERENCES):  # the first of them last: it wins
        theirs = joined[(joined["provider"] == reference) & base_ok & cur_ok]
        moved = joined[keys].merge(theirs[keys].assign(moved=ratio[theirs.index].values), on=keys, how="left")["moved"]
        reference_ratio = pd.Series(moved.values, index=joined.index).fillna(reference_ratio)
    shared = (joined["provider"] == "tritonrnn") & (verdict == "slower") & (ratio <= reference_ratio * (1 + limit))
    verdict[shared] = "slower with the reference"
    joined["verdict"] = verdict
    return joined


def compare_files(
    baseline_path: pathlib.Path, current_path: pathlib.Path, threshold: float = 5.0, allow_different_gpu: bool = False
) -> tuple[str, int]:
    """The markdown report and the exit code (1 if a tritonrnn row got slower or broke, else 0)."""
    if not (math.isfinite(threshold) and threshold >= 0):
        raise PerfError(f"--threshold must be a finite number >= 0, got {threshold}")
    baseline, current = read_results(baseline_path), read_results(current_path)
    gpus = baseline["gpu"].iloc[0], current["gpu"].iloc[0]
    if gpus[0] != gpus[1] and not allow_different_gpu:
        raise PerfError(
            f"different GPUs: {baseline_path} ran on {gpus[0]!r}, {current_path} on {gpus[1]!r}; timings of "
            "different GPUs do not compare (pass --allow-different-gpu to compare them anyway)"
        )
    rows = classify(baseline, current, threshold)
    ours = rows["provider"] == "tritonrnn"
    failing = rows[ours & rows["verdict"].isin(["slower", "broken", "gone"])]
    compared = ours & rows["verdict"].isin(
        ["slower", "slower with the reference", "faster", "unchanged", "broken", "fixed"]
    )
    if not compared.any():
        raise PerfError(
            f"nothing to compare: no tritonrnn row of {current_path} matches a row of {baseline_path} (same config, "
            "pass and provider, measured in one of them at least); were they run from different suites?"
        )
    lines = ["# Performance comparison", ""]
    if gpus[0] != gpus[1]:
        lines += [f"**WARNING: different GPUs ({gpus[0]} vs {gpus[1]}): the changes below mix hardware and code.**", ""]
    drifted = [c for c in VERSION_CONTEXT if _values(baseline, c) != _values(current, c)]
    if drifted:
        changes = "; ".join(f"{c} {_values(baseline, c)} -> {_values(current, c)}" for c in drifted)
        lines += [f"**WARNING: the runs differ in {changes}: the changes below may come from them, not the code.**", ""]
    lines += [
        f"baseline: `{baseline_path}`  ",
        f"current: `{current_path}`  ",
        f"threshold: {threshold:g}% on the median, and outside the 20-80% band of both runs",
        "",
        _context_table(baseline, current),
        "",
        f"**Result: {'FAIL' if len(failing) else 'PASS'}**: {len(failing)} tritonrnn rows slower, broken or gone; "
        + ", ".join(f"{(rows['verdict'] == v).sum()} {v}" for v in VERDICTS),
    ]  # fmt: skip
    sections = [
        ("tritonrnn slower (regressions)", ours & (rows["verdict"] == "slower")),
        ("tritonrnn broken (ran in the baseline, errors now)", ours & (rows["verdict"] == "broken")),
        ("tritonrnn gone (ran in the baseline, absent now)", ours & (rows["verdict"] == "gone")),
        ("Other providers slower (environment drift, not a failure)", ~ours & (rows["verdict"] == "slower")),
        ("Other providers broken (environment drift, not a failure)", ~ours & (rows["verdict"] == "broken")),
        (
            "tritonrnn slower, but no more than cuDNN / torch in the same runs (environment)",
            rows["verdict"] == "slower with the reference",
        ),
        ("Faster", rows["verdict"] == "faster"),
        ("Fixed (errored in the baseline, runs now)", rows["verdict"] == "fixed"),
        ("Errors in both", rows["verdict"] == "errors"),
        ("Missing from the current run", (rows["verdict"] == "missing") | ~ours & (rows["verdict"] == "gone")),
        ("New in the current run", rows["verdict"] == "new"),
        ("Unchanged", rows["verdict"] == "unchanged"),
    ]
    for title, mask in sections:
        if mask.any():
            lines += ["", f"## {title} ({int(mask.sum())})", "", _rows_table(rows[mask])]
    return "\n".join(lines) + "\n", 1 if len(failing) else 0


def _values(frame: pd.DataFrame, column: str) -> str:
    return ", ".join(str(v) for v in frame[column].unique())


def _context_table(baseline: pd.DataFrame, current: pd.DataFrame) -> str:
    """The runs' context side by side; values that differ are flagged."""
    lines = ["| | baseline | current | |", "|---|---|---|---|"]
    for column in CONTEXT:
        old, new = _values(baseline, column), _values(current, column)
        flag = "" if old == new or column == "timestamp" else "**differs**"
        lines.append(f"| {column} | {old} | {new} | {flag} |")
    return "\n".join(lines)


def _rows_table(rows: pd.DataFrame) -> str:
    def ms(value: float) -> str:
        return "-" if pd.isna(value) else f"{value:.4g}"

    frame = pd.DataFrame(
        {
            "config": [label(r) for _, r in rows.iterrows()],
            "pass": rows["pass"],
            "provider": rows["provider"],
            "baseline ms": rows["ms_median_base"].map(ms),
            "current ms": rows["ms_median_cur"].map(ms),
            "change": rows["change_pct"].map(lambda v: "-" if pd.isna(v) else f"{v:+.1f}%"),
            "status": [_status(r) for _, r in rows.iterrows()],
        }
    )
    return frame.to_markdown(index=False, disable_numparse=True)


def _status(row: pd.Series) -> str:
    statuses = [s for s in (row["status_base"], row["status_cur"]) if isinstance(s, str) and s != "ok"]
    return "; ".join(statuses)
