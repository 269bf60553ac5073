"""The Triton interpreter without its second patching of triton.language inside a launch, for the CPU tier's time.

A launch under the interpreter of Triton 3.6 to 3.9 patches the language for the kernel (``GridExecutor.__call__``
-> ``_patch_lang``) and restores it when the grid has run. Every call of a ``@triton.jit`` helper from the kernel
patches it again (``InterpretedFunction.__call__`` -> ``_patch_lang``), scanning each module and class with
``inspect.getmembers`` for builtins that are all patched already, and setting the same tensor and core attributes
to equivalent new functions; that scope is never restored (the launch's restore undoes it). The kernels call
helpers (the cell, the dots, the exchange) several times a step: those scans took a fifth of the suite's
interpreter time. Here a helper's call inside a launch whose patches so far cover the helper's language modules
patches nothing more; everything else runs Triton's own patching. The
kernels and what the interpreter computes are unchanged; ``test_interpreter_speed`` checks that.
"""

from __future__ import annotations

import functools
import threading

import triton.language as tl
from triton.runtime import interpreter

_state = threading.Lock()


@functools.cache
def _languages(fn) -> frozenset[int]:
    """The language modules the interpreter patches for ``fn``: tl and tl.core where fn's module holds them (found
    once a function: a module imports them when it is loaded)."""
    return frozenset(id(value) for value in fn.__globals__.values() if value is tl or value is tl.core)


def install() -> None:
    """Skip the helpers' repeated patching (once). An AttributeError: the interpreter changed, look again."""
    patch_lang = interpreter._patch_lang
    if getattr(patch_lang, "once_a_launch", False):
        return
    patched: list[frozenset[int]] = []  # the languages a running launch has patched (none between launches)

    def patch_once(fn):
        languages = _languages(fn)
        with _state:
            if patched and languages <= patched[-1]:
                return interpreter._LangPatchScope()  # all patched by the launch: an empty scope
        scope = patch_lang(fn)
        with _state:
            if patched:
                # A helper reaching a language the launch did not patch (triton.language's own helpers, tl.zeros or
                # tl.sum, hold tl.core): Triton's patch, as before, which stays for the rest of the launch (its scope
                # is dropped, never restored).
                patched[-1] |= languages
                return scope
            patched.append(languages)
        restore = scope.restore

        def restore_and_forget() -> None:
            with _state:
                patched.clear()
            restore()

        scope.restore = restore_and_forget
        return scope

    patch_once.once_a_launch = True
    patch_once.triton_patch_lang = patch_lang
    interpreter._patch_lang = patch_once
