"""Truncated BPTT: one long batch of sequences run in chunks, the state carried over and the graph cut between them.

``detach_states`` cuts the graph of a state of any of tritonrnn's (or torch.nn's) recurrent modules.
``hold_dropout_masks`` keeps a model's variational dropout and DropConnect masks from chunk to chunk, so that a
sequence has one mask over all its chunks, as it would in one call (by default every call draws new masks, the
AWD-LSTM convention of one mask per chunk).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from tritonrnn.dropout import HeldMasks
from tritonrnn.modules import _TritonRNNBase
from tritonrnn.stacked import StackedRNN


def detach_states(states):
    """``states`` with every tensor detached, in the same structure: a tensor, an LSTM's ``(h, c)``, a StackedRNN's
    list of per-layer states, or None (a first chunk)."""
    if states is None:
        return None
    if isinstance(states, Tensor):
        return states.detach()
    if isinstance(states, (tuple, list)) and not isinstance(states, PackedSequence):
        detached = [detach_states(s) for s in states]
        if hasattr(states, "_fields"):  # a namedtuple: its fields as arguments, not one iterable
            return type(states)(*detached)
        return type(states)(detached)
    raise TypeError(
        f"detach_states: expected a tensor, or a tuple or list of them (or None), got {type(states).__name__}"
    )


@contextlib.contextmanager
def hold_dropout_masks(model: nn.Module) -> Iterator[None]:
    """Inside the block, every tritonrnn module in ``model`` (the model itself or any submodule) keeps the dropout
    masks drawn by its first training call for all its later calls in the block.

    Held: variational inter-layer dropout (one mask per sequence and unit, now over all chunks of the sequence) and
    StackedRNN's ``weight_drop`` (one DropConnect mask for all chunks). Standard dropout keeps drawing at every call:
    its masks are per step, and a chunk's steps are new steps. Held variational masks belong to the batch's
    sequences: a call with another batch size raises ValueError (a held DropConnect mask belongs to the weights and
    serves any batch). Blocks nest: an inner block draws its own masks; leaving it gives the
    outer block's back. Blocks on one model belong to one thread: another thread's block is refused while one is open
    (the masks live on the modules).

    Example::

        with tritonrnn.hold_dropout_masks(model):
            state = None
            for chunk in x.split(64, dim=1):
                out, state = model(chunk, state)
                loss(out).backward()
                state = tritonrnn.detach_states(state)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"hold_dropout_masks: expected a torch.nn.Module, got {type(model).__name__}")
    targets = [m for m in model.modules() if isinstance(m, (_TritonRNNBase, StackedRNN))]
    if not targets:
        raise ValueError(
            f"hold_dropout_masks: {type(model).__name__} contains no tritonrnn module (LSTM, GRU, RNN or StackedRNN)"
        )
    previous = [m.__dict__.get("_held_masks") for m in targets]
    # The masks live on the modules: blocks of two threads on one model would leave and restore each other's.
    thread = threading.get_ident()
    for module, held in zip(targets, previous):
        if held is not None and held.thread not in (None, thread):
            raise RuntimeError(
                f"hold_dropout_masks: the masks of {type(module).__name__} are held by a block in another thread; "
                "blocks on one model nest within a thread, not across threads"
            )
    for module in targets:
        module._held_masks = HeldMasks()
        module._held_masks.thread = thread
    try:
        yield
    finally:
        for module, held in zip(targets, previous):
            if held is None:
                del module._held_masks
            else:
                module._held_masks = held
