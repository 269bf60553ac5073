"""Launching Triton kernels while a CUDA graph is being captured.

A Triton kernel's first launch loads its module (``cuModuleLoadData``), which CUDA forbids while a stream is
captured in torch's default ("global") capture mode: the capture breaks with "operation not permitted when stream
is capturing". A step captured without a warm-up call would hit it, and so would a kernel variant the warm-up did
not run (a sequence length chunked otherwise, a tuned plan first chosen during capture). Like torch's caching
allocator around its cudaMalloc during capture, the module is loaded with this thread's capture mode relaxed for
that call only: loading puts no work on the stream, and the launch that follows is captured as usual.

Only the capture of the current thread's current stream is seen; a global-mode capture in another thread still
forbids the load, as before. On ROCm, and wherever the NVIDIA driver's library cannot be opened, launches go
ahead as they did without this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

from tritonrnn._plan import capturing, log_once

CU_STREAM_CAPTURE_MODE_RELAXED = 2  # cuda.h: GLOBAL = 0, THREAD_LOCAL = 1, RELAXED = 2


def launch(kernel, grid: tuple[int, ...], device: torch.device, **kwargs) -> None:
    """``kernel[grid](**kwargs)``, its module loaded first where a capture is under way and it is not loaded yet."""
    if torch.version.hip is None and capturing(device):
        load_outside_capture(kernel, grid, kwargs)
    kernel[grid](**kwargs)


def load_outside_capture(kernel, grid: tuple[int, ...], kwargs: dict) -> None:
    """Compile (a host-only step) the variant this launch runs and load its module with the capture relaxed."""
    compiled = kernel.warmup(grid=grid, **kwargs)
    # Triton's CompiledKernel: module None until its first launch loads it. Anything else (a jit cache hook's None,
    # an asynchronous compile's future) is left to the launch, as before.
    if getattr(compiled, "module", True) is None and _exchange_function() is not None:
        with relaxed_capture_mode():
            compiled._init_handles()  # the load a first launch would make (Triton 3.6 to 3.9)


@contextlib.contextmanager
def relaxed_capture_mode() -> Iterator[None]:
    """This thread's stream capture mode relaxed, then put back (cuThreadExchangeStreamCaptureMode, push-pop)."""
    exchange = _exchange_function()
    mode = ctypes.c_int(CU_STREAM_CAPTURE_MODE_RELAXED)
    _check(exchange(ctypes.byref(mode)))
    try:
        yield
    except BaseException:
        exchange(ctypes.byref(mode))  # put back; the load's own error is the one to report
        raise
    _check(exchange(ctypes.byref(mode)))  # mode holds the thread's own mode since the first exchange


@functools.cache
def _exchange_function():
    """The driver's cuThreadExchangeStreamCaptureMode (the libcuda torch already loaded), or None, logged once."""
    try:
        function = ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode
    except (OSError, AttributeError) as error:
        log_once(f"tritonrnn: kernels first launched during CUDA graph capture load as Triton loads them ({error})")
        return None
    function.argtypes = [ctypes.POINTER(ctypes.c_int)]
    function.restype = ctypes.c_int
    return function


def _check(result: int) -> None:
    if result != 0:
        raise RuntimeError(f"tritonrnn: cuThreadExchangeStreamCaptureMode failed (CUresult {result})")
