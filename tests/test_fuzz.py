"""tests/fuzz.py, the random sweep, kept working: a few of its configurations pass in each mode, and each mode fails
once the kernels are broken (a sweep that could not fail would prove nothing)."""

from __future__ import annotations

import random

import fuzz
import pytest
import triton
import triton.language as tl
from conftest import DEVICE, fallback_expected

import tritonrnn
from tritonrnn.kernels import recurrent


def _configs(seed: int, count: int, concurrent: bool = False, keep=lambda config: True) -> list[dict]:
    rng = random.Random(seed)
    configs = []
    while len(configs) < count:
        config = fuzz.draw(rng, concurrent)
        if keep(config):
            configs.append(config)
    return configs


@pytest.fixture(autouse=True)
def sweep_judges_fallbacks():
    """The sweep judges the fallbacks itself: a fused stack declined (TRITONRNN_WAVEFRONT=fused on a stack it cannot
    fuse) is logged and allowed, the reference or torch.nn fails the configuration."""
    with fallback_expected():
        yield


def test_the_sweep_against_torch_passes():
    assert fuzz.main(["--seed", "7", "--count", "12" if DEVICE.type == "cpu" else "4"]) == 0  # GPU: compiles


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's threads (CPU only)")
def test_the_concurrent_sweep_passes():
    assert fuzz.main(["--seed", "7", "--count", "4", "--concurrent"]) == 0
    # float32 too (none of those four): numpy's float32 matmul may round a tile by its width (OpenBLAS on AVX-512)
    for config in _configs(8, 1, concurrent=True, keep=lambda c: c["dtype"] == "float32"):
        assert fuzz.check(config) == ("pass", []), config


@triton.jit
def _sigmoid_off_by_a_percent(x):
    return 1.01 / (1.0 + tl.exp(-x))


def _gated_layer_by_layer(config: dict) -> bool:
    """An LSTM or GRU module on the layer kernels, as the concurrent sweep's barrier test wants."""
    return config["kind"] == "module" and config["cell"] in ("lstm", "gru") and config["wavefront"] == "0" \
        and not config["proj_size"]  # fmt: skip


def _gated(config: dict) -> bool:
    cells = [config["cell"]] if config["kind"] == "module" else [cell for cell, _ in config["layers"]]
    return all(cell in ("lstm", "gru") for cell in cells)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a @triton.jit global replaced reaches the interpreter at once")
def test_the_sweep_fails_on_a_wrong_gate(monkeypatch):
    """Every kernel's cells (the layer kernels', the projection's, the stack kernel's) take recurrent.py's sigmoid."""
    configs = _configs(3, 6, keep=_gated)
    assert {c["kind"] for c in configs} == {"module", "stack"}
    monkeypatch.setattr(recurrent, "sigmoid", _sigmoid_off_by_a_percent)
    for config in configs:
        verdict, problems = fuzz.check(config)
        assert verdict == "fail" and any("relative error" in p for p in problems), (config, problems)


@triton.jit
def _no_barrier(counter, target):
    pass


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's threads (CPU only)")
def test_the_concurrent_sweep_fails_without_the_grid_barrier(monkeypatch):
    """Without the layer kernels' grid barrier, programs read h and gate gradients before the others wrote them."""
    # Several steps: the barrier is what orders one step's reads after the previous step's writes.
    configs = _configs(
        4, 3, concurrent=True, keep=lambda c: _gated_layer_by_layer(c) and c["exchange"] == "barrier" and c["steps"] > 1
    )  # fmt: skip
    monkeypatch.setattr(recurrent, "grid_barrier", _no_barrier)
    for config in configs:
        verdict, problems = fuzz.check(config)
        assert verdict == "fail" and any("NaN" in p or "differs" in p for p in problems), (config, problems)


def test_a_failure_in_a_reduced_precision_is_rerun_in_the_most_precise(monkeypatch):
    """A result beyond the dtype's tolerance is judged again against torch.nn's own error in that dtype; if it still
    fails, a reduced-precision failure that the most precise dtype passes is "precision only", one it fails too
    "fail"."""
    config = dict(_configs(5, 1, keep=lambda c: c["dtype"] != fuzz.MOST_PRECISE and not c["dropout"])[0])
    calls = []

    def run_config(config, bounds=None):
        calls.append((config["dtype"], bounds))
        return ["off"] if config["dtype"] != fuzz.MOST_PRECISE or fail_precise else []

    monkeypatch.setattr(fuzz, "run_config", run_config)
    monkeypatch.setattr(fuzz, "torch_errors", lambda config: {"out": 1.0})
    fail_precise = False
    assert fuzz.check(config)[0] == "precision only"
    fail_precise = True
    assert fuzz.check(config)[0] == "fail"
    bound = {"out": fuzz.TORCH_FACTOR}
    assert calls == [(config["dtype"], None), (config["dtype"], bound), (fuzz.MOST_PRECISE, bound)] * 2


def test_a_result_is_judged_by_the_bounds_it_is_given():
    """Within the tolerance, a result passes; with a negative bound on every result, the same results fail (the
    bounds torch.nn's own error gives are the ones applied). Negative, not 0: this configuration (H=1, float64) can
    agree with torch.nn exactly, as it does on an AVX2 CPU."""
    config = _configs(7, 1, keep=lambda c: c["kind"] == "module" and c["dtype"] == fuzz.MOST_PRECISE)[0]
    assert fuzz.run_config(config) == []
    names = fuzz.torch_errors(config)
    problems = fuzz.run_config(config, {name: -1.0 for name in names})
    assert len(problems) == len(names) and all("above -1.0e+00" in p for p in problems), problems


@pytest.mark.fallback
def test_a_configuration_that_falls_back_fails(monkeypatch):
    """A configuration must run on the kernels: torch.nn or the reference standing in for them fails it, though its
    results agree."""
    monkeypatch.setattr(tritonrnn.functional, "kernel_plan", lambda *args, **kwargs: "does not fit this GPU")
    monkeypatch.setattr(tritonrnn.layer_op, "plan_layer", lambda *args: "does not fit this GPU")

    def layer_by_layer(c):  # the fused stack plans its own launch
        return c["kind"] == "module" and c["dtype"] == fuzz.MOST_PRECISE and c["wavefront"] != "fused"

    for config in _configs(6, 2, keep=layer_by_layer):
        verdict, problems = fuzz.check(config)
        assert verdict == "fail" and all(p.startswith("fell back: ") for p in problems), (config, problems)
