"""The results table every perf tool shares: its columns, how to read and check a results.csv, the error type.

One row per (config, pass, provider). The config keys plus pass and provider identify a row; the
context columns (gpu, versions, tf32, commit, timestamp) are the same on every row of one run.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd


class PerfError(Exception):
    """Bad input to a perf tool: reported as one line on stderr with exit code 2, never a traceback."""


CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
DTYPES = ("bf16", "fp16", "fp32")
PASSES = ("fwd", "fwd+bwd", "train")
# What a case measures without a "passes" field; "train" is asked for by name (perf/runner.py says what each is).
DEFAULT_PASSES = ("fwd", "fwd+bwd")
DROPOUT_MODES = ("standard", "variational")
GPU_PROVIDERS = ("tritonrnn", "cudnn", "cudnn_graph")
CPU_PROVIDERS = ("tritonrnn", "torch_cpu")
PROVIDERS = ("tritonrnn", "cudnn", "cudnn_graph", "torch_cpu")

CONFIG_KEYS = [
    "cell", "dtype", "B", "H", "T", "L", "input_size", "bidirectional", "dropout", "dropout_mode", "proj_size",
]  # fmt: skip
ROW_KEYS = [*CONFIG_KEYS, "pass", "provider"]
# switches: the TRITONRNN_* environment variables of the run (they change tritonrnn's launches).
CONTEXT = ["gpu", "torch", "triton", "cuda", "cudnn", "tf32", "switches", "commit", "timestamp"]
COLUMNS = [
    "suite", *CONFIG_KEYS, "options", "pass", "provider",
    "ms_median", "ms_p20", "ms_p80", "us_per_step_layer", "peak_mem_mb", "rel_err", "status", "note",
    *CONTEXT,
]  # fmt: skip

_INTS = ["B", "H", "T", "L", "input_size", "proj_size"]
_FLOATS = ["dropout", "ms_median", "ms_p20", "ms_p80", "us_per_step_layer", "peak_mem_mb", "rel_err"]
_BOOLS = ["bidirectional", "tf32"]
_CHOICES = {"cell": CELLS, "dtype": DTYPES, "pass": PASSES, "provider": PROVIDERS, "dropout_mode": DROPOUT_MODES}


def read_results(path: pathlib.Path) -> pd.DataFrame:
    """A results.csv, checked: every column present, values of the right kinds, one GPU, no duplicate rows."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PerfError(f"{path}: no such file (`python -m perf run --out DIR` writes DIR/results.csv)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PerfError(f"{path}: not a results CSV ({type(error).__name__}: {str(error).strip()})") from None
    except OSError as error:
        raise PerfError(f"{path}: cannot read it ({error.strerror})") from None
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise PerfError(f"{path}: not a perf results file: missing columns {', '.join(missing)}")
    if raw.empty:
        raise PerfError(f"{path}: no rows")
    df = raw[COLUMNS].copy()
    for column in _INTS:
        values = pd.to_numeric(df[column], errors="coerce")
        # NaN compares unequal to itself: one test for empty, text, inf, fractions and sizes out of range.
        bad = ~((values == values.round()) & (values >= 0) & (values < 2**31))
        if bad.any():
            raise PerfError(f"{path}: column {column} must hold integers >= 0, got {_bad(df[column], bad)}")
        df[column] = values.astype(int)
    for column in _FLOATS:
        values = pd.to_numeric(df[column].replace("", "nan"), errors="coerce")
        bad = values.isna() & ~df[column].str.lower().isin(["", "nan"])
        if bad.any():
            raise PerfError(f"{path}: column {column} must hold numbers, got {_bad(df[column], bad)}")
        if column == "dropout" and not ((values >= 0) & (values < 1)).all():
            raise PerfError(
                f"{path}: column dropout (a config key) must hold numbers in [0, 1), got "
                f"{_bad(df[column], ~((values >= 0) & (values < 1)))}"
            )
        df[column] = values.astype(float)
    for column in _BOOLS:
        bad = ~df[column].isin(["True", "False"])
        if bad.any():
            raise PerfError(f"{path}: column {column} must hold True or False, got {_bad(df[column], bad)}")
        df[column] = df[column] == "True"
    for column, choices in _CHOICES.items():
        bad = ~df[column].isin(choices)
        if bad.any():
            raise PerfError(f"{path}: column {column} must be one of {', '.join(choices)}, got {_bad(df[column], bad)}")
    ok = df["status"] == "ok"
    timings = df.loc[ok, ["ms_p20", "ms_median", "ms_p80"]]
    # A measured row has three finite positive timings in order (the quantiles of one sample, as written).
    bad = ~((timings > 0) & timings.apply(lambda c: c.map(math.isfinite))).all(axis=1)
    bad |= (timings["ms_p20"] > timings["ms_median"] * (1 + 1e-9)) | (
        timings["ms_median"] > timings["ms_p80"] * (1 + 1e-9)
    )
    if bad.any():
        row = df.loc[bad[bad].index[0]]
        raise PerfError(
            f"{path}: row {label(row)} {row['pass']} {row['provider']} has status ok but timings "
            f"(p20, median, p80) = ({row['ms_p20']}, {row['ms_median']}, {row['ms_p80']}): expected finite, "
            "positive and in that order"
        )
    gpus = df["gpu"].unique()
    if len(gpus) > 1:
        raise PerfError(f"{path}: rows from several GPUs ({', '.join(gpus)}); one results file holds one GPU's run")
    duplicated = df.duplicated(ROW_KEYS)
    if duplicated.any():
        row = df[duplicated].iloc[0]
        raise PerfError(f"{path}: duplicate rows for {label(row)} {row['pass']} {row['provider']}")
    return df


def _bad(column: pd.Series, mask: pd.Series) -> str:
    return repr(column[mask].iloc[0])


def label(row: pd.Series | dict) -> str:
    """A config in a few words: "lstm bf16 L3 B64 H512 T512 dropout=0.3 variational"."""
    text = f"{row['cell']} {row['dtype']} L{row['L']} B{row['B']} H{row['H']} T{row['T']}"
    return f"{text} {row['options']}" if row["options"] else text


def options(fields: Mapping[str, Any]) -> str:
    """A config's non-default extras in a few words ("" for a plain config; input size shown when not H)."""
    parts = ["bidirectional"] if fields["bidirectional"] else []
    if fields["dropout"] > 0:
        parts.append(f"dropout={fields['dropout']:g} {fields['dropout_mode']}")
    if fields["proj_size"]:
        parts.append(f"proj_size={fields['proj_size']}")
    if fields.get("input_size", fields.get("H")) != fields.get("H"):
        parts.append(f"input_size={fields['input_size']}")
    return " ".join(parts)


def gpu_slug(gpu: str) -> str:
    """A baseline's file stem: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the finite positive values (NaN when there are none)."""
    logs = [math.log(v) for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose measurement ran (status "ok")."""
    return df[df["status"] == "ok"]
