"""The report of one run: DIR/report.md and DIR/report.html (plots embedded) from DIR/results.csv.

Speedup = a baseline provider's median time / tritonrnn's, per config and pass: above 1, tritonrnn is
faster. Both files are rendered from one list of blocks, so they always say the same thing.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import pathlib
import re

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from perf.schema import (  # noqa: E402
    CONFIG_KEYS,
    PASSES,
    PROVIDERS,
    PerfError,
    geomean,
    label,
    ok_rows,
    options,
    read_results,
)

# Stack overhead bars (issue 4): a training step with dropout within 1.1x of the same step without,
# a bidirectional layer within 1.2x of a unidirectional one.
DROPOUT_BAR = 1.1
BIDIRECTIONAL_BAR = 1.2
CPU_DISCLAIMER = (
    "CPU comparison, not a GPU benchmark: tritonrnn's CPU path (torch's CPU op for each layer's recurrence) "
    "against torch.nn on the CPU, at CPU sizes. Its timings say nothing about speed on a GPU."
)
PASS_TEXT = (
    "Passes: fwd = inference (eval mode, no autograd); fwd+bwd = a training step (train mode, so dropout acts: "
    "forward, then the gradients of the input and of every parameter); train = the same step over data, the "
    "input without requires_grad (the parameters' gradients alone; cuDNN forms the input's regardless). rel_err = "
    "the largest ||x - x64|| / ||x64|| over the output (and every gradient for fwd+bwd and train) against float64 "
    "torch.nn with the same weights; MB = peak GPU memory of one call above what was allocated before it; "
    "us/step = the call's median time / (T x L): microseconds per time step per layer."
)
STYLES = {"tritonrnn": ("-", "o"), "cudnn": ("--", "s"), "cudnn_graph": (":", "^"), "torch_cpu": ("--", "s")}
SPEEDUP_TICKS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
FINE_SPEEDUP_TICKS = [0.25, 0.33, 0.5, 0.6, 0.7, 0.8, 1, 1.25, 1.5, 2, 3, 4]  # where the coarse ones leave one or two
# Config fields that stay fixed within one latency plot (batch and hidden size vary along the x axis or the lines).
# input_size: a config's own input width, or 0 where it is the hidden size (then it varies with H in one plot).
PLOT_GROUP = ["cell", "dtype", "L", "T", "bidirectional", "dropout", "dropout_mode", "proj_size", "input_width"]


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Text:
    text: str
    strong: bool = False


@dataclasses.dataclass
class Table:
    frame: pd.DataFrame


@dataclasses.dataclass
class Image:
    path: pathlib.Path
    caption: str


Block = Heading | Text | Table | Image


def write(results_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write report.md, report.html and plots/*.png in ``results_dir``; returns the two report paths."""
    results_dir = pathlib.Path(results_dir)
    if not results_dir.is_dir():
        raise PerfError(f"{results_dir}: no such folder (`python -m perf run --out DIR` makes one)")
    df = read_results(results_dir / "results.csv")
    blocks = build(df, results_dir / "plots")
    markdown, page = results_dir / "report.md", results_dir / "report.html"
    try:
        markdown.write_text(to_markdown(blocks, results_dir))
        page.write_text(to_html(blocks))
    except OSError as error:
        raise PerfError(f"cannot write the report in {results_dir}: {error.strerror}") from None
    return markdown, page


def build(df: pd.DataFrame, plots_dir: pathlib.Path) -> list[Block]:
    """The report's content, in order."""
    gpu = df["gpu"].iloc[0]
    where = "the CPU (CPU comparison)" if gpu == "cpu" else gpu
    blocks: list[Block] = [
        Heading(f"tritonrnn benchmark: {', '.join(df['suite'].unique())} on {where}", 1),
        Table(context_table(df)),
    ]
    if gpu == "cpu":
        blocks.append(Text(CPU_DISCLAIMER, strong=True))
    blocks += [Heading("Summary"), Text("Geometric mean of the speedups over the configs both providers ran.")]
    summary = summary_table(df)
    blocks.append(Table(summary) if not summary.empty else Text("No config has both tritonrnn and a baseline."))
    blocks += [Heading("Per config"), Text(PASS_TEXT), Table(config_table(df))]
    overheads = overhead_table(df)
    if not overheads.empty:
        text = (f"tritonrnn's time with a stack feature / its time for the same config without it. Bars: "
                f"dropout {DROPOUT_BAR}x (training steps), bidirectional {BIDIRECTIONAL_BAR}x.")  # fmt: skip
        blocks += [Heading("Stack overheads"), Text(text), Table(overheads)]
    failed = df[df["status"] != "ok"]
    if not failed.empty:
        frame = pd.DataFrame({"config": [label(r) for _, r in failed.iterrows()], "pass": failed["pass"],
                              "provider": failed["provider"], "status": failed["status"]})  # fmt: skip
        blocks += [Heading("Errors"), Table(frame)]
    notes = df[df["note"] != ""].groupby(["provider", "note"], sort=False).size().reset_index(name="rows")
    if not notes.empty:
        blocks += [Heading("Notes"), Table(notes)]
    blocks += [Heading("Plots"), *plots(df, plots_dir)]
    return blocks


# --- tables ----------------------------------------------------------------------------------------------


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def context_table(df: pd.DataFrame) -> pd.DataFrame:
    """Where and with what the run happened (values differing between rows are all listed)."""

    def values(column: str) -> str:
        seen = [str(v) for v in df[column].unique()]
        return ", ".join(v if v else "-" for v in seen)

    tf32 = "on" if df["tf32"].any() else "off (fp32 in IEEE precision)"
    ok = int((df["status"] == "ok").sum())
    rows = [
        ("GPU", values("gpu")),
        ("torch", values("torch")),
        ("triton", values("triton")),
        ("CUDA", values("cuda")),
        ("cuDNN", values("cudnn")),
        ("TF32", tf32),
        ("TRITONRNN_* switches", values("switches")),
        ("commit", values("commit")),
        ("timestamp", values("timestamp")),
        ("rows", f"{len(df)} ({ok} ok, {len(df) - ok} errors)"),
    ]
    return pd.DataFrame(rows, columns=["", "value"])


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config, pass and baseline provider that ran alongside tritonrnn: baseline ms / tritonrnn ms."""
    ok = ok_rows(df)
    index = [*CONFIG_KEYS, "options", "pass"]
    wide = ok.set_index([*index, "provider"])["ms_median"].unstack("provider")
    if "tritonrnn" not in wide.columns:
        return pd.DataFrame(columns=[*index, "provider", "speedup"])
    frames = []
    for provider in [p for p in PROVIDERS if p in wide.columns and p != "tritonrnn"]:
        frame = (wide[provider] / wide["tritonrnn"]).dropna().rename("speedup").reset_index()
        frames.append(frame.assign(provider=provider))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*index, "provider", "speedup"])


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Geomean speedup of tritonrnn over each baseline provider: all passes together, then per pass."""
    ratios = speedups(df)
    rows = []
    for provider, group in ratios.groupby("provider", sort=False):
        for name, part in [("all", group), *((p, group[group["pass"] == p]) for p in PASSES)]:
            if not part.empty:
                values = part["speedup"]
                rows.append(
                    {
                        "tritonrnn vs": provider,
                        "pass": name,
                        "geomean speedup": _fmt(geomean(values), ".2f", "x"),
                        "min": _fmt(values.min(), ".2f", "x"),
                        "max": _fmt(values.max(), ".2f", "x"),
                        "configs": str(len(part)),
                    }
                )
    return pd.DataFrame(rows)


def summary_markdown(df: pd.DataFrame) -> str:
    """The summary table as markdown, for the terminal after a run."""
    table = summary_table(df)
    return _markdown_table(table) if not table.empty else "No config has both tritonrnn and a baseline."


def config_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per config and pass: per-step latency, speedups, errors and peak memory of every provider side by side."""
    providers = [p for p in PROVIDERS if p in set(df["provider"])]
    baselines = [p for p in providers if p != "tritonrnn"]
    on_gpu = df["gpu"].iloc[0] != "cpu"
    rows = []
    for _, group in df.groupby([*CONFIG_KEYS, "options", "pass"], sort=False):
        by = {r["provider"]: r for _, r in group.iterrows()}
        first = group.iloc[0]
        row = {k: str(first[k]) for k in ["cell", "dtype", "L", "B", "H", "T", "options", "pass"]}
        for p in providers:
            r = by.get(p)
            if r is None:
                row[f"{p} us/step"] = "-"
            else:
                row[f"{p} us/step"] = _fmt(r["us_per_step_layer"], ".3g") if r["status"] == "ok" else "error"
        for p in baselines:
            ours, theirs = by.get("tritonrnn"), by.get(p)
            speedup = math.nan if ours is None or theirs is None else theirs["ms_median"] / ours["ms_median"]
            row[f"x vs {p}"] = _fmt(speedup, ".2f", "x")
        for p in providers:
            row[f"{p} rel_err"] = "-" if p not in by else _fmt(by[p]["rel_err"], ".1e")
        if on_gpu:
            for p in providers:
                row[f"{p} MB"] = "-" if p not in by else _fmt(by[p]["peak_mem_mb"], ".0f")
        rows.append(row)
    return pd.DataFrame(rows)


def overhead_table(df: pd.DataFrame) -> pd.DataFrame:
    """tritonrnn's dropout and bidirectional overheads, for every row whose plain counterpart was measured."""
    ok = ok_rows(df)
    ours = ok[ok["provider"] == "tritonrnn"]
    times = {tuple(r[k] for k in [*CONFIG_KEYS, "pass"]): r["ms_median"] for _, r in ours.iterrows()}
    rows = []
    for _, r in ours.iterrows():
        checks = []
        if r["dropout"] > 0 and r["pass"] != "fwd":  # dropout acts in training only
            without = {"dropout": 0.0, "dropout_mode": "standard"}
            checks.append((f"dropout {r['dropout']:g} {r['dropout_mode']}", without, DROPOUT_BAR))
        if r["bidirectional"]:
            checks.append(("bidirectional", {"bidirectional": False}, BIDIRECTIONAL_BAR))
        for name, plain, bar in checks:
            base = {**r.to_dict(), **plain}
            base_ms = times.get(tuple(base[k] for k in [*CONFIG_KEYS, "pass"]))
            if base_ms is None:
                continue
            ratio = r["ms_median"] / base_ms
            base["options"] = options(base)
            rows.append(
                {
                    "config without it": label(base),
                    "pass": r["pass"],
                    "feature": name,
                    "ms with": _fmt(r["ms_median"], ".3g"),
                    "ms without": _fmt(base_ms, ".3g"),
                    "ratio": _fmt(ratio, ".2f", "x"),
                    "bar": f"{bar}x",
                    "meets bar": "yes" if ratio <= bar else "NO",
                }
            )
    return pd.DataFrame(rows)


# --- plots -----------------------------------------------------------------------------------------------


def plots(df: pd.DataFrame, plots_dir: pathlib.Path) -> list[Block]:
    """Every plot the rows allow, as images; a line for each kind of plot the rows do not allow."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):  # plots of an earlier report of this folder
        old.unlink()
    return [*_speedup_plots(df, plots_dir), *_latency_plots(df, plots_dir, "B"), *_latency_plots(df, plots_dir, "H")]


def _speedup_plots(df: pd.DataFrame, plots_dir: pathlib.Path) -> list[Block]:
    ratios = speedups(df)
    if ratios.empty:
        return [Text("Speedup per config: skipped (no config has both tritonrnn and a baseline).")]
    blocks: list[Block] = []
    for pass_ in [p for p in PASSES if p in set(ratios["pass"])]:
        part = ratios[ratios["pass"] == pass_]
        labels = list(dict.fromkeys(label(r) for _, r in part.iterrows()))
        providers = list(dict.fromkeys(part["provider"]))
        fig, ax = plt.subplots(figsize=(9, 1.4 + 0.28 * len(labels) * max(1, 0.6 * len(providers))))
        height = 0.8 / len(providers)
        for k, provider in enumerate(providers):
            values = {label(r): r["speedup"] for _, r in part[part["provider"] == provider].iterrows()}
            ys = [i + k * height for i, name in enumerate(labels) if name in values]
            # Bars grow from 1x: to the right where tritonrnn is faster, to the left where it is slower.
            widths = [values[name] - 1 for name in labels if name in values]
            ax.barh(ys, widths, left=1, height=height, label=f"vs {provider}")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=8)
        ax.margins(y=0.01)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        low, high = min(part["speedup"].min(), 1) / 1.2, max(part["speedup"].max(), 1) * 1.2
        ax.set_xlim(low, high)
        ticks = [t for t in SPEEDUP_TICKS if low <= t <= high]
        if len(ticks) < 3:
            ticks = [t for t in FINE_SPEEDUP_TICKS if low <= t <= high]
        ax.set_xticks(ticks, minor=False)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%gx"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("baseline ms / tritonrnn ms (right of 1x: tritonrnn is faster)")
        ax.set_title(f"tritonrnn speedup per config, {pass_}")
        ax.legend(fontsize=8)
        blocks.append(_save(fig, plots_dir / f"speedup_{_slug(pass_)}.png", f"Speedup per config, {pass_}"))
    return blocks


def _latency_plots(df: pd.DataFrame, plots_dir: pathlib.Path, x: str) -> list[Block]:
    """Per-step latency against batch size (x = "B", one line per hidden size and provider) or hidden size."""
    series = "H" if x == "B" else "B"
    what = {"B": "batch size", "H": "hidden size"}[x]
    ok = ok_rows(df).copy()
    ok["input_width"] = ok["input_size"].where(ok["input_size"] != ok["H"], 0)
    blocks: list[Block] = []
    for key, group in ok.groupby(PLOT_GROUP, sort=False):
        if group[x].nunique() < 2:
            continue
        fixed = dict(zip(PLOT_GROUP, key))
        title = f"{fixed['cell']} {fixed['dtype']} L{fixed['L']} T{fixed['T']} {options(fixed)}".strip()
        if fixed["input_width"]:
            title += f" input_size={fixed['input_width']}"
        passes = [p for p in PASSES if p in set(group["pass"])]
        fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4), squeeze=False)
        colors = {v: f"C{i % 10}" for i, v in enumerate(sorted(group[series].unique()))}
        for ax, pass_ in zip(axes[0], passes):
            for (value, provider), line in group[group["pass"] == pass_].groupby([series, "provider"]):
                line = line.sort_values(x)
                style, marker = STYLES.get(provider, ("-", "o"))
                ax.plot(line[x], line["us_per_step_layer"], style, marker=marker, color=colors[value],
                        label=f"{series}={value} {provider}")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = sorted(group[x].unique())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(what)
            ax.set_ylabel("us per step per layer")
            ax.set_title(f"{title}, {pass_}", fontsize=9)
            ax.legend(fontsize=7)
        name = f"latency_vs_{what.replace(' ', '_')}_{_slug(title)}.png"
        blocks.append(_save(fig, plots_dir / name, f"Latency vs {what}: {title}"))
    if not blocks:
        return [Text(f"Latency vs {what}: skipped (no group of configs has more than one {what}).")]
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _save(fig: plt.Figure, path: pathlib.Path, caption: str) -> Image:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Image(path, caption)


# --- rendering ---------------------------------------------------------------------------------------------


def _markdown_table(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def to_markdown(blocks: list[Block], base: pathlib.Path) -> str:
    """The report as markdown; images are linked relative to ``base`` (the report's folder)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            parts.append(f"**{block.text}**" if block.strong else block.text)
        elif isinstance(block, Table):
            parts.append(_markdown_table(block.frame))
        else:
            parts.append(f"![{block.caption}]({block.path.relative_to(base).as_posix()})")
    return "\n\n".join(parts) + "\n"


def to_html(blocks: list[Block]) -> str:
    """The report as one self-contained HTML page (plots embedded as base64 PNGs)."""
    title = next(b.text for b in blocks if isinstance(b, Heading))
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            text = html.escape(block.text)
            parts.append(f'<p class="warning"><strong>{text}</strong></p>' if block.strong else f"<p>{text}</p>")
        elif isinstance(block, Table):
            parts.append(block.frame.to_html(index=False, border=0, escape=True))
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            caption = html.escape(block.caption)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
    body = "\n".join(parts)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
p.warning {{ background: #fff3cd; padding: 0.5em; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{body}
</body></html>
"""
