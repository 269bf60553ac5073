"""Shared test setup.

Without a CUDA GPU the Triton kernels run under the interpreter on CPU tensors; that has to be
decided before triton is first imported, which is why it happens here, at the top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tritonrnn import _plan, functional, layer_run  # noqa: E402

HAS_GPU = torch.cuda.is_available()
# Where the device-generic tests run: the GPU when there is one, else the CPU under the interpreter.
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


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

    monkeypatch.setattr(layer_run, "_empty", nan_empty)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 tests run in IEEE precision; TF32 is checked separately."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def forced_plan():
    """Set plan overrides for one test (``forced_plan(block_h=16, persistent=False)``), cleared after."""
    yield _plan.force_plan
    _plan.force_plan()


@pytest.fixture
def fused_only(monkeypatch):
    """The stack kernel on; the layer-by-layer path and the wavefront on streams must not be taken."""
    monkeypatch.setenv("TRITONRNN_WAVEFRONT", "fused")
    monkeypatch.setattr(functional, "_layer", None)
    monkeypatch.setattr(functional, "_wavefront_stack", None)
