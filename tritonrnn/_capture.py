"""Launching Triton kernels while a CUDA graph is being captured.

A Triton kernel's first launch loads its module (``cuModuleLoadData``), which CUDA forbids while a stream is
captured in torch's default ("global") capture mode: the capture breaks with "operation not permitted when stream
is capturing". A step captured without a warm-up call would hit it, and so would a kernel variant the warm-up did
not run (a sequence length chunked otherwise, a tuned plan first chosen during capture). Like torch's caching
allocator around its cudaMalloc during capture, the module is loaded with this thread's capture mode relaxed for
that call only: loading puts no work on the stream, and the launch that follows is captured as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

import torch

CU_STREAM_CAPTURE_MODE_RELAXED = 2  # cuda.h: GLOBAL = 0, THREAD_LOCAL = 1, RELAXED = 2


def launch(kernel, grid: tuple[int, ...], device: torch.device, **kwargs) -> None:
    """``kernel[grid](**kwargs)``, its module loaded first where a capture is under way and it is not loaded yet."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        load_outside_capture(kernel, grid, kwargs)
    kernel[grid](**kwargs)


def load_outside_capture(kernel, grid: tuple[int, ...], kwargs: dict) -> None:
    """Compile (a host-only step) the variant this launch runs and load its module with the capture relaxed."""
    compiled = kernel.warmup(grid=grid, **kwargs)
    if compiled.module is None:  # Triton's CompiledKernel: None until its first launch loads it
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
    finally:
        _check(exchange(ctypes.byref(mode)))  # mode holds the thread's own mode since the first exchange


@functools.cache
def _exchange_function():
    function = ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode  # the driver torch already loaded
    function.argtypes = [ctypes.POINTER(ctypes.c_int)]
    function.restype = ctypes.c_int
    return function


def _check(result: int) -> None:
    if result != 0:
        raise RuntimeError(f"tritonrnn: cuThreadExchangeStreamCaptureMode failed (CUresult {result})")
