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

import re
from collections import Counter
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


def _evaluate(op: str, values: list[int | None]) -> int | None:
    """One integer instruction's result, or None (an unknown operand, or an instruction outside the model)."""
    base, suffix = op.split(".")[0], op.split(".")[-1]
    bits = _bits(suffix)
    if base == "selp":
        if values[2] is None:
            return None
        return values[0] if values[2] else values[1]
    if any(v is None for v in values):
        return None
    signed = ".s" in op
    wide = ".wide" in op

    def operand(v: int) -> int:
        return _signed(v, bits) if signed else v & _MASKS.get(bits, -1)

    a = values
    if base == "mov":
        result = a[0]
    elif base == "add":
        result = a[0] + a[1]
    elif base == "sub":
        result = a[0] - a[1]
    elif base == "mul":
        result = operand(a[0]) * operand(a[1]) if wide else a[0] * a[1]
    elif base == "mad":
        result = (operand(a[0]) * operand(a[1]) if wide else a[0] * a[1]) + a[2]
    elif base == "and":
        result = a[0] & a[1]
    elif base == "or":
        result = a[0] | a[1]
    elif base == "xor":
        result = a[0] ^ a[1]
    elif base == "shl":
        result = a[0] << a[1]
    elif base == "shr":
        result = operand(a[0]) >> a[1]
    elif base == "neg":
        result = -a[0]
    elif base == "bfe":
        field = (a[0] & _MASKS.get(bits, -1)) >> a[1] & ((1 << a[2]) - 1)
        result = _signed(field, a[2]) if signed and a[2] else field  # bfe.s sign-extends the field
    elif base == "cvt":
        source_bits = _bits(suffix)
        result = _signed(a[0], source_bits) if suffix.startswith("s") else a[0] & _MASKS.get(source_bits, -1)
        bits = _bits(op.split(".")[-2])
    elif base in ("min", "max"):
        result = (min if base == "min" else max)(operand(a[0]), operand(a[1]))
    elif base == "setp":
        x, y = operand(a[0]), operand(a[1])
        comparisons = {"lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y, "eq": x == y, "ne": x != y}
        compared = comparisons.get(op.split(".")[1])
        return None if compared is None else int(compared)
    else:
        return None
    return result & _MASKS.get(bits, (1 << 64) - 1)


def shared_accesses(ptx: str, warp: int, num_threads: int) -> list[Access]:
    """Every ld/st/ldmatrix/stmatrix on shared memory in ``ptx``, with the addresses warp ``warp`` gives it."""
    registers: dict[str, list[int | None]] = {}

    def value(token: str, lane: int) -> int | None:
        token = token.strip()
        if token.startswith("%tid.x"):
            return 32 * warp + lane
        if token.startswith(("%tid.", "%ctaid")):
            return 0
        if token.startswith("%ntid.x"):
            return num_threads
        if token.startswith("%"):
            lanes = registers.get(token)
            return None if lanes is None else lanes[lane]
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", token):
            return int(token, 16)
        return 0 if token == "global_smem" else None

    accesses = []
    for line in ptx.splitlines():
        match = _INSTRUCTION.match(line.strip())
        if not match or line.strip().startswith((".", "//")):
            continue
        predicate, op, arguments = match.groups()
        if ".shared" in op and op.startswith(("ld", "st")):
            accesses.append(_access(op, arguments, predicate, registers))
            continue
        operands = [a.strip() for a in arguments.split(",")]
        destination = operands[0]
        if not destination.startswith("%") or (predicate and destination in registers):
            continue  # a predicated redefinition keeps the first value (loops run once in this model)
        registers[destination] = [_evaluate(op, [value(o, lane) for o in operands[1:]]) for lane in range(32)]
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
