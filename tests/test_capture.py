"""tritonrnn/_capture.py's mode switch, against a stand-in for the driver's cuThreadExchangeStreamCaptureMode (the
load itself, through Triton's own code, is checked by tests/fake_sm90_plans.py; a real capture by the GPU tier)."""

from __future__ import annotations

import pytest
import torch

from tritonrnn import _capture


@pytest.fixture
def thread_mode(monkeypatch):
    """The calling thread's capture mode (0: global, torch's default), swapped as the driver does."""
    mode = [0]

    def exchange(pointer) -> int:
        mode[0], pointer._obj.value = pointer._obj.value, mode[0]
        return 0

    monkeypatch.setattr(_capture, "_exchange_function", lambda: exchange)
    return mode


def test_the_relaxed_mode_holds_inside_and_the_threads_own_mode_returns_even_when_the_load_raises(thread_mode):
    thread_mode[0] = 1  # thread-local: whatever the thread had, it gets back
    with _capture.relaxed_capture_mode():
        assert thread_mode[0] == _capture.CU_STREAM_CAPTURE_MODE_RELAXED
    assert thread_mode[0] == 1
    with pytest.raises(ValueError, match="the load failed"):
        with _capture.relaxed_capture_mode():
            raise ValueError("the load failed")
    assert thread_mode[0] == 1


def test_a_driver_error_is_raised_naming_the_call(monkeypatch):
    monkeypatch.setattr(_capture, "_exchange_function", lambda: lambda pointer: 201)  # CUDA_ERROR_INVALID_CONTEXT
    with pytest.raises(RuntimeError, match=r"cuThreadExchangeStreamCaptureMode failed \(CUresult 201\)"):
        with _capture.relaxed_capture_mode():
            pass


class _Compiled:
    def __init__(self, loaded: bool):
        self.module = object() if loaded else None
        self.loads = 0

    def _init_handles(self):
        self.loads += 1


class _Kernel:
    """A JIT function's two calls that launch uses: warmup (compile, no launch) and kernel[grid](...)."""

    def __init__(self, compiled: _Compiled):
        self.compiled, self.launches = compiled, []

    def warmup(self, grid, **kwargs):
        return self.compiled

    def __getitem__(self, grid):
        return lambda **kwargs: self.launches.append((grid, kwargs))


@pytest.mark.parametrize("loaded", [False, True])
def test_a_launch_during_capture_loads_only_a_module_not_loaded_yet(monkeypatch, thread_mode, loaded):
    monkeypatch.setattr("torch.cuda.is_current_stream_capturing", lambda: True)
    kernel = _Kernel(_Compiled(loaded))
    _capture.launch(kernel, (3, 1), torch.device("cuda", 0), x=1)
    assert kernel.compiled.loads == (0 if loaded else 1)
    assert kernel.launches == [((3, 1), {"x": 1})]
    assert thread_mode[0] == 0


def test_no_capture_and_the_cpu_load_nothing_before_the_launch(monkeypatch, thread_mode):
    kernel = _Kernel(_Compiled(False))
    monkeypatch.setattr("torch.cuda.is_current_stream_capturing", lambda: False)
    _capture.launch(kernel, (2,), torch.device("cuda", 0), x=1)
    monkeypatch.setattr("torch.cuda.is_current_stream_capturing", lambda: True)  # a CPU tensor never asks
    _capture.launch(kernel, (2,), torch.device("cpu"), x=2)
    assert kernel.compiled.loads == 0 and len(kernel.launches) == 2


def test_the_loads_own_error_is_raised_even_where_putting_the_mode_back_fails(monkeypatch):
    results = iter([0, 999])  # the switch works, the restore fails

    monkeypatch.setattr(_capture, "_exchange_function", lambda: lambda pointer: next(results))
    with pytest.raises(ValueError, match="the load failed"):
        with _capture.relaxed_capture_mode():
            raise ValueError("the load failed")


class _Future:
    """What Triton's warmup returns inside AsyncCompileMode."""

    def result(self):
        raise AssertionError("the launch, not tritonrnn, waits for an asynchronous compile")


@pytest.mark.parametrize("compiled", [None, _Future()], ids=["a jit cache hook's None", "an asynchronous compile"])
def test_what_is_not_a_compiled_kernel_is_left_to_the_launch(monkeypatch, thread_mode, compiled):
    monkeypatch.setattr("torch.cuda.is_current_stream_capturing", lambda: True)
    kernel = _Kernel(compiled)
    _capture.launch(kernel, (1,), torch.device("cuda", 0), x=1)
    assert kernel.launches == [((1,), {"x": 1})] and thread_mode[0] == 0


def test_without_the_nvidia_driver_or_on_rocm_the_launch_goes_ahead_as_before(monkeypatch, caplog):
    monkeypatch.setattr("torch.cuda.is_current_stream_capturing", lambda: True)
    _capture._exchange_function.cache_clear()
    monkeypatch.setattr(_capture.ctypes, "CDLL", _no_library)
    try:
        kernel = _Kernel(_Compiled(False))
        with caplog.at_level("WARNING", logger="tritonrnn"):
            _capture.launch(kernel, (1,), torch.device("cuda", 0), x=1)
        assert kernel.compiled.loads == 0 and len(kernel.launches) == 1
        assert "load as Triton loads them (libcuda.so.1: cannot open" in caplog.text
    finally:
        _capture._exchange_function.cache_clear()
    monkeypatch.setattr("torch.version.hip", "6.2")
    monkeypatch.setattr("torch.cuda.is_current_stream_capturing", _never_asked)
    _capture.launch(kernel, (1,), torch.device("cuda", 0), x=2)
    assert kernel.compiled.loads == 0 and len(kernel.launches) == 2


def _no_library(name):
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


def _never_asked():
    raise AssertionError("a ROCm launch asked whether a CUDA capture is under way")
