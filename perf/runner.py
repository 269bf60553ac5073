"""The benchmark runner: every config of a suite x pass x provider becomes one tidy row.

Providers on a GPU: ``tritonrnn`` (our module); ``cudnn`` (torch.nn eager, weights flattened, bf16's too);
``cudnn_graph`` (the same torch.nn call captured in a CUDA graph and replayed: the strongest cuDNN).
Without a GPU: ``tritonrnn`` (its CPU path) and ``torch_cpu`` (torch.nn on the CPU): a CPU comparison,
not a GPU benchmark. All providers of a config share the weights (torch.manual_seed, load_state_dict)
and the input.

Passes: "fwd" is inference (eval mode, no autograd) and returns the output; "fwd+bwd" is forward and
backward in train mode (dropout acts) and returns the output and the gradients of the input and of every
parameter (torch.autograd.grad, so no .grad accumulates between timed calls); "train" is the same step on data, the
input without ``requires_grad``: the output and the parameters' gradients alone. The last is what a model's
recurrent layer over its data does in training: tritonrnn then forms no dL/dx, while torch.nn's cuDNN backward forms
it whatever the input needs (aten/src/ATen/native/cudnn/RNN.cpp runs cuDNN's backward-data call unconditionally).

Each row: median and 20/80 quantiles in ms (GPU: ``triton.testing.do_bench``, which also flushes L2
between calls; CPU: a perf_counter loop), peak memory above what was allocated before the call (GPU),
and the relative error of the returned tensors against a float64 run of torch.nn with the same weights
and input on the same device. With dropout in a training step the masks are random: tritonrnn is
checked against a float64 copy of itself with the same ``torch.manual_seed`` (its masks come from
the device's default generator, so the same seed draws the same masks); torch.nn's masks cannot be
reproduced, so cuDNN's error is NaN and the note says why. A provider that cannot run a config gives a
row with status "error: ..." instead of numbers.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import pathlib
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from unittest import mock

import pandas as pd
import torch
import triton
import triton.testing
from torch import Tensor, nn
from tqdm import tqdm

import tritonrnn
from perf.schema import COLUMNS, CONFIG_KEYS, CPU_PROVIDERS, GPU_PROVIDERS, PROVIDERS, ROW_KEYS, PerfError
from perf.suites import Config, Suite

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch.manual_seed before building a config's weights and inputs, and before each call whose dropout
# masks must match its float64 reference.
WEIGHT_SEED = 0
MASK_SEED = 1234
NO_ERROR_WITH_DROPOUT = "torch.nn's dropout masks cannot be reproduced: no error measured"
ERROR_VS_OWN_FLOAT64 = "error vs a float64 copy of tritonrnn with the same dropout masks"

Step = Callable[[], list[Tensor]]


def select_providers(requested: Sequence[str] | None, device: torch.device) -> list[str]:
    """The providers to run, in the canonical order: all that this device offers unless some are named."""
    offered = GPU_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS
    if not requested:
        return list(offered)
    for name in requested:
        if name not in PROVIDERS:
            raise PerfError(f"unknown provider {name!r}: choose from {', '.join(PROVIDERS)}")
        if name not in offered:
            where = "a CUDA GPU" if name in GPU_PROVIDERS else "the CPU comparison (no GPU)"
            raise PerfError(f"provider {name!r} runs only with {where}; here: {', '.join(offered)}")
    return [name for name in offered if name in requested]


# --- timing and memory -------------------------------------------------------------------------------


def time_gpu(step: Step, min_samples: int = 10) -> tuple[float, ...]:
    """Median, 20% and 80% quantiles in ms of triton's do_bench, over ``min_samples`` timed calls at least (do_bench
    alone times a step of over 100 ms once, and one time has no noise band for compare to read)."""
    times = triton.testing.do_bench(step, warmup=50, rep=200, return_mode="all")
    if len(times) < min_samples:
        times = triton.testing.do_bench(step, warmup=0, rep=1.2 * min_samples * statistics.median(times),
                                        return_mode="all")  # fmt: skip
    return _quantiles(times)


def time_cpu(step: Step, min_repeats: int = 5, max_repeats: int = 50, budget_s: float = 0.5) -> tuple[float, ...]:
    """Median, 20% and 80% quantiles in ms of a perf_counter loop, after one warm-up call."""
    step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    return _quantiles(times)


def _quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles (linear between the sorted times, as torch.quantile)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), p20, p80


def peak_memory_mb(step: Callable[[], object]) -> float:
    """GPU memory one call needs on top of what was allocated before it (inputs, weights), in MB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def graphed(step: Step) -> tuple[Step, float]:
    """``step`` captured in a CUDA graph (warm-up on a side stream first, as torch's docs prescribe).

    Returns the replay, which hands back the graph's static outputs, and the capture's peak memory
    (replays reuse the memory the capture allocated, so the capture is where the graph's need shows).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    outputs: list[Tensor] = []

    def capture() -> None:
        with torch.cuda.graph(graph):
            outputs.extend(step())

    peak = peak_memory_mb(capture)

    def replay() -> list[Tensor]:
        graph.replay()
        return outputs

    return replay, peak


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Bring the GPU to its working clocks before the first timing."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
        torch.cuda.synchronize()


# --- one config --------------------------------------------------------------------------------------


def build_modules(config: Config, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """tritonrnn's module and torch.nn's with the same weights, in the config's dtype on ``device``."""
    name = {"lstm": "LSTM", "gru": "GRU"}.get(config.cell, "RNN")
    kwargs = dict(num_layers=config.L, bidirectional=config.bidirectional, dropout=config.dropout)
    if config.cell.startswith("rnn"):
        kwargs["nonlinearity"] = config.cell.removeprefix("rnn_")
    if config.proj_size:
        kwargs["proj_size"] = config.proj_size
    dtype = DTYPES[config.dtype]
    torch.manual_seed(WEIGHT_SEED)
    ours = getattr(tritonrnn, name)(config.input_size, config.H, dropout_mode=config.dropout_mode, **kwargs)
    theirs = getattr(nn, name)(config.input_size, config.H, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    ours.to(device=device, dtype=dtype)
    theirs.to(device=device, dtype=dtype)
    return ours, theirs


def flatten_for_cudnn(module: nn.RNNBase) -> str:
    """The module's weights in one buffer, as cuDNN reads them (after .to(): else it copies them into one at every
    call and keeps the copy for backward, ANCHORS.md); "" once they are, else a note for its rows. torch.nn's
    flatten_parameters() leaves bf16 weights apart (torch.backends.cudnn.CUDNN_TENSOR_DTYPES has no bf16, though
    cuDNN runs bf16 RNNs), so bf16 is let through for the call: the strongest cuDNN baseline, not torch.nn's default."""
    if not module.weight_ih_l0.is_cuda:
        return ""
    accepted = torch.backends.cudnn.CUDNN_TENSOR_DTYPES | {torch.bfloat16}
    try:
        with mock.patch.object(torch.backends.cudnn, "CUDNN_TENSOR_DTYPES", accepted):
            module.flatten_parameters()
    except RuntimeError as error:  # cuDNN refusing the layout: measured as torch.nn leaves it, and said so
        return f"cuDNN's weights not flattened ({str(error).splitlines()[0][:100]}): copied at every call"
    if not weights_in_one_buffer(module):
        return "cuDNN's weights not flattened: copied at every call"
    return ""


def weights_in_one_buffer(module: nn.RNNBase) -> bool:
    return len({w.untyped_storage().data_ptr() for w in module._flat_weights}) == 1


def make_step(module: nn.Module, x: Tensor, grad_out: Tensor, pass_: str) -> Step:
    """The timed call of one pass; sets the module's mode, so one module's steps run one after another."""
    if pass_ == "fwd":
        module.eval()

        def forward() -> list[Tensor]:
            with torch.no_grad():
                return [module(x)[0]]

        return forward
    module.train()
    x = x.detach().requires_grad_(pass_ == "fwd+bwd")
    params = [p for _, p in module.named_parameters()]
    wanted = [x, *params] if x.requires_grad else params

    def training_step() -> list[Tensor]:
        out = module(x)[0]
        return [out, *torch.autograd.grad(out, wanted, grad_out)]

    return training_step


def rel_err(got: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """Largest ||got - expected|| / ||expected|| over the tensors, in float64 (inf if got is not finite)."""
    if len(got) != len(expected):
        raise ValueError(f"{len(got)} tensors to check against {len(expected)}")
    worst = 0.0
    for actual, reference in zip(got, expected):
        actual = actual.detach().double()
        if not torch.isfinite(actual).all():
            return math.inf
        error = (actual - reference).norm() / reference.norm().clamp_min(1e-30)
        worst = max(worst, error.item())
    return worst


class Case:
    """One config's modules, input and output cotangent, shared by its providers, and its float64 references."""

    def __init__(self, config: Config, device: torch.device):
        self.config = config
        self.ours, self.theirs = build_modules(config, device)
        self.cudnn_note = flatten_for_cudnn(self.theirs)
        dtype = DTYPES[config.dtype]
        out_size = (2 if config.bidirectional else 1) * (config.proj_size or config.H)
        self.x = torch.randn(config.T, config.B, config.input_size, device=device, dtype=dtype)
        self.grad_out = torch.randn(config.T, config.B, out_size, device=device, dtype=dtype)
        self._references: dict[str, list[Tensor]] = {}

    def module(self, provider: str) -> nn.Module:
        return self.ours if provider == "tritonrnn" else self.theirs

    def random_masks(self, pass_: str) -> bool:
        """Dropout acts (between layers, in training), so outputs depend on random masks."""
        return self.config.dropout > 0 and self.config.L > 1 and pass_ != "fwd"

    def error(self, provider: str, pass_: str, step: Step) -> tuple[float, str]:
        """rel_err of one call of ``step`` against float64, and a note when it is not against torch.nn."""
        if not self.random_masks(pass_):
            if pass_ not in self._references:
                self._references[pass_] = self._float64_run(self.theirs, pass_)
            return rel_err(step(), self._references[pass_]), ""
        # A tritonrnn module handing this call to torch.nn (hidden size beyond the kernels) draws torch.nn's masks too.
        if provider != "tritonrnn" or self.ours._unsupported(self.x) is not None:
            return math.nan, NO_ERROR_WITH_DROPOUT
        torch.manual_seed(MASK_SEED)
        got = step()
        torch.manual_seed(MASK_SEED)
        # On the GPU the float64 copy runs tritonrnn's reference path (the kernels take no float64 there).
        return rel_err(got, self._float64_run(self.ours, pass_)), ERROR_VS_OWN_FLOAT64

    def _float64_run(self, module: nn.Module, pass_: str) -> list[Tensor]:
        module = copy.deepcopy(module).double()
        module.flatten_parameters()
        with tritonrnn_log(None):  # the float64 copy's fallback is expected, not news about the measured module
            return make_step(module, self.x.double(), self.grad_out.double(), pass_)()


# --- tritonrnn's log ----------------------------------------------------------------------------------


class _Collector(logging.Handler):
    """Keeps what tritonrnn logs (fallbacks to slower paths) for the note of the row being measured."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.messages is not None:
            self.messages.append(record.getMessage())


_collector = _Collector()


@contextmanager
def tritonrnn_log(messages: list[str] | None) -> Iterator[None]:
    """Route tritonrnn's log records into ``messages`` (None: drop them) for the duration; nests."""
    logger = logging.getLogger("tritonrnn")
    added = _collector not in logger.handlers
    if added:
        logger.addHandler(_collector)
    saved, _collector.messages = _collector.messages, messages
    try:
        yield
    finally:
        _collector.messages = saved
        if added:
            logger.removeHandler(_collector)


def measure(case: Case, provider: str, pass_: str) -> dict:
    """One row's numbers: timings, peak memory, error, and a note."""
    on_gpu = case.x.device.type == "cuda"
    logged: list[str] = []
    with tritonrnn_log(logged):
        step = make_step(case.module(provider), case.x, case.grad_out, pass_)
        if provider == "cudnn_graph":
            step, peak = graphed(step)
        else:
            step()  # first call: Triton compiles, cuDNN picks its algorithm
            peak = peak_memory_mb(step) if on_gpu else math.nan
        error, note = case.error(provider, pass_, step)
        median, p20, p80 = time_gpu(step) if on_gpu else time_cpu(step)
    # tritonrnn logs each fallback once per process: later configs with the same one carry no note.
    cudnn_note = case.cudnn_note if provider in ("cudnn", "cudnn_graph") else ""
    note = "; ".join([n for n in [note, cudnn_note, *(f"tritonrnn logged: {m}" for m in logged)] if n])
    config = case.config
    return dict(ms_median=median, ms_p20=p20, ms_p80=p80, us_per_step_layer=median * 1e3 / (config.T * config.L),
                peak_mem_mb=peak, rel_err=error, status="ok", note=note)  # fmt: skip


def _error_row(error: Exception) -> dict:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    nan = math.nan
    return dict(ms_median=nan, ms_p20=nan, ms_p80=nan, us_per_step_layer=nan, peak_mem_mb=nan, rel_err=nan,
                status=f"error: {type(error).__name__}: {message}"[:300], note="")  # fmt: skip


# --- a suite -------------------------------------------------------------------------------------------


def context(device: torch.device) -> dict:
    """The columns every row of a run shares: where and with what it ran."""
    on_gpu = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if on_gpu and torch.backends.cudnn.is_available() else None
    return dict(
        gpu=torch.cuda.get_device_name(device) if on_gpu else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda or "",
        cudnn=str(cudnn) if cudnn else "",
        tf32=torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32,
        switches=_switches(),
        commit=_commit(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _switches() -> str:
    """The TRITONRNN_* variables that change the launches (not the cache folder: it moves with the machine)."""
    names = sorted(k for k in os.environ if k.startswith("TRITONRNN_") and k != "TRITONRNN_CACHE_DIR")
    return " ".join(f"{k}={os.environ[k]}" for k in names)


def _commit() -> str:
    """The checkout's commit; PERF_COMMIT where the tree is a copy without its git history (a lent GPU's)."""
    if os.environ.get("PERF_COMMIT"):
        return os.environ["PERF_COMMIT"]
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:  # no git on this machine
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


@contextmanager
def tf32_flags(enabled: bool) -> Iterator[None]:
    """Both torch TF32 flags set for the run (off: fp32 is IEEE for tritonrnn and cuDNN alike), then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_suite(
    suite: Suite, providers: Sequence[str], device: torch.device, tf32: bool = False,
    deadline: float | None = None, checkpoint: pathlib.Path | None = None, done: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, int]:  # fmt: skip
    """Every config x pass x provider of ``suite`` on ``device``: the results table (schema.COLUMNS).

    ``deadline`` (a ``time.monotonic()`` value): no config starts after it; configs run in the suite's order, so a
    suite lists what matters most first. ``checkpoint``: the rows so far are written there after every config,
    so a run killed from outside (a hung kernel, a device call's time limit) still leaves what it measured.
    ``done``: rows of an earlier run (same GPU, same TF32 setting): a config whose every pass and provider has an
    "ok" row there keeps those rows, as they were measured, instead of being measured again (a suite spread over
    several device calls). Returns the table and the number of configs left unmeasured by the deadline.
    """
    rows = []
    left = 0
    with tf32_flags(tf32):
        shared = context(device)
        kept = _kept_rows(done, suite, providers, device, tf32, shared)
        if device.type == "cuda" and len(kept) < len(suite.configs):
            warm_up_gpu()
        bar = tqdm(total=len(suite.configs) * len(providers), desc=f"perf {suite.name}", unit="item")
        for index, config in enumerate(suite.configs):
            if config.key() in kept:
                rows += kept[config.key()]
                bar.update(len(providers))
                continue
            if deadline is not None and time.monotonic() > deadline:
                left = sum(c.key() not in kept for c in suite.configs[index:])
                break
            case, setup_error = None, None
            try:
                case = Case(config, device)
            except Exception as error:  # a config that cannot be built: an error row for each of its items
                setup_error = error
            for provider in providers:
                bar.set_postfix_str(f"{config.cell} {config.dtype} B{config.B} H{config.H} L{config.L} {provider}")
                for pass_ in config.passes:
                    if setup_error is not None:
                        numbers = _error_row(setup_error)
                    else:
                        try:
                            numbers = measure(case, provider, pass_)
                        except Exception as error:  # recorded in the row's status, never skipped
                            numbers = _error_row(error)
                    rows.append({"suite": suite.name, **_config_columns(config), "pass": pass_, "provider": provider,
                                 **numbers, **shared})  # fmt: skip
                bar.update()
            del case
            if checkpoint is not None:  # first: after a kernel's illegal access every CUDA call below raises
                pd.DataFrame(rows, columns=COLUMNS).to_csv(checkpoint, index=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        bar.close()
    return pd.DataFrame(rows, columns=COLUMNS), left


def _kept_rows(
    done: pd.DataFrame | None,
    suite: Suite,
    providers: Sequence[str],
    device: torch.device,
    tf32: bool,
    shared: dict,
) -> dict[tuple, list[dict]]:
    """Config key -> the rows of ``done`` that complete it (every pass and provider "ok"); configs not complete
    there are measured again, whole. ``shared``: this run's context, which the rows must share but for the commit
    and the time."""
    if done is None or done.empty:
        return {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if set(done["gpu"]) != {gpu}:
        raise PerfError(f"the rows to resume from were measured on {', '.join(set(done['gpu']))}, not on {gpu}")
    if set(done["tf32"]) != {tf32}:
        raise PerfError(f"the rows to resume from were measured with TF32 {'off' if tf32 else 'on'}")
    for column in ["torch", "triton", "cuda", "cudnn", "switches"]:
        if set(done[column]) != {shared[column]}:
            raise PerfError(
                f"the rows to resume from were measured with {column} {', '.join(map(repr, set(done[column])))}, "
                f"not {shared[column]!r}: their times do not belong in one run with this one's"
            )
    ok = done[done["status"] == "ok"]
    by_row = {tuple(r[k] for k in ROW_KEYS): r.to_dict() for _, r in ok.iterrows()}
    kept = {}
    for config in suite.configs:
        columns = _config_columns(config)
        wanted = [(*(columns[k] for k in CONFIG_KEYS), pass_, provider) for provider in providers
                  for pass_ in config.passes]  # fmt: skip
        if all(key in by_row for key in wanted):
            kept[config.key()] = [{**by_row[key], "suite": suite.name} for key in wanted]
    return kept


def _config_columns(config: Config) -> dict:
    return dict(cell=config.cell, dtype=config.dtype, B=config.B, H=config.H, T=config.T, L=config.L,
                input_size=config.input_size, bidirectional=config.bidirectional, dropout=config.dropout,
                dropout_mode=config.dropout_mode, proj_size=config.proj_size, options=config.options)  # fmt: skip
