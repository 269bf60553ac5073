"""tests/interpreter_speed.py: a launch patches triton.language once, its helpers' calls run on that patch, and
the language is restored after it as Triton restores it."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import HAS_GPU
from triton.runtime import interpreter

pytestmark = pytest.mark.skipif(HAS_GPU, reason="the interpreter's patching (the CPU tier)")


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _helper_kernel(out, n: tl.constexpr):
    offsets = tl.arange(0, n)
    value = tl.zeros([n], dtype=tl.float32) + 1.0
    for _ in tl.static_range(3):
        value = _twice(value)
    tl.store(out + offsets, value)


@triton.jit
def _failing_kernel(out, n: tl.constexpr):
    value = _twice(tl.zeros([n], dtype=tl.float32))
    tl.static_assert(n < 0, "fails on purpose")
    tl.store(out + tl.arange(0, n), value)


def _language_state():
    """What a patch changes: the builtins of tl and of its tensor class, and the attributes _patch_lang_core sets."""
    return {
        "arange": tl.arange,
        "tensor.__add__": tl.tensor.__add__,
        "static_range": tl.static_range,
        "multiple_of": tl.multiple_of,
        "dtype.to_ir": tl.dtype.to_ir,
    }


def test_a_launch_patches_once_and_restores_the_language(monkeypatch):
    assert getattr(interpreter._patch_lang, "once_a_launch", False), "conftest installs it under the interpreter"
    calls = []
    triton_patch = interpreter._patch_lang.triton_patch_lang

    def counted(fn):
        calls.append(fn.__name__)
        return triton_patch(fn)

    # Count Triton's patches through a fresh install over a counting stand-in (monkeypatch puts conftest's back)
    monkeypatch.setattr(interpreter, "_patch_lang", counted)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", interpreter.GridExecutor.__call__)
    import interpreter_speed

    interpreter_speed.install()
    before = _language_state()
    out = torch.full((8,), float("nan"))
    _helper_kernel[(1,)](out, n=8)
    assert torch.equal(out, torch.full((8,), 8.0))  # three calls of the helper ran, on the patched language
    # Not again for each call of the helper: once for the launch, once for tl.zeros (a helper of triton.language,
    # whose module holds tl.core, which the kernel's does not)
    assert calls == ["_helper_kernel", "zeros"]
    assert _language_state() == before  # restored after the launch
    _helper_kernel[(1,)](out, n=8)  # the next launch patches again
    assert calls == ["_helper_kernel", "zeros"] * 2 and _language_state() == before
    # A launch that fails restores the language too, and the next one patches again
    with pytest.raises(interpreter.InterpreterError):
        _failing_kernel[(1,)](out, n=8)
    assert calls[-2:] == ["_failing_kernel", "zeros"] and _language_state() == before
    del calls[:]
    _helper_kernel[(1,)](out, n=8)
    assert calls == ["_helper_kernel", "zeros"] and torch.equal(out, torch.full((8,), 8.0))


def test_the_kept_dtype_table_answers_as_tritons_function():
    kept = interpreter._get_np_dtype
    assert getattr(kept, "kept", False), "conftest installs it under the interpreter"
    triton_np_dtype = kept.triton_np_dtype
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64, tl.float16,
               tl.bfloat16, tl.float32, tl.float64, tl.float8e5, tl.float8e4nv]  # fmt: skip
    types = [*scalars, *(tl.block_type(s, [2, 4]) for s in scalars), tl.pointer_type(tl.float32)]
    types.append(tl.block_type(tl.pointer_type(tl.bfloat16), [8]))
    for tt_dtype in types * 2:  # the second time from the table
        assert kept(tt_dtype) == triton_np_dtype(tt_dtype), tt_dtype
    with pytest.raises(KeyError):  # what Triton's function raises for a type it has no numpy type for
        kept(tl.void)
