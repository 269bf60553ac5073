"""The Triton interpreter's memory accesses checked against the launch's tensors: a load, store or atomic at an address
outside the storage of every tensor argument raises, where the GPU would fault or read garbage.

The interpreter of Triton 3.6 to 3.9 reads and writes whatever memory an address names. A read past a tensor returns
what lies there (a test may pass on it); a write corrupts the Python heap: in a mutation audit, the reverse direction's
time index off by one hung pytest inside free(), which CI would have shown as a time-out, not a failure. conftest
installs this under the interpreter (``test_an_access_outside_the_launchs_tensors_raises`` checks it is installed).
Masked-off lanes are not accesses; the check is against whole storages (a view's neighbours in its storage pass).
"""

from __future__ import annotations

import threading

import numpy as np
from triton.runtime import interpreter


class OutOfBounds(IndexError):
    pass


_lock = threading.Lock()
_launches: dict[int, list[tuple[int, int]]] = {}  # the running launches' storages, [start, end) in bytes
_bounds = (np.empty(0, np.uint64), np.empty(0, np.uint64))  # their union: sorted starts and the matching ends


def _storages(value, found: list[tuple[int, int]]) -> None:
    if isinstance(value, (tuple, list)):
        for item in value:
            _storages(item, found)
    elif hasattr(value, "untyped_storage"):
        storage = value.untyped_storage()
        found.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))


def _set_bounds() -> None:
    global _bounds
    ranges = sorted(set(r for launch in _launches.values() for r in launch))
    _bounds = (np.array([a for a, _ in ranges], np.uint64), np.array([b for _, b in ranges], np.uint64))


def _check(ptrs, mask, what: str) -> None:
    addresses = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    if addresses.size == 0:
        return
    addresses = addresses.astype(np.uint64).ravel()
    size = np.uint64(np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
    starts, ends = _bounds
    index = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
    inside = (index >= 0) & (addresses + size <= ends[np.maximum(index, 0)] if ends.size else False)
    if not np.all(inside):
        bad = addresses[~inside]
        raise OutOfBounds(
            f"a {what} of {bad.size} address(es) outside every tensor argument of the launch (first {int(bad[0]):#x}; "
            f"the tensors' storages: {[(hex(int(a)), hex(int(b))) for a, b in zip(starts, ends)]})"
        )


def install() -> None:
    """Check every load, store and atomic of the interpreter's launches against their tensors (once)."""
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    if getattr(executor.__call__, "checks_bounds", False):
        return
    call, load, store = executor.__call__, builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def checked_call(self, *args, **kwargs):
        ranges: list[tuple[int, int]] = []
        _storages(list(args) + list(kwargs.values()), ranges)
        key = object()
        with _lock:
            _launches[id(key)] = ranges
            _set_bounds()
        try:
            return call(self, *args, **kwargs)
        finally:
            with _lock:
                del _launches[id(key)]
                _set_bounds()

    # Triton 3.6 and 3.9 differ in the cache arguments that follow: passed on as they come.
    def checked_load(self, ptrs, mask, other, *rest):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest)

    def checked_rmw(self, op, ptr, value, mask, *rest):
        _check(ptr, mask, "read-modify-write atomic")
        return rmw(self, op, ptr, value, mask, *rest)

    def checked_cas(self, ptr, compare, value, *rest):
        _check(ptr, None, "compare-and-swap")
        return cas(self, ptr, compare, value, *rest)

    checked_call.checks_bounds = True
    executor.__call__ = checked_call
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = checked_rmw, checked_cas
