"""Benchmark suites as data: perf/suites/<name>.json, or any file in the same format.

A suite file is ``{"name": str, "description": str, "cases": [case, ...]}``. Each case is a dict of
config fields; a list-valued field expands as a cartesian product with the other lists (except
``passes``, which lists the passes to measure: "fwd" and "fwd+bwd" where a case does not say; "train" only where it
names it). Fields and defaults are in ``DEFAULTS``; ``input_size`` defaults to ``H``. With dropout 0 the dropout
mode means nothing and is set to "standard", so configs that differ only there are one config. A config reached twice
is measured once, with the passes of every case reaching it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from typing import Any

from perf import schema
from perf.schema import CELLS, DEFAULT_PASSES, DROPOUT_MODES, DTYPES, PASSES, PerfError

SUITES_DIR = pathlib.Path(__file__).resolve().parent / "suites"

REQUIRED = ("cell", "dtype", "B", "H", "T", "L")
DEFAULTS: dict[str, Any] = {
    "input_size": None,  # = H
    "bidirectional": False,
    "dropout": 0.0,
    "dropout_mode": "standard",
    "proj_size": 0,
    "passes": list(DEFAULT_PASSES),
}

# Largest sizes the CPU comparison runs as they are; a bigger suite is replaced by "cpu" without a GPU.
CPU_LIMITS = {"T": 64, "B": 16, "H": 128}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark configuration (sizes in torch.nn's letters: batch B, hidden H, steps T, layers L)."""

    cell: str
    dtype: str
    B: int
    H: int
    T: int
    L: int
    input_size: int
    bidirectional: bool
    dropout: float
    dropout_mode: str
    proj_size: int
    passes: tuple[str, ...]

    def key(self) -> tuple:
        """The config without its passes: two cases reaching the same key are one config."""
        return dataclasses.astuple(dataclasses.replace(self, passes=()))

    @property
    def options(self) -> str:
        return schema.options(dataclasses.asdict(self))

    @property
    def cpu_sized(self) -> bool:
        return all(getattr(self, field) <= limit for field, limit in CPU_LIMITS.items())


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    description: str
    configs: tuple[Config, ...]

    @property
    def cpu_sized(self) -> bool:
        """Small enough to run as it is in the CPU comparison."""
        return all(config.cpu_sized for config in self.configs)


def available() -> list[str]:
    """Names of the suites shipped in perf/suites/."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.json"))


def load(name_or_path: str) -> Suite:
    """A shipped suite by name, or a suite file by path (anything ending in .json or naming an existing file)."""
    path = pathlib.Path(name_or_path)
    if not (name_or_path.endswith(".json") or path.is_file()):
        if name_or_path not in available():
            raise PerfError(f"unknown suite {name_or_path!r}: choose one of {', '.join(available())} or a .json path")
        path = SUITES_DIR / f"{name_or_path}.json"
    if path.is_dir():
        raise PerfError(f"suite file {path}: a folder, not a suite .json file")
    if not path.is_file():
        raise PerfError(f"suite file {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PerfError(f"suite file {path}: not valid JSON ({error})") from None
    except OSError as error:
        raise PerfError(f"suite file {path}: cannot read it ({error.strerror})") from None
    try:
        return parse(data)
    except PerfError as error:
        raise PerfError(f"suite file {path}: {error}") from None


def parse(data: Any) -> Suite:
    """A suite from the decoded JSON, checked field by field."""
    if not isinstance(data, dict):
        raise PerfError("expected a JSON object with name, description and cases")
    unknown = set(data) - {"name", "description", "cases"}
    if unknown:
        raise PerfError(f"unknown top-level fields {sorted(unknown)} (allowed: name, description, cases)")
    name, description, cases = data.get("name"), data.get("description", ""), data.get("cases")
    if not isinstance(name, str) or not name:
        raise PerfError('"name" must be a non-empty string')
    if not isinstance(description, str):
        raise PerfError('"description" must be a string')
    if not isinstance(cases, list) or not cases:
        raise PerfError('"cases" must be a non-empty list of objects')
    configs: dict[tuple, Config] = {}
    for index, case in enumerate(cases, start=1):
        try:
            expanded = _expand(case)
        except PerfError as error:
            raise PerfError(f"case {index}: {error}") from None
        for config in expanded:
            seen = configs.get(config.key())
            if seen is not None:
                config = dataclasses.replace(config, passes=tuple(dict.fromkeys([*seen.passes, *config.passes])))
            configs[config.key()] = config
    return Suite(name, description, tuple(configs.values()))


def _expand(case: Any) -> list[Config]:
    if not isinstance(case, dict):
        raise PerfError("a case must be a JSON object")
    unknown = set(case) - set(REQUIRED) - set(DEFAULTS)
    if unknown:
        raise PerfError(f"unknown fields {sorted(unknown)} (fields: {', '.join([*REQUIRED, *DEFAULTS])})")
    missing = [field for field in REQUIRED if field not in case]
    if missing:
        raise PerfError(f"missing fields {missing}")
    fields = {**DEFAULTS, **case}
    passes = _passes(fields.pop("passes"))
    axes = {}
    for field, value in fields.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise PerfError(f"field {field!r}: empty list")
        axes[field] = [_check(field, v) for v in values]
    configs = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        if values["input_size"] is None:
            values["input_size"] = values["H"]
        if values["dropout"] == 0:
            values["dropout_mode"] = "standard"
        if values["proj_size"] and values["cell"] != "lstm":
            raise PerfError(f"proj_size applies to lstm only, not {values['cell']}")
        if values["proj_size"] >= values["H"]:
            raise PerfError(f"proj_size {values['proj_size']} must be smaller than H {values['H']}")
        configs.append(Config(**values, passes=passes))
    return configs


def _check(field: str, value: Any) -> Any:
    """One value of a field, normalised (floats for dropout), or PerfError saying what is wrong."""
    choices = {"cell": CELLS, "dtype": DTYPES, "dropout_mode": DROPOUT_MODES}
    if field in choices:
        if value not in choices[field]:
            raise PerfError(f"field {field!r}: {value!r} is not one of {', '.join(choices[field])}")
        return value
    if field == "bidirectional":
        if not isinstance(value, bool):
            raise PerfError(f"field 'bidirectional': {value!r} is not true or false")
        return value
    if field == "dropout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise PerfError(f"field 'dropout': {value!r} is not a number in [0, 1)")
        return float(value)
    if field == "input_size" and value is None:
        return value
    smallest = 0 if field == "proj_size" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        raise PerfError(f"field {field!r}: {value!r} is not an integer >= {smallest}")
    return value


def _passes(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or any(v not in PASSES for v in values) or len(set(values)) != len(values):
        raise PerfError(f"field 'passes': {value!r} must be a non-empty list of distinct values of {', '.join(PASSES)}")
    return tuple(values)
