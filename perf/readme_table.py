"""The README's speed table, generated from the committed baselines (perf/baselines/<gpu-slug>.csv).

``python -m perf readme`` prints it; ``--write`` puts it between the marker lines in README.md.
"""

from __future__ import annotations

import math
import pathlib

from perf.report import speedups
from perf.schema import DEFAULT_PASSES, PASSES, PerfError, geomean, gpu_slug, label, ok_rows, read_results

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASELINES_DIR = ROOT / "perf" / "baselines"
README = ROOT / "README.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
# Per-step latency shown for these quick-suite configs (cell, dtype, B, H; 3 layers, T=512, no extras).
HEADLINE = [("lstm", "bf16", 16, 512), ("lstm", "bf16", 64, 1024), ("gru", "bf16", 16, 512), ("lstm", "fp32", 16, 256)]
NAMES = {"cudnn": "cuDNN", "cudnn_graph": "cuDNN graph"}


def table(baselines_dir: pathlib.Path = BASELINES_DIR) -> str:
    """The markdown for every baseline file, or a sentence saying there is none."""
    files = sorted(pathlib.Path(baselines_dir).glob("*.csv"))
    if not files:
        return (
            "No baseline has been committed yet, so no speed against cuDNN has been measured. To make one: run "
            "`python -m perf run --suite quick` on a GPU, copy its results.csv to `perf/baselines/<gpu-slug>.csv`, "
            "then `python -m perf readme --write`."
        )
    frames = [(path, read_results(path)) for path in files]
    for path, df in frames:
        gpu = df["gpu"].iloc[0]
        if gpu == "cpu" or path.stem != gpu_slug(gpu) or set(df["suite"]) != {"quick"}:
            raise PerfError(
                f"{path}: not a baseline (expected the quick suite of a GPU, named {gpu_slug(gpu)}.csv; "
                f"got suite {', '.join(set(df['suite']))} on {gpu})"
            )
    speed = [
        "Geometric mean speedup of tritonrnn over cuDNN (torch.nn eager, its weights flattened, bf16's too) and "
        "over cuDNN replayed from a CUDA graph "
        "(`python -m perf run --suite quick`: LSTM/GRU/RNN x bf16/fp32 x B 1-256 x H 256-1024, 3 layers, T=512; "
        "above 1x tritonrnn is faster). fwd = inference, fwd+bwd = a training step.",
        "",
        "| GPU | pass | vs cuDNN | vs cuDNN graph | configs |",
        "|---|---|---|---|---|",
    ]
    latency = [
        "Per-step latency, us per step per layer (3 layers, T=512):",
        "",
        "| GPU | config | pass | tritonrnn | cuDNN | cuDNN graph |",
        "|---|---|---|---|---|---|",
    ]
    sources = []
    for path, df in frames:
        gpu = df["gpu"].iloc[0]
        ratios = speedups(df)
        for pass_ in [p for p in PASSES if p in DEFAULT_PASSES or p in set(df["pass"])]:
            part = ratios[ratios["pass"] == pass_]
            means = [geomean(part[part["provider"] == p]["speedup"]) for p in NAMES]
            cells = [f"{m:.2f}x" if math.isfinite(m) else "-" for m in means]
            configs = part[["cell", "dtype", "B", "H", "T", "L", "options"]].drop_duplicates()
            speed.append(f"| {gpu} | {pass_} | {cells[0]} | {cells[1]} | {len(configs)} |")
        ok = ok_rows(df)
        for cell, dtype, B, H in HEADLINE:
            config = ok[(ok["cell"] == cell) & (ok["dtype"] == dtype) & (ok["B"] == B) & (ok["H"] == H)
                        & (ok["L"] == 3) & (ok["T"] == 512) & (ok["options"] == "")]  # fmt: skip
            for pass_ in PASSES:
                rows = config[config["pass"] == pass_].set_index("provider")["us_per_step_layer"]
                if "tritonrnn" in rows:
                    values = [f"{rows[p]:.3g}" if p in rows else "-" for p in ["tritonrnn", *NAMES]]
                    latency.append(f"| {gpu} | {label(config.iloc[0])} | {pass_} | {' | '.join(values)} |")
        first = df.iloc[0]
        sources.append(
            f"`perf/baselines/{path.name}`: torch {first['torch']}, triton {first['triton']}, "
            f"cuDNN {first['cudnn'] or '-'}, TF32 {'on' if first['tf32'] else 'off'}, "
            f"{first['switches'] or 'no TRITONRNN_* switches'}, commit {first['commit']}, "
            f"{first['timestamp']}."
        )
    if len(latency) == 4:
        latency = ["(The baselines hold none of the headline configs for a latency table.)"]
    footer = ["From " + " ".join(sources), "", "Regenerate with `python -m perf readme --write`."]
    return "\n".join([*speed, "", *latency, "", *footer])


def write(readme: pathlib.Path, text: str) -> None:
    """Replace what lies between the marker lines of ``readme`` with ``text`` (no markers: print it, then fail)."""
    readme = pathlib.Path(readme)
    if not readme.is_file():
        raise PerfError(f"{readme}: no such file")
    content = readme.read_text()
    start, end = content.find(START), content.find(END)
    if start < 0 or end < start:
        print(text)
        raise PerfError(
            f"{readme} has no '{START}' ... '{END}' marker lines: printed the table above instead of writing it"
        )
    readme.write_text(content[: start + len(START)] + "\n" + text + "\n" + content[end:])
