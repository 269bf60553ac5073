"""Grid-wide barrier for persistent kernels.

Every program must be resident at once (the host caps the grid and launches cooperatively);
under the Triton interpreter the persistent kernels run with a single program, for which the
barrier passes at once.
"""

import triton
import triton.language as tl


@triton.jit
def arrive(counter):
    """Count this program's arrival on ``counter`` (an int32 in global memory), after all its global stores."""
    # Order this program's global stores (made by all its threads) before the release.
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release", scope="gpu")


@triton.jit
def wait_count(counter, target):
    """Wait until ``counter`` reaches ``target``; then the stores made before those arrivals are visible."""
    while tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < target:
        pass
    # The acquire above is made by one thread; make it visible to the whole program.
    tl.debug_barrier()


@triton.jit
def wait_each(counters, n, target, BLOCK: tl.constexpr = 32):
    """Wait until each of ``counters[0 .. n)`` has reached ``target`` (each counter written by one program only).

    A total over several programs cannot say that every one of them got there: one program can be a step ahead
    of another (kernels/stack.py), so the total reaches n * target with one program a step short."""
    for c0 in range(0, n, BLOCK):
        o = c0 + tl.arange(0, BLOCK)
        m = o < n
        while tl.min(tl.where(m, tl.atomic_add(counters + o, 0, mask=m, sem="acquire", scope="gpu"), target)) < target:
            pass
    # Each thread acquired its own counters; make what they saw visible to the whole program.
    tl.debug_barrier()


@triton.jit
def grid_barrier(counter, target):
    """Wait until ``target`` arrivals have been counted on ``counter`` (an int32 in global memory).

    The caller passes ``target = num_programs * (number of barriers so far, this one included)``,
    so one zeroed counter serves all the barriers of a launch.
    """
    arrive(counter)
    wait_count(counter, target)


# Tagged exchange (TRITONRNN_EXCHANGE=tagged): instead of a barrier and then a load, each value travels with the
# step that wrote it, in one word (the tag in the low half, the value's bits in the high half: 32-bit words for
# 16-bit values, 64-bit words for 32-bit values). A word is stored and loaded whole, so a reader that sees the tag
# it expects sees that step's value: it polls the words themselves until every tag is right, one round trip to L2
# instead of two. Two slots (steps alternate) suffice: a program can only write step s + 1 after every program has
# written step s, hence finished reading step s - 1 from the slot it overwrites. Tags start at 1 over a zeroed
# ring, so no step can mistake the zeros for its data.


@triton.jit
def tag_pack(x, tag, WORD: tl.constexpr):
    """Words [x's shape] of dtype WORD (int32 or int64) holding x's bits and tag (tag < 2**16 or < 2**32)."""
    # One return: the compiler types every return statement, also those of branches it does not take.
    if WORD == tl.int32:
        words = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16) | tag
    else:
        words = (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | tag
    return words


@triton.jit
def load_tagged(p, mask, tag, VALUE: tl.constexpr):
    """The values at p (words of p's dtype), once every word under mask carries tag; VALUE is their dtype."""
    if p.dtype.element_ty == tl.int32:
        low = 0xFFFF
    else:
        low = 0xFFFFFFFF
    words = tl.load(p, mask=mask, other=0, volatile=True)
    ready = ((words & low) == tag) | ~mask
    while tl.min(ready.to(tl.int32)) == 0:
        # Read again only the words still missing (less L2 traffic while slower programs finish).
        words = tl.where(ready, words, tl.load(p, mask=~ready, other=0, volatile=True))
        ready = ((words & low) == tag) | ~mask
    return tag_unpack(words, VALUE)


@triton.jit
def tag_unpack(words, VALUE: tl.constexpr):
    """The values held by words (int32 or int64, as tag_pack made them), as dtype VALUE."""
    if words.dtype == tl.int32:
        values = (words >> 16).to(tl.int16).to(VALUE, bitcast=True)
    else:
        values = (words >> 32).to(tl.int32).to(VALUE, bitcast=True)
    return values


@triton.jit
def tag_of(step, WORD: tl.constexpr):
    """The tag of a step's words (steps wrap around the tag's range; neighbours always differ)."""
    if WORD == tl.int32:
        tag = (step & 0xFFFF).to(tl.int32)
    else:
        tag = step.to(tl.int64) & 0xFFFFFFFF
    return tag
