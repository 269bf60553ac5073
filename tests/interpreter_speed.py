"""The Triton interpreter without two repeated costs, for the CPU tier's time: its second patching of triton.language
inside a launch, and its dtype table rebuilt at every op.

A launch under the interpreter of Triton 3.6 to 3.9 patches the language for the kernel (``GridExecutor.__call__``
-> ``_patch_lang``) and restores it when the grid has run. Every call of a ``@triton.jit`` helper from the kernel
patches it again (``InterpretedFunction.__call__`` -> ``_patch_lang``), scanning each module and class with
``inspect.getmembers`` for builtins that are all patched already, and setting the same tensor and core attributes
to equivalent new functions; that scope is never restored (the launch's restore undoes it). The kernels call
helpers (the cell, the dots, the exchange) several times a step: those scans took a third of the interpreter's time
(gradcheck of one LSTM layer: 41 s, 28 s without). Here a helper's call inside a launch whose patches so far cover
the helper's language modules patches nothing more; everything else (the launch's own patch, a helper reaching
another language module, a helper called outside a launch) runs Triton's own patching. The kernels and what the
interpreter computes are unchanged; ``test_interpreter_speed`` checks that.

Also: the interpreter maps a Triton dtype to numpy's by building a table of 18 numpy dtypes at every call
(``_get_np_dtype``: for every op's result, every splat and every cast); here each scalar type's answer is Triton's
own, kept after its first call. The interpreter's tests took a fifth less time (perf/NOTES.md, forty-second session).
"""

from __future__ import annotations

import threading

import triton.language as tl
from triton.runtime import interpreter

_state = threading.Lock()


def _languages(fn) -> frozenset[int]:
    """The language modules the interpreter patches for ``fn``: tl and tl.core where fn's module holds them."""
    return frozenset(id(value) for value in fn.__globals__.values() if value is tl or value is tl.core)


def install() -> None:
    """Skip the helpers' repeated patching and keep the dtype table (once). An AttributeError: the interpreter
    changed, look again."""
    _keep_np_dtypes()
    patch_lang, run_grid = interpreter._patch_lang, interpreter.GridExecutor.__call__
    if getattr(patch_lang, "once_a_launch", False):
        return
    # Per running launch (launches do not nest; a list for safety): the language modules patched for it so far,
    # None until the launch's own patch.
    launches: list[frozenset[int] | None] = []

    def patch_once(fn):
        languages = _languages(fn)
        with _state:
            covered = bool(launches) and launches[-1] is not None and bool(languages) and languages <= launches[-1]
        if covered:
            return interpreter._LangPatchScope()  # all patched for the launch: an empty scope
        scope = patch_lang(fn)
        with _state:
            if launches:
                # The launch's own patch, or a helper reaching a language module it did not patch (triton.language's
                # own helpers, tl.zeros or tl.sum, hold tl.core): Triton's patch, which the helper's caller drops, so
                # it stays in place after the launch, as without this.
                launches[-1] = languages if launches[-1] is None else launches[-1] | languages
        return scope

    def run_grid_patching_once(self, *args, **kwargs):
        with _state:
            launches.append(None)
        try:
            return run_grid(self, *args, **kwargs)  # restores the language before it returns or raises
        finally:
            with _state:
                launches.pop()

    patch_once.once_a_launch = True
    patch_once.triton_patch_lang = patch_lang
    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = run_grid_patching_once


def _keep_np_dtypes() -> None:
    """``interpreter._get_np_dtype`` answered from a table filled by Triton's own function, one entry a scalar type
    (a block's answer is its element type's: Triton's function reads only that). Pointer types, unhashable, go to
    Triton's function, which answers them first."""
    np_dtype = interpreter._get_np_dtype
    if getattr(np_dtype, "kept", False):
        return
    table: dict = {}

    def kept_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if type(scalar).__hash__ is None:
            return np_dtype(tt_dtype)
        try:
            return table[scalar]
        except KeyError:
            answer = table[scalar] = np_dtype(scalar)
            return answer

    kept_np_dtype.kept = True
    kept_np_dtype.triton_np_dtype = np_dtype
    interpreter._get_np_dtype = kept_np_dtype
