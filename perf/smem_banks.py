"""Shared-memory bank conflicts of a compiled kernel, counted from its PTX without a GPU.

Each warp's integer instructions are evaluated lane by lane (tid.x = 32 * warp + lane, ctaid = 0; registers the
evaluation cannot know, such as loaded values, stay unknown), in program order, which gives every shared-memory
access its 32 addresses. An access then costs, in the model of NVIDIA's shared memory (32 banks of 4 bytes, 128
bytes a cycle): per phase of the warp (the whole warp for 4-byte accesses, half warps for 8-byte, quarter warps for
16-byte and for ldmatrix / stmatrix, whose lanes give 16-byte rows), as many wavefronts as the most distinct words
any one bank must deliver. Its ideal is the distinct bytes it touches over 128. The counts are static: each
instruction once, as if every branch and every loop body ran once, so a kernel's step loop (its dots unrolled)
dominates them. Broadcasts within a phase cost nothing extra; whether the hardware merges identical 16-byte
addresses across quarter warps is not modelled (it counts them once a quarter).

Triton gives a dot's operands swizzled shared layouts for tensor-core dots and plain ones for the FMA dots of
float32; how it orders their dimensions follows the register layout of the loaded tile, so a kernel's tile shapes
decide whether ldmatrix or ld.shared meets 1 or 16 banks at once (perf/NOTES.md, thirty-first session).
"""

from __future__ import annotations

import functools
import operator
import re
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

_MASKS = {8: 0xFF, 16: 0xFFFF, 32: 0xFFFFFFFF, 64: (1 << 64) - 1}
# An op may carry a scope: Triton 3.8 writes st.shared::cta.v4.b32 where 3.6 and 3.9 write st.shared.v4.b32.
_INSTRUCTION = re.compile(r"(?:(@!?%\w+)\s+)?([a-z][\w.:]*)\s+(.*?);")


class Access(NamedTuple):
    op: str
    addresses: tuple[int, ...] | None  # one a lane of ``lanes``; None where an address was unknown
    width: int  # bytes a lane
    lanes: tuple[int, ...]


class Wavefronts(NamedTuple):
    loads: int
    loads_ideal: int
    stores: int
    stores_ideal: int
    unknown: int  # accesses whose addresses the evaluation could not know
    matrix_loads: int = 0  # of the loads, ldmatrix's: the tensor-core dots' operands
    matrix_loads_ideal: int = 0


def _bits(type_suffix: str) -> int:
    match = re.search(r"(\d+)$", type_suffix)
    return int(match.group(1)) if match else 32


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


@functools.cache
def _operation(op: str) -> Callable[[list[int | None]], int | None]:
    """The evaluation of one integer instruction ``op`` from its operands' values: its result, or None (an unknown
    operand, or an instruction outside the model). Made once an op: a PTX listing repeats a few hundred ops in tens
    of thousands of instructions, each evaluated for 32 lanes and every warp."""
    base, suffix = op.split(".")[0], op.split(".")[-1]
    bits = _bits(suffix)
    if base == "selp":

        def select(values: list[int | None]) -> int | None:
            if values[2] is None:
                return None
            return values[0] if values[2] else values[1]

        return select
    signed = ".s" in op
    wide = ".wide" in op
    mask = _MASKS.get(bits, -1)

    def operand(v: int) -> int:
        return _signed(v, bits) if signed else v & mask

    if base == "cvt":
        source_bits = _bits(suffix)
        source_mask = _MASKS.get(source_bits, -1)
        from_signed = suffix.startswith("s")
        bits = _bits(op.split(".")[-2])

        def convert(a: list[int]) -> int:
            return _signed(a[0], source_bits) if from_signed else a[0] & source_mask

        compute = convert
    elif base == "setp":
        comparison = _COMPARISONS.get(op.split(".")[1])
        if comparison is None:
            return _unknown

        def compare(values: list[int | None]) -> int | None:
            if any(v is None for v in values):
                return None
            return int(comparison(operand(values[0]), operand(values[1])))

        return compare
    elif base == "mul" and wide:
        compute = lambda a: operand(a[0]) * operand(a[1])  # noqa: E731
    elif base == "mad" and wide:
        compute = lambda a: operand(a[0]) * operand(a[1]) + a[2]  # noqa: E731
    elif base == "shr":
        compute = lambda a: operand(a[0]) >> a[1]  # noqa: E731
    elif base in ("min", "max"):
        pick = min if base == "min" else max
        compute = lambda a: pick(operand(a[0]), operand(a[1]))  # noqa: E731
    elif base == "bfe":

        def compute(a: list[int]) -> int:
            field = (a[0] & mask) >> a[1] & ((1 << a[2]) - 1)
            return _signed(field, a[2]) if signed and a[2] else field  # bfe.s sign-extends the field

    elif base in _PLAIN:
        compute = _PLAIN[base]
    else:
        return _unknown
    result_mask = _MASKS.get(bits, (1 << 64) - 1)

    def evaluate(values: list[int | None]) -> int | None:
        if any(v is None for v in values):
            return None
        return compute(values) & result_mask

    return evaluate


def _unknown(values: list[int | None]) -> None:
    return None


# Ops whose result does not depend on the operands' type (before the result is cut to the destination's width).
_PLAIN: dict[str, Callable[[list[int]], int]] = {
    "mov": lambda a: a[0],
    "add": lambda a: a[0] + a[1],
    "sub": lambda a: a[0] - a[1],
    "mul": lambda a: a[0] * a[1],
    "mad": lambda a: a[0] * a[1] + a[2],
    "and": lambda a: a[0] & a[1],
    "or": lambda a: a[0] | a[1],
    "xor": lambda a: a[0] ^ a[1],
    "shl": lambda a: a[0] << a[1],
    "neg": lambda a: -a[0],
}
_COMPARISONS: dict[str, Callable[[int, int], bool]] = {
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq, "ne": operator.ne,
}  # fmt: skip


class _Instruction(NamedTuple):
    predicate: str | None
    op: str
    arguments: str
    destination: str | None  # the register an integer instruction writes (None: a shared access, or none)
    operands: tuple[str, ...]


@functools.lru_cache(maxsize=2)  # count() asks for one kernel's warps in turn; a listing is up to 600 KB
def _instructions(ptx: str) -> tuple[_Instruction, ...]:
    """``ptx``'s instructions, parsed once for all warps."""
    instructions = []
    for line in ptx.splitlines():
        match = _INSTRUCTION.match(line.strip())
        if not match or line.strip().startswith((".", "//")):
            continue
        predicate, op, arguments = match.groups()
        if ".shared" in op and op.startswith(("ld", "st")):
            instructions.append(_Instruction(predicate, op, arguments, None, ()))
            continue
        operands = [a.strip() for a in arguments.split(",")]
        destination = operands[0] if operands[0].startswith("%") else None
        instructions.append(_Instruction(predicate, op, arguments, destination, tuple(operands[1:])))
    return tuple(instructions)


def _operand_lanes(token: str, warp: int, num_threads: int, registers: dict) -> list[int | None] | None:
    """An operand's value in each of the warp's 32 lanes (None: unknown in every lane)."""
    if token.startswith("%tid.x"):
        return list(range(32 * warp, 32 * warp + 32))
    if token.startswith(("%tid.", "%ctaid")):
        return _ZEROS
    if token.startswith("%ntid.x"):
        return [num_threads] * 32
    if token.startswith("%"):
        return registers.get(token)
    if re.fullmatch(r"-?\d+", token):
        return [int(token)] * 32
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", token):
        return [int(token, 16)] * 32
    return _ZEROS if token == "global_smem" else None


_ZEROS = [0] * 32
_UNKNOWN = [None] * 32


def shared_accesses(ptx: str, warp: int, num_threads: int) -> list[Access]:
    """Every ld/st/ldmatrix/stmatrix on shared memory in ``ptx``, with the addresses warp ``warp`` gives it."""
    registers: dict[str, list[int | None]] = {}
    accesses = []
    for predicate, op, arguments, destination, operands in _instructions(ptx):
        if destination is None:
            if ".shared" in op and op.startswith(("ld", "st")):
                accesses.append(_access(op, arguments, predicate, registers))
            continue
        if predicate and destination in registers:
            continue  # a predicated redefinition keeps the first value (loops run once in this model)
        lanes = [_operand_lanes(token, warp, num_threads, registers) or _UNKNOWN for token in operands]
        evaluate = _operation(op)
        registers[destination] = [evaluate(values) for values in zip(*lanes)] if lanes else _UNKNOWN
    return accesses


def _access(op: str, arguments: str, predicate: str | None, registers: dict) -> Access:
    matrix = op.startswith(("ldmatrix", "stmatrix"))
    vector = re.search(r"\.v(\d)", op)
    width = 16 if matrix else _bits(op.split(".")[-1]) // 8 * (int(vector.group(1)) if vector else 1)
    lanes = tuple(range(32))
    count = re.search(r"\.x(\d)", op)
    if matrix and count:
        lanes = tuple(range(8 * int(count.group(1))))  # ldmatrix.x1/x2/x4: 8 row addresses a matrix
    if predicate:
        known = registers.get(predicate.lstrip("@!"))
        if known is not None and all(p is not None for p in known):
            lanes = tuple(lane for lane in lanes if bool(known[lane]) != predicate.startswith("@!"))
    address = re.search(r"\[\s*(%\w+)\s*(?:\+\s*(-?\d+))?\s*\]", arguments)
    base = registers.get(address.group(1)) if address else None
    if base is None or any(base[lane] is None for lane in lanes):
        return Access(op, None, width, lanes)
    offset = int(address.group(2) or 0)
    return Access(op, tuple(base[lane] + offset for lane in lanes), width, lanes)


def wavefronts(access: Access) -> tuple[int, int]:
    """(wavefronts, ideal wavefronts) of one access by one warp."""
    per_phase = {16: 8, 8: 16}.get(access.width, 32)
    words_per_lane = max(1, access.width // 4)
    cost, touched = 0, set()
    for first in range(0, 32, per_phase):
        words = {
            address // 4 + w
            for lane, address in zip(access.lanes, access.addresses)
            if first <= lane < first + per_phase
            for w in range(words_per_lane)
        }
        if words:
            cost += max(Counter(word % 32 for word in words).values())
        touched |= words
    return cost, max(1, -(-len(touched) * 4 // 128))


def count(ptx: str, num_warps: int) -> Wavefronts:
    """Shared-memory wavefronts of every warp of a CTA of ``num_warps`` warps, each instruction counted once."""
    totals = Counter()
    for warp in range(num_warps):
        for access in shared_accesses(ptx, warp, 32 * num_warps):
            if access.addresses is None:
                totals["unknown"] += 1
                continue
            cost, ideal = wavefronts(access)
            kinds = ["loads"] if access.op.startswith("ld") else ["stores"]
            if access.op.startswith("ldmatrix"):
                kinds.append("matrix_loads")
            for kind in kinds:
                totals[kind] += cost
                totals[kind + "_ideal"] += ideal
    return Wavefronts(*(totals[k] for k in Wavefronts._fields))
