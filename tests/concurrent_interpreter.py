"""Every program of a launch at once under the Triton interpreter: one thread per program, interleaved by a
seeded scheduler.

The interpreter runs a grid's programs one after another, so a persistent grid whose programs meet at a grid
barrier, or poll one another's tagged words, would wait for ever: the library runs such grids with one program
under it, and the multi-program persistent path (counters, barrier targets, rings, batch groups, both directions
in one grid, the stack kernel's layers waiting on one another) would run only on a GPU. Inside
``programs_at_once()`` each launch starts one thread per program, each with its own program id. Only one of them
runs at a time: at each memory operation the running program hands over, with probability
``switch_probability`` (always at atomics and volatile loads, the operations that wait for other programs), to a
program drawn from a seeded generator (itself included). So a launch's interleaving
is a function of the seed alone: a test that fails fails every time, and different seeds try different
interleavings. An ordering bug shows as a wrong value, a NaN read from a poisoned buffer, or a wait that never
ends (raised as ``Deadlock`` after ``timeout_s``).

With ``weak_stores=True`` a program's plain stores are not seen by the other programs at once: they wait in the
program's own buffer (its own loads see them) until the program makes a release (an atomic with ``sem="release"``
or ``"acq_rel"``, as a barrier's arrival does), ends, or, at random, some time later (oldest first). So data
published without a release, or after it, is read stale by a program that trusts the release: the writer's half
of the GPU's memory model. The reader's half (loads served from a stale L1 line, which ``.cg`` avoids), the
ordering between threads of a program, and co-residency remain the GPU tier's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import random
import threading
import time
import types
from collections.abc import Iterator

import numpy as np
from triton._C.libtriton import interpreter as _interpreter
from triton._C.libtriton import ir
from triton.runtime import interpreter

from tritonrnn import _plan


class Deadlock(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Launch:
    """What a test asserts ran: the kernel, its grid and its sync constexprs (None where it has none)."""

    kernel: str
    grid: tuple[int, int, int]
    SYNC: bool | None
    TAGGED: bool | None
    K_SPLIT: int | None = None

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


# The builder's memory operations, where a program may hand over (create_load and create_store call the masked ones).
_MEMORY_OPS = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
_RELEASES = (ir.MEM_SEMANTIC.RELEASE, ir.MEM_SEMANTIC.ACQUIRE_RELEASE)


_SPEEDS = (1, 1, 2, 4, 16)
# With weak_stores, the chance that a program's oldest buffered store lands, at each of its memory operations; higher
# where it waits for others (a program spinning on a peer's words would otherwise starve its own).
_FLUSH_PROBABILITY = 0.05
_FLUSH_PROBABILITY_WAITING = 0.5


class _Scheduler:
    """One launch's programs as threads, one running at a time; the running one holds the token."""

    def __init__(
        self, programs: list[tuple[int, int, int]], rng: random.Random, switch_probability: float, weak_stores: bool
    ):
        self.live = list(programs)
        self.weak_stores = weak_stores
        self.rng = rng  # drawn from by the running program only, so the draws do not depend on timing
        self.switch_probability = switch_probability
        self.turn = {index: threading.Semaphore(0) for index in programs}
        self.abandoned = False
        # Programs run at different speeds (drawn per launch): the interleavings where one program falls behind
        # its peers, which a fair draw makes rare, are the ones that show a wait for the wrong condition.
        self.speed = {index: rng.choice(_SPEEDS) for index in programs}

    def _draw(self):
        return self.rng.choices(self.live, weights=[self.speed[index] for index in self.live])[0]

    def start(self) -> None:
        self.turn[self._draw()].release()

    def wait_turn(self, me) -> None:
        self.turn[me].acquire()
        if self.abandoned:
            raise Deadlock("the launch was abandoned")

    def maybe_switch(self, me, always: bool, pending: list) -> None:
        if self.abandoned:
            raise Deadlock("the launch was abandoned")
        if pending and self.rng.random() < (_FLUSH_PROBABILITY_WAITING if always else _FLUSH_PROBABILITY):
            _flush(pending[:1])  # a buffered store becomes visible, some time after it was made
            del pending[:1]
        if always or self.rng.random() < self.switch_probability:
            successor = self._draw()
            if successor != me:
                self.turn[successor].release()
                self.wait_turn(me)

    def finish(self, me) -> None:
        self.live.remove(me)
        if self.live and not self.abandoned:
            self.turn[self._draw()].release()

    def abandon(self) -> None:
        self.abandoned = True
        for turn in self.turn.values():
            turn.release()


@contextlib.contextmanager
def programs_at_once(
    seed: int = 0, switch_probability: float = 0.1, timeout_s: float = 120.0, weak_stores: bool = False
) -> Iterator[list[Launch]]:
    """Yields the list of the launches made inside the block, filled as they run."""
    launches: list[Launch] = []
    local = threading.local()
    rng = random.Random(seed)  # one stream for every launch of the block: the same test, the same interleavings
    builder_cls = interpreter.InterpreterBuilder
    saved = {name: builder_cls.__dict__.get(name) for name in ("grid_idx", *_MEMORY_OPS)}
    saved_init = interpreter.GridExecutor.__init__

    # The program id is per thread: the builder is one object shared by every launch.
    builder_cls.grid_idx = property(lambda self: getattr(local, "grid_idx", None),
                                    lambda self, value: setattr(local, "grid_idx", value))  # fmt: skip
    builder_cls.create_masked_load = _load(builder_cls.create_masked_load, local)
    builder_cls.create_masked_store = _store(builder_cls.create_masked_store, local)
    builder_cls.create_atomic_rmw = _atomic(builder_cls.create_atomic_rmw, local)
    builder_cls.create_atomic_cas = _atomic(builder_cls.create_atomic_cas, local)

    def init(self, fn, *args, **kwargs):
        saved_init(self, fn, *args, **kwargs)
        scheduler = lambda programs: _Scheduler(programs, rng, switch_probability, weak_stores)  # noqa: E731
        self.fn = _threaded(fn, local, scheduler, launches, timeout_s)

    interpreter.GridExecutor.__init__ = init
    previous, _plan.PROGRAMS_AT_ONCE = _plan.PROGRAMS_AT_ONCE, True
    try:
        yield launches
    finally:
        _plan.PROGRAMS_AT_ONCE = previous
        interpreter.GridExecutor.__init__ = saved_init
        for name, value in saved.items():
            if value is None:
                delattr(builder_cls, name)
            else:
                setattr(builder_cls, name, value)


def _switch_point(local, always: bool) -> None:
    """A memory operation of the running program: it may hand over. ``always`` at atomics and volatile loads, the
    ways a program waits for others (barrier counters, tagged words), so a spinning program hands over instead of
    polling the same value again and again."""
    scheduler = getattr(local, "scheduler", None)
    if scheduler is not None:
        scheduler.maybe_switch(local.grid_idx, always, local.pending)


def _load(method, local):
    def load(self, ptrs, mask, other, *rest):
        _switch_point(local, always=bool(rest[-1]))  # is_volatile: the last argument
        loaded = method(self, ptrs, mask, other, *rest)
        pending = getattr(local, "pending", None)
        if pending:  # the program sees its own buffered stores
            data, addresses = loaded.data.copy(), ptrs.data
            wanted = np.broadcast_to(mask.data, addresses.shape).astype(bool)
            for stored_at, values in pending:  # in order: a later store of an address wins
                hit = wanted & np.isin(addresses, stored_at)
                if hit.any():
                    data[hit] = values[np.searchsorted(stored_at, addresses[hit])]
            loaded = type(loaded)(data, loaded.dtype)
        return loaded

    return load


def _store(method, local):
    def store(self, ptrs, value, mask, *rest):
        _switch_point(local, always=False)
        scheduler = getattr(local, "scheduler", None)
        if scheduler is None or not scheduler.weak_stores:
            return method(self, ptrs, value, mask, *rest)
        where = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
        addresses, values = ptrs.data[where], np.broadcast_to(value.data, ptrs.data.shape)[where]
        order = np.argsort(addresses)  # sorted once, for the program's own loads to look up
        local.pending.append((addresses[order], values[order]))
        return None

    return store


def _atomic(method, local):
    def atomic(self, *args):
        _switch_point(local, always=True)
        pending = getattr(local, "pending", None)
        if pending and args[-2] in _RELEASES:  # (..., sem, scope): what came before the release is seen with it
            _flush(pending)
            pending.clear()
        return method(self, *args)

    return atomic


def _flush(stores) -> None:
    for addresses, values in stores:
        _interpreter.store(addresses, values, np.ones(addresses.shape, dtype=bool))


def _threaded(fn, local, new_scheduler, launches: list[Launch], timeout_s: float):
    """fn as the interpreter's grid loop calls it, once per program: the calls are collected, and the last one
    runs them all in threads and waits for them.

    The interpreter finds triton.language through the kernel's globals, so the returned function is built on
    them: everything else it uses comes through its closure."""
    pending: list[tuple[int, int, int]] = []
    builder, Thread, deadlock, launch, monotonic, flush = (interpreter.interpreter_builder, threading.Thread, Deadlock,
                                                          Launch, time.monotonic, _flush)  # fmt: skip

    def call(**args):
        pending.append(builder.grid_idx)
        if builder.grid_idx != tuple(n - 1 for n in builder.grid_dim):
            return
        programs, errors = list(pending), []
        pending.clear()
        launches.append(
            launch(fn.__name__, builder.grid_dim, args.get("SYNC"), args.get("TAGGED"), args.get("K_SPLIT"))
        )
        scheduler = new_scheduler(programs)

        def run(index):
            local.grid_idx, local.scheduler, local.pending = index, scheduler, []
            try:
                scheduler.wait_turn(index)
                fn(**args)
                flush(local.pending)  # the end of a kernel makes its stores visible
            except BaseException as error:  # handed to the launching thread below, which raises it
                errors.append(error)
                if not scheduler.abandoned:
                    scheduler.abandon()  # the others would wait for this program for ever
            finally:
                local.scheduler, local.pending = None, []
                if not scheduler.abandoned:
                    scheduler.finish(index)

        threads = [Thread(target=run, args=(index,), daemon=True) for index in programs]
        for thread in threads:
            thread.start()
        scheduler.start()
        deadline = monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - monotonic()))
        stuck = [index for index, thread in zip(programs, threads) if thread.is_alive()]
        if stuck:
            scheduler.abandon()
            for thread in threads:
                thread.join(10)
            raise deadlock(f"programs {stuck} of {len(programs)} still running after {timeout_s:g} s")
        if errors:
            raise errors[0]

    wrapped = types.FunctionType(call.__code__, fn.__globals__, fn.__name__, None, call.__closure__)
    wrapped.__signature__ = inspect.signature(fn)  # the interpreter reads the kernel's arguments from it
    return wrapped
