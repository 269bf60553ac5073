"""Shared test setup.

Without a CUDA GPU the Triton kernels run under the interpreter on CPU tensors; that has to be
decided before triton is first imported, which is why it happens here, at the top.
"""

import contextlib
import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from perf.warm import cores  # noqa: E402
from tritonrnn import _plan, functional, layer_run  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_bounds  # noqa: E402
    import interpreter_masked_loads  # noqa: E402
    import interpreter_rounding  # noqa: E402
    import interpreter_speed  # noqa: E402

    interpreter_rounding.install()  # the interpreter's float32 -> bf16 casts rounded as the GPU rounds them
    interpreter_masked_loads.install()  # a masked load's lanes without `other` NaN, not zeros: undefined on a GPU
    interpreter_bounds.install()  # an access outside the launch's tensors raises (the interpreter would do it)
    interpreter_speed.install()  # triton.language patched once a launch, not again at every helper call (a third)

HAS_GPU = torch.cuda.is_available()
# Where the device-generic tests run: the GPU when there is one, else the CPU under the interpreter.
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the README's test command): one worker per core on the CPU, where the interpreter keeps each
    busy; with a GPU, one per two cores and at most 8, since the workers share the one GPU and its memory."""
    return max(1, min(8, cores() // 2)) if HAS_GPU else cores()


if not HAS_GPU and os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Workers share the cores: torch's own threads on top of them would only contend.
    torch.set_num_threads(max(1, cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must fill starts as NaN, so an element they skip fails the test."""

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_plan, "empty_buffer", nan_empty)


# The fallback messages (tritonrnn._plan.log_once): a layer on the reference or on torch's op, a module on torch.nn,
# a fused stack declined.
FALLBACK_PHRASES = (
    "reference implementation",
    "runs the reference",
    "torch.nn's implementation",
    "torch's own RNN op",
    "layer by layer",
)


_expected = []


@contextlib.contextmanager
def fallback_expected():
    """The fallbacks inside are the test's intent (a float64 reference model on the GPU, say), those outside are
    still failures: finer than marking the whole test ``fallback``."""
    _expected.append(True)
    try:
        yield
    finally:
        _expected.pop()


@pytest.fixture(autouse=True)
def no_silent_fallback(request, monkeypatch):
    """A test runs on the kernels unless it is marked ``fallback``: a fallback during an unmarked test fails it, so
    a check of the kernels cannot pass on the reference or torch.nn. Each test starts with no message logged yet
    (log_once logs each message once per process), so every fallback of the test is seen."""
    monkeypatch.setattr(_plan, "_logged", set())
    seen = []

    class Recorder(logging.Handler):
        def emit(self, record):
            if not _expected:
                seen.append(record.getMessage())

    handler = Recorder(logging.WARNING)
    logger = logging.getLogger("tritonrnn")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    fallbacks = [m for m in seen if any(phrase in m for phrase in FALLBACK_PHRASES)]
    if fallbacks and request.node.get_closest_marker("fallback") is None:
        pytest.fail(
            f"ran a fallback instead of the kernels (mark the test `fallback` if that is its subject): {fallbacks}"
        )


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 tests run in IEEE precision; TF32 is checked separately. cuDNN's own flag too (on by default in torch):
    torch.nn's layers and the fallback (torch's op) read it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def launched_plans(monkeypatch):
    """The plans of the single-layer kernels' launches, in order: (kernel name, plan), so a test can check that the
    path it names ran (a plan that misfits falls back quietly to another path)."""
    plans = []
    launch = layer_run.LayerRun._launch

    def recording(self, kernel, plan, *args, **kwargs):
        plans.append((kernel.__name__, plan))
        return launch(self, kernel, plan, *args, **kwargs)

    monkeypatch.setattr(layer_run.LayerRun, "_launch", recording)
    return plans


@pytest.fixture
def forced_plan(monkeypatch):
    """Set plan overrides for one test (``forced_plan(block_h=16, persistent=False)``), cleared after; every
    single-layer launch must have the overrides set at its time (a test of a split grid must not pass on one
    program)."""
    launch = layer_run.LayerRun._launch

    def checked(self, kernel, plan, *args, **kwargs):
        ignored = {k: v for k, v in _plan._forced_plan.items() if getattr(plan, k) != v}
        assert not ignored, f"{kernel.__name__} launched without the forced {ignored}: {plan}"
        return launch(self, kernel, plan, *args, **kwargs)

    monkeypatch.setattr(layer_run.LayerRun, "_launch", checked)
    yield _plan.force_plan
    _plan.force_plan()


@pytest.fixture
def fused_only(monkeypatch):
    """The stack kernel on; the layer-by-layer path and the wavefront on streams must not be taken."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    monkeypatch.setattr(functional, "_layer", None)
    monkeypatch.setattr(functional, "_wavefront_stack", None)
