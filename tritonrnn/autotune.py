"""Per-GPU kernel configurations: chosen by timing candidates once, remembered on disk.

A configuration is the hidden slice per program (``block_h``, which also fixes the number of programs),
the batch tile, ``num_warps``, ``num_stages`` and the chunks of the reduction (``k_split``: 1, or one a warp;
kernels/recurrent._dot_k), for the forward and the backward kernel separately.
Where the resident weights live (shared memory or registers) is Triton's decision for a configuration;
the compiled kernel's shared memory and registers decide whether it fits.

Key: (cell, hidden size, batch bucket, dtype, directions, projection, TF32), one entry holding the forward's and the
backward's configuration; never the sequence length.
Store: one JSON file per GPU name and Triton version under ``$TRITONRNN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/tritonrnn`` or ``~/.cache/tritonrnn``), written atomically under a file lock so
concurrent processes merge their results; a corrupt file is ignored with a warning and rewritten.
Tuned defaults shipped in ``tritonrnn/tuned/`` (keyed by GPU name) are used before any tuning (none ship yet: they
are made on the GPU, by ``python -m tritonrnn.autotune``'s export).
``TRITONRNN_AUTOTUNE=1`` turns tuning on; the default (``0``, until the tuner has been run and measured
on a GPU) is the built-in heuristics (``_plan.plan_layer``), as is a call made while a CUDA graph is
being captured (timing would break the capture).

Candidates are pruned before anything runs: a persistent grid needs all its programs resident
(``num_programs * directions`` within the SM count, one program per SM), and each kernel must
compile within the GPU's shared memory; a candidate that could deadlock is never launched.

Pre-tune a matrix and export it::

    python -m tritonrnn.autotune --cells lstm gru --hidden 256 512 1024 --batch 16 64 --dtypes bf16 \\
        --export tuned.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import pathlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
import triton

from tritonrnn._plan import (
    CELLS,
    MIN_DOT,
    LayerPlan,
    capturing,
    cuda_index,
    log_once,
    next_pow2,
    plan_with,
    resident_programs,
    single_group,
    tf32_matmul,
)

log = logging.getLogger("tritonrnn")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
BLOCK_H = (16, 32, 64)
BLOCK_B = (16, 32, 64)
NUM_WARPS = (4, 8)
NUM_STAGES = (1, 3)
K_SPLITS = (1, 4, 8)  # 1, or num_warps
TUNE_STEPS = 32  # steps timed per candidate: enough to amortise the launch, independent of the user's T
FORMAT = 1  # version of the JSON layout


def enabled() -> bool:
    """``TRITONRNN_AUTOTUNE``: "1" tunes, "0" (default) uses the heuristics; anything else is refused, as the other
    switches are (a "yes" that silently meant off would cost a user the tuning they asked for)."""
    # Off by default until the tuner has run on a GPU (perf/NOTES.md); then the default flips to on.
    value = os.environ.get("TRITONRNN_AUTOTUNE", "0").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"TRITONRNN_AUTOTUNE should be 0 or 1, got {value!r}")
    return value == "1"


def cache_dir() -> pathlib.Path:
    configured = os.environ.get("TRITONRNN_CACHE_DIR", "").strip()
    if configured:
        return pathlib.Path(configured).expanduser()  # "~/cache" as a shell would, not a folder named "~"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "tritonrnn"


def slug(text: str) -> str:
    """A file-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def batch_bucket(batch: int) -> int:
    """Batch sizes share a configuration within powers of two (17 and 30 tune once, as 32)."""
    return next_pow2(max(1, batch))


@dataclasses.dataclass(frozen=True)
class TuneKey:
    cell: str
    hidden: int
    batch_bucket: int
    dtype: str  # "bf16", "fp16", "fp32"
    directions: int = 1
    proj: int = 0
    tf32: bool = False  # fp32 only: TF32 dots are another kernel, with other timings

    def text(self) -> str:
        text = f"{self.cell}|H={self.hidden}|B<={self.batch_bucket}|{self.dtype}|D={self.directions}|P={self.proj}"
        return text + "|tf32" if self.tf32 else text


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_h: int
    block_b: int
    num_warps: int
    num_stages: int = 3
    k_split: int = 1


class ConfigStore:
    """Tuned configurations of one GPU and Triton version in a JSON file, safe for concurrent processes."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    @classmethod
    def for_gpu(cls, gpu_name: str) -> ConfigStore:
        return cls(cache_dir() / f"autotune-{slug(gpu_name)}-triton-{triton.__version__}.json")

    def load(self) -> dict[str, dict]:
        """The entries on disk; a missing file is empty, an unreadable or corrupt one is ignored with a warning, and
        so is each entry that is not a configuration the tuner could have chosen (those keys are tuned again)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as error:
            log.warning("tritonrnn: ignoring the unreadable autotune cache %s (%s)", self.path, error)
            return {}
        try:
            data = json.loads(text)
            if not _is_store_layout(data):
                raise ValueError(f"not a tritonrnn autotune file of format {FORMAT}")
        except (ValueError, RecursionError) as error:  # RecursionError: json's parser on a deeply nested file
            log.warning("tritonrnn: ignoring the corrupt autotune cache %s (%s); it will be rebuilt", self.path, error)
            return {}
        configs = {}
        for key, entry in data["configs"].items():
            problem = entry_problem(entry)
            if problem is None:
                configs[key] = entry
            else:
                log.warning("tritonrnn: ignoring the autotune entry %s in %s (%s); it will be tuned again", key,
                            self.path, problem)  # fmt: skip
        return configs

    def get(self, key: TuneKey) -> dict | None:
        return self.load().get(key.text())

    def put(self, entries: dict[str, dict]) -> None:
        """Merge entries into the file: read, update and atomically replace it under an exclusive lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            configs = self.load()
            configs.update(entries)
            # An ordinary file, readable as the umask allows (a TRITONRNN_CACHE_DIR shared by a team): created 0666
            # for the kernel to apply the umask (mkstemp's are private, and reading the umask means setting it,
            # process-wide). Unique under the lock: the process id.
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": FORMAT, "configs": configs}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())  # the data on disk before the rename: a crash leaves the old file or the new
                os.replace(tmp, self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _is_store_layout(data) -> bool:
    """The JSON layout of a cache or export file of this FORMAT."""
    return isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("configs"), dict)


_CHOICES = {
    "block_h": BLOCK_H,
    "block_b": BLOCK_B,
    "num_warps": NUM_WARPS,
    "num_stages": NUM_STAGES,
    "k_split": K_SPLITS,
}
# Entries written before k_split existed have one chunk.
_OPTIONAL = {"k_split"}


def entry_problem(entry) -> str | None:
    """Why a stored entry is not a configuration the tuner could have chosen, or None."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for name in ("forward", "backward"):
        config = entry.get(name)
        if not isinstance(config, dict) or not set(_CHOICES) - _OPTIONAL <= set(config) <= set(_CHOICES):
            return f"{name}: expected the fields {', '.join(_CHOICES)}, got {config!r}"
        for field, choices in _CHOICES.items():
            if field not in config:
                continue
            value = config[field]
            if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
                return f"{name}.{field}: {value!r} is not one of {choices}"
    return None


def shipped_defaults(gpu_name: str) -> dict[str, dict]:
    """Configurations tuned by the project for this GPU, shipped in the package (empty if none)."""
    path = pathlib.Path(__file__).parent / "tuned" / f"{slug(gpu_name)}.json"
    if not path.is_file():
        return {}
    return ConfigStore(path).load()


def candidates(
    hidden: int, batch: int, directions: int, sm_count: int, proj: int = 0, gates: int = 1, fma: bool = False
) -> list[KernelConfig]:
    """Configurations worth compiling: persistent grids that fit at once, tiles no larger than the problem. Also the
    reduction in one chunk a warp, over 16- or 32-row batch tiles, where the chunks can hold MIN_DOT rows
    (``Tuner.tune`` drops those whose held rows do not); with a projection (``proj``) both its reductions, over H and
    over P, are cut (_plan.with_projection_chunks), so the smaller one decides. (A 32-row tile reads the rows a plan
    streams half as often at large batches, and spills in float32's backward: perf/NOTES.md, for the timing to say.)

    ``fma``: the dots run on the FMA units (float32 without TF32). There a cell of several gates (``gates``) takes its
    reduction in one piece only over 16-row tiles and with 8 warps: with 4 warps, or 32 and 64 rows, it spills 5-14 KB
    a thread (sm_90, Triton 3.9, H=256 and 512), and Triton 3.9's LLVM aborts the process compiling such an LSTM
    forward (the assertion _plan.fma_one_chunk_transposes names), which no fit check can catch."""
    rows = max(MIN_DOT, next_pow2(min(hidden, proj) if proj else hidden))
    result = []
    for block_h, block_b, num_warps, num_stages in itertools.product(BLOCK_H, BLOCK_B, NUM_WARPS, NUM_STAGES):
        if block_h > max(MIN_DOT, next_pow2(hidden)) or block_b > max(MIN_DOT, next_pow2(batch)):
            continue
        if -(-hidden // block_h) * directions > sm_count:
            continue  # both directions' programs must be resident at once
        if not (fma and gates > 1 and (block_b > MIN_DOT or num_warps < 8)):
            result.append(KernelConfig(block_h, block_b, num_warps, num_stages))
        if block_b <= 2 * MIN_DOT and rows // num_warps >= MIN_DOT:
            result.append(KernelConfig(block_h, block_b, num_warps, num_stages, k_split=num_warps))
    return result


def to_plan(config: KernelConfig, key: TuneKey, device: torch.device) -> LayerPlan:
    """The configuration's plan, with the batch groups of the key's batch bucket (kernel_plan sets those of the
    actual batch); one group with a projection, whose kernels run the whole batch in one group."""
    plan = plan_with(
        key.cell, key.hidden, key.directions, device, DTYPES[key.dtype], config.block_h, config.block_b,
        config.num_warps, config.num_stages, key.batch_bucket, config.k_split,
    )  # fmt: skip
    return single_group(plan) if key.proj else plan


@dataclasses.dataclass
class Tuner:
    """Chooses configurations; the GPU-facing steps are functions so that tests can replace them."""

    misfit: Callable[[LayerPlan], str | None]  # why a plan's kernels cannot run (compiled, not launched)
    time_forward: Callable[[LayerPlan], float]  # ms of the forward at TUNE_STEPS
    time_backward: Callable[[LayerPlan, LayerPlan], float]  # ms of forward + backward (forward plan fixed)

    def tune(self, configs: Iterable[KernelConfig], key: TuneKey, device: torch.device) -> dict:
        plans = {c: to_plan(c, key, device) for c in configs}
        # Chunks of fewer than MIN_DOT held rows (where a wide slice holds only part of its rows) do not compile.
        plans = {c: p for c, p in plans.items() if p.block_k // p.k_split >= MIN_DOT}
        fitting = {c: p for c, p in plans.items() if p.persistent and self.misfit(p) is None}
        if not fitting:
            raise LookupError("no candidate configuration fits this GPU")
        forward_ms = _timings(fitting, self.time_forward, key)
        best_forward = min(forward_ms, key=forward_ms.get)
        backward_ms = _timings(fitting, lambda p: self.time_backward(fitting[best_forward], p), key)
        best_backward = min(backward_ms, key=backward_ms.get)
        return {
            "forward": dataclasses.asdict(best_forward),
            "backward": dataclasses.asdict(best_backward),
            "forward_ms": forward_ms[best_forward],
            "forward_backward_ms": backward_ms[best_backward],
            "candidates": len(fitting),
        }


def _timings(plans: dict[KernelConfig, LayerPlan], time: Callable[[LayerPlan], float], key: TuneKey) -> dict:
    """ms of each plan by ``time``. A candidate that fails to run (a launch refused, the timing's memory not there)
    is left out, logged once, rather than ending the tuning and the user's call; LookupError when none ran."""
    result, failed = {}, []
    for config, plan in plans.items():
        try:
            result[config] = time(plan)
        except Exception as error:  # any candidate's failure: the others are timed, the caller's call still runs
            failed.append(f"{config}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}")
    if failed:
        log_once(f"tritonrnn: tuning {key.text()}: {len(failed)} of {len(plans)} candidates failed to run, left out "
                 f"(first: {failed[0]})")  # fmt: skip
    if not result:
        raise LookupError(f"no candidate configuration ran on this GPU ({failed[0]})")
    return result


def plan_from_entry(entry: dict, key: TuneKey, device: torch.device) -> LayerPlan:
    forward = to_plan(KernelConfig(**entry["forward"]), key, device)
    backward = to_plan(KernelConfig(**entry["backward"]), key, device)
    return dataclasses.replace(forward, backward=backward if backward != forward else None)


def tuned_plan(key: TuneKey, device: torch.device, tuner_factory: Callable[[], Tuner]) -> LayerPlan | None:
    """The tuned plan for key: the user's cache, then the shipped defaults, then tuning now; None to use heuristics."""
    if not enabled():
        return None
    index = cuda_index(device)
    gpu = torch.cuda.get_device_name(index)
    store = ConfigStore.for_gpu(gpu)
    # The programs resident at once: a plan's persistence and directions together follow them, and they drop where the
    # driver refuses a cooperative launch (_plan.cooperative_refused): the plan is made again then.
    memo_key = (str(store.path), key, index, resident_programs(index))
    if memo_key not in _memo:  # the file is read once per process and key, not at every call
        # One tuning at a time on a GPU (two at once would time each other's kernels): a thread asking meanwhile, for
        # this key or another, waits, then finds what it asked for tuned or tunes it.
        with _memo_lock:
            lock = _gpu_locks.setdefault(index, threading.RLock())
        with lock:
            if memo_key not in _memo:
                plan = _tuned_plan(key, device, tuner_factory, gpu, store)
                if plan is _LATER:
                    return None
                _memo[memo_key] = plan
    return _memo[memo_key]


_memo: dict[tuple, LayerPlan | None] = {}
_memo_lock = threading.Lock()
_gpu_locks: dict[int, threading.RLock] = {}
_LATER = object()  # not tuned now (graph capture): heuristics for this call, tuning at a later one


def _tuned_plan(
    key: TuneKey, device: torch.device, tuner_factory: Callable[[], Tuner], gpu: str, store: ConfigStore
) -> LayerPlan | None | object:
    entry = store.get(key) or shipped_defaults(gpu).get(key.text())
    if entry is None:
        if capturing(device):
            log_once(f"tritonrnn: no tuned configuration for {key.text()} during CUDA graph capture; using heuristics")
            return _LATER
        log_once(f"tritonrnn: tuning {key.text()} on {gpu} (once; cached in {store.path})")
        sm_count = resident_programs(cuda_index(device))
        fma = key.dtype == "fp32" and not key.tf32  # the dots on the FMA units (_plan.fma_dots)
        configs = candidates(key.hidden, key.batch_bucket, key.directions, sm_count, key.proj, CELLS[key.cell][1], fma)
        try:
            entry = tuner_factory().tune(configs, key, device)
        except LookupError as error:
            log_once(f"tritonrnn: {key.text()}: {error}; using heuristics")
            return None
        try:
            store.put({key.text(): entry})
        except OSError as error:  # the tuning still serves this process (the memo); the next one tunes again
            log_once(f"tritonrnn: cannot write the autotune cache {store.path} ({error}); set TRITONRNN_CACHE_DIR "
                     "to a writable folder to keep tuned configurations")  # fmt: skip
    return plan_from_entry(entry, key, device)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"], choices=sorted(CELLS))
    parser.add_argument("--hidden", nargs="+", type=_positive_int, default=[256, 512, 1024])
    parser.add_argument("--batch", nargs="+", type=_positive_int, default=[1, 16, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--bidirectional", action="store_true", help="tune two-direction layers too")
    parser.add_argument("--export", type=pathlib.Path, help="also write the tuned entries to this file")
    args = parser.parse_args(argv)
    # Checked before anything is tuned: a matrix's tuning must not end in an export that cannot be written, nor
    # overwrite a file that is not an export.
    if args.export is not None:
        if args.export.is_dir():
            parser.error(f"--export {args.export}: a folder; name the file to write")
        if args.export.exists() and not _is_autotune_file(args.export):
            parser.error(f"--export {args.export}: an existing file that is not a tritonrnn autotune export; "
                         "not overwriting it")  # fmt: skip
    return args


def _is_autotune_file(path: pathlib.Path) -> bool:
    try:
        return _is_store_layout(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    """Pre-tune a matrix on this GPU (results land in the cache; --export writes them to a file too)."""
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        print("tritonrnn.autotune: no CUDA GPU; there is nothing to tune (the CPU paths have no configurations)")
        return 2
    os.environ["TRITONRNN_AUTOTUNE"] = "1"  # this command is the request to tune
    from tqdm import tqdm

    from tritonrnn import functional, layer_run

    device = torch.device("cuda", torch.cuda.current_device())
    directions = [1, 2] if args.bidirectional else [1]
    matrix = list(itertools.product(args.cells, args.hidden, args.batch, args.dtypes, directions))
    keys = []
    for cell, hidden, batch, dtype, d in tqdm(matrix, desc="tuning", unit="config"):
        # kernel_plan tunes (or finds) the configuration as a first call would.
        plan = functional.kernel_plan(cell, hidden, batch, DTYPES[dtype], device, layer_run.Variant(directions=d))
        tf32 = tf32_matmul() and dtype == "fp32"
        keys.append(TuneKey(cell, hidden, batch_bucket(batch), dtype, d, tf32=tf32).text())
        if isinstance(plan, str):
            print(f"{keys[-1]}: {plan}")
    store = ConfigStore.for_gpu(torch.cuda.get_device_name(device))
    configs = store.load()
    print(f"cache: {store.path}")
    if args.export:
        ConfigStore(args.export).put({k: configs[k] for k in keys if k in configs})
        print(f"exported {sum(k in configs for k in keys)} configurations to {args.export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
