"""Compile the persistent kernels for a GPU architecture without a GPU and report their resources.

    python -m perf.compile_report [--arch 90] [--hidden 256 512 1024] [--dtype bf16 fp32] [--stack 3] [--check]
                                  [--max-stack BYTES]

Prints registers per thread, local stack, shared memory, the layout of the dots' warps (rows x columns of
mma.sync tiles, or chunks x rows x columns for a reduction in chunks) and the shared-memory wavefronts of its loads
and stores against their ideal (``ld_waves``, ``st_waves``: bank conflicts, perf/smem_banks.py) of every kernel at
the configuration ``tritonrnn._plan.plan_layer`` would pick on a 132-SM GPU, and checks that the grid barrier
lowers to one predicated release and one predicated acquire per program between CTA barriers, and that h is read
from other programs past L1 (after the barrier) or volatile (the tagged words). It needs only the
ptxas and cuobjdump shipped with Triton, so the fit of a configuration is known before a device is
lent. ``--check`` exits 1 when a planned kernel needs more shared memory than an H100 block has, or the
barrier's or the exchange's lowering is not the expected one, and with ``--max-stack`` when a planned kernel spills
more than that many bytes of registers to its local stack frame (a spill is read and written every step).
``--stack L`` reports the kernels of a stack of L equal layers in one launch (kernels/stack.py,
``tritonrnn._plan.plan_stack``) instead. Run it with the interpreter off (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from perf import smem_banks
from tritonrnn import _plan
from tritonrnn._plan import FP_FUSION
from tritonrnn.kernels.dropout import DROPOUT_STANDARD, DROPOUT_VARIATIONAL
from tritonrnn.kernels.lstm_proj import lstm_proj_bwd_kernel, lstm_proj_fwd_kernel
from tritonrnn.kernels.recurrent import _load_h_prev, rnn_bwd_kernel, rnn_fwd_kernel
from tritonrnn.kernels.stack import stack_bwd_kernel, stack_fwd_kernel
from tritonrnn.kernels.sync import arrive, grid_barrier, wait_each
from tritonrnn.layer_run import Variant, _kernel_constants, forward_transposed, weights_transposed

H100_MAX_SHARED = 232448  # bytes per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALAR_TYPES = {"p_drop": "fp32"}  # other scalar arguments are i32
# What a layer's kernels do besides the recurrence (each compiles separately).
VARIANTS = {
    "plain": Variant(),
    "bidir+residual+dropout+varlen": Variant(
        directions=2, residual=True, dropout_mode=int(DROPOUT_STANDARD.value), varlen=True
    ),
    "variational": Variant(dropout_mode=int(DROPOUT_VARIATIONAL.value)),
    # LSTM only; proj_size = hidden // 4 (kernels/lstm_proj.py)
    "proj+bidir+residual+dropout+varlen": Variant(2, True, int(DROPOUT_STANDARD.value), proj=-1, varlen=True),
}


def _signature(fn, pointer_types: dict[str, str], constants: dict) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
            constexprs[name] = constants[name]
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        else:
            signature[name] = SCALAR_TYPES.get(name, "i32")
    return signature, constexprs


def _compile(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    # Pointers 16-byte aligned, as every tensor torch allocates is, and as a launch (and layer_run._gpu_misfit's
    # compile) tells Triton: without it the pipeliner leaves out its async-copy buffers and the shared memory
    # reported is not the launched kernel's (perf/NOTES.md, twenty-third session).
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name][0] == "*"}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": FP_FUSION}  # as a launch
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@triton.jit
def _barrier_probe(counter, out, n):
    for s in range(n):
        grid_barrier(counter, (s + 1) * tl.num_programs(0))
    tl.store(out + tl.program_id(0), 1)


def barrier_lowering_problems(arch: int) -> list[str]:
    """What is wrong with the grid barrier's PTX (empty when it is one predicated release, one predicated
    acquire, both at GPU scope, and CTA barriers around them)."""
    ptx = _compile(_barrier_probe, {"counter": "*i32", "out": "*i32", "n": "i32"}, {}, arch).asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    arrive = [line for line in lines if ".release" in line and ("red." in line or "atom." in line)]
    wait = [line for line in lines if ".acquire" in line]
    problems = []
    if len(arrive) != 1 or not arrive[0].startswith("@%p") or ".gpu" not in arrive[0]:
        problems.append(f"arrival is not one predicated gpu-scope release: {arrive}")
    if len(wait) != 1 or not wait[0].startswith("@%p") or ".gpu" not in wait[0]:
        problems.append(f"polling is not one predicated gpu-scope acquire: {wait}")
    if sum("bar.sync" in line for line in lines) < 3:
        problems.append("fewer than 3 CTA barriers around the arrival and the poll")
    return problems


@triton.jit
def _wait_each_probe(counters, out, n):
    arrive(counters + tl.program_id(0))
    wait_each(counters, n, 1)
    tl.store(out + tl.program_id(0), 1)


def wait_each_lowering_problems(arch: int) -> list[str]:
    """What is wrong with sync.wait_each's PTX (the tagged stack kernel's wait for each program of a layer):
    empty when it polls with predicated gpu-scope acquire atomics and a CTA barrier follows the poll loop."""
    ptx = _compile(_wait_each_probe, {"counters": "*i32", "out": "*i32", "n": "i32"}, {}, arch).asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    polls = [line for line in lines if ".acquire" in line]
    problems = []
    if not polls or not all(p.startswith("@%p") and "atom." in p and ".gpu" in p for p in polls):
        problems.append(f"the poll is not predicated gpu-scope acquire atomics: {polls}")
    elif not any("bar.sync" in line for line in lines[lines.index(polls[-1]) :]):
        problems.append("no CTA barrier after the poll")
    return problems


@triton.jit
def _exchange_load_probe(h, ring, out, step, B, TAGGED: tl.constexpr):
    o = tl.arange(0, 32)
    tl.store(out + o, _load_h_prev(h + o, ring, step, o, o < B, B, 32, tl.bfloat16, TAGGED))


def exchange_load_problems(arch: int) -> list[str]:
    """What is wrong with the PTX of the loads of h that other programs wrote (recurrent._load_h_prev): after the
    grid barrier they bypass L1 (ld.global.cg; an SM's L1 is not kept coherent with the others' writes), and with
    the tagged exchange every read of the words, the first and each poll again, is volatile (a plain load may be
    served from L1 and never see the new tag). The interpreter ignores both, so only the PTX shows them."""
    problems = []
    for tagged in (False, True):
        signature = {"h": "*bf16", "ring": "*i32", "out": "*bf16", "step": "i32", "B": "i32", "TAGGED": "constexpr"}
        ptx = _compile(_exchange_load_probe, signature, {"TAGGED": tagged}, arch).asm["ptx"]
        loads = [line.strip() for line in ptx.splitlines() if re.match(r"\s*(@%p\d+\s+)?ld\.(global|volatile)", line)]
        if tagged and (len(loads) < 2 or not all(".volatile" in line for line in loads)):
            problems.append(f"the tagged words are not all read volatile (first read and poll): {loads}")
        if not tagged and (not loads or not all(".cg" in line for line in loads)):
            problems.append(f"h is not read bypassing L1 after the barrier: {loads}")
    return problems


def _resources(
    fn, pointer_types: dict[str, str], constants: dict, arch: int, num_warps: int, num_stages: int = 3
) -> dict:
    kernel = _compile(fn, *_signature(fn, pointer_types, constants), arch, num_warps, num_stages)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    # How Triton laid the warps over the rows and columns of the dots' results (mma.sync's 16 x 8 tiles): warps on
    # rows a tile does not have compute copies of it (_plan.heuristic_width). "-" without tensor-core dots.
    # A 3-D dot (K_SPLIT > 1) has three: chunks x rows x columns. Each distinct layout, "+" between (a reduction in
    # chunks with streamed rows has both).
    layouts = re.findall(r"nvidia_mma<\{[^}]*warpsPerCTA = \[([\d, ]+)\]", kernel.asm["ttgir"])
    # Shared-memory wavefronts of the loads of one CTA, each instruction once (the step loop's dots dominate), and
    # the fewest those bytes could take: their ratio is the bank conflicts' toll (perf/smem_banks.py). Apart, those
    # of ldmatrix: the tensor-core dots' operands (the rest: the chunks' sum, exchanges, the FMA dots' operands); and
    # the stores'.
    waves = smem_banks.count(kernel.asm["ptx"], num_warps)
    return dict(
        regs=int(fields.get("REG", -1)),
        stack=int(fields.get("STACK", -1)),
        smem=kernel.metadata.shared,
        mma_warps="+".join(dict.fromkeys("x".join(layout.split(", ")) for layout in layouts)) or "-",
        ld_waves=f"{waves.loads}/{waves.loads_ideal}",
        st_waves=f"{waves.stores}/{waves.stores_ideal}",
        ldmatrix_waves=f"{waves.matrix_loads}/{waves.matrix_loads_ideal}",
    )


def _exchange(tagged: bool) -> contextlib.AbstractContextManager:
    """TRITONRNN_EXCHANGE as a run with ``tagged`` sets it: the heuristics' width depends on it."""
    return mock.patch.dict(os.environ, {"TRITONRNN_EXCHANGE": "tagged" if tagged else "barrier"})


def report(
    cell: str, hidden: int, batch: int, dtype: torch.dtype, arch: int, variant: str = "plain", tagged: bool = False
) -> tuple[str, int, int]:
    """A line on the kernels of one config, the larger shared memory of the two and the larger local stack frame
    (spilled registers; both 0 on fallback).

    Like functional.kernel_plan on a GPU, while the kernels need more shared memory than an H100 has, smaller plans
    (``_plan.smaller_plan``: one pipeline stage, or fewer held rows of the weight slice); ``tagged``: the kernels
    exchange h and the gate gradients in tagged words where they can (TRITONRNN_EXCHANGE=tagged).
    """
    variant = VARIANTS[variant]
    if variant.proj:
        if cell != "lstm":
            return f"{cell:8} H={hidden:5} B={batch:4}: no projection (LSTM only)", 0, 0
        variant = variant._replace(proj=max(1, hidden // 4))
    with mock.patch.object(_plan, "_sm_count", return_value=132), _exchange(tagged):
        # As layer_op.kernel_plan: the projection's kernels on the narrow slice
        block_h = _plan.MIN_DOT if variant.proj else None
        plan = _plan.plan_layer(cell, hidden, batch, dtype, torch.device("cuda", 0), variant.directions, block_h)
    if isinstance(plan, str):
        return f"{cell:8} H={hidden:5} B={batch:4} {TRITON_TYPES[dtype]}: fallback ({plan})", 0, 0
    if variant.proj:  # as layer_op.kernel_plan: the projection's kernels in chunks where they can be, one group
        plan = _plan.with_projection_chunks(plan, hidden, variant.proj, dtype)
        plan = _plan.in_one_group(plan, batch, hidden, dtype, variant.proj)
    full, attempt = plan, plan
    while attempt is not None:
        plan = attempt
        line, shared, stack = _report_plan(cell, hidden, batch, dtype, arch, variant, plan)
        if shared <= H100_MAX_SHARED:
            break
        attempt = _plan.smaller_plan(plan, full, batch)
    with _exchange(tagged):
        exchanged = _plan.with_exchange(plan, hidden, dtype, variant.proj)
    if exchanged != plan:
        # As kernel_plan: the tagged kernels on the slice the barrier's kernels hold, where they fit.
        tagged_line, tagged_shared, tagged_stack = _report_plan(cell, hidden, batch, dtype, arch, variant, exchanged)
        if tagged_shared <= H100_MAX_SHARED:
            return tagged_line, tagged_shared, tagged_stack
    return line, shared, stack


def _report_plan(cell, hidden, batch, dtype, arch, variant, plan) -> tuple[str, int, int]:
    constants = _kernel_constants(cell, hidden, dtype, plan, variant)
    num_warps, num_stages = constants.pop("num_warps"), constants.pop("num_stages")
    bwd_constants = _kernel_constants(cell, hidden, dtype, plan.for_backward(), variant, backward=True)
    bwd_warps, bwd_stages = bwd_constants.pop("num_warps"), bwd_constants.pop("num_stages")
    t, acc = TRITON_TYPES[dtype], "fp32"
    fwd_types = dict(xproj=t, w_hh=t, b_hn=t, hseq=t, state=acc, saved=t, y=t, res=t, z=t, counter="i32", w_hr=t,
                     mseq=t, lengths="i32", seed_ptr="i64", ring="i32" if dtype.itemsize == 2 else "i64")  # fmt: skip
    # ring is None where the exchange is not tagged, as a launch passes it (a constexpr: Triton 3.6 compiles the
    # kernels differently then).
    tagged = {} if variant.proj else dict(TAGGED=plan.tagged, **({} if plan.tagged else dict(ring=None)))
    transposed = dict(W_T=forward_transposed(cell, dtype, plan, hidden, variant.proj))  # as layer_run's launch
    if not variant.proj:
        transposed.update(HALVES=plan.held_halves)
    bwd_types = dict(w_hh=t, hseq=t, saved=t, c0=acc, grad_y=t, grad_z=t, grad_res=t, grad_gates=t, grad_xn=t,
                     grad_h=acc, grad_c=acc, counter="i32", w_hr=t, grad_hp=t, lengths="i32",
                     seed_ptr="i64", ring=fwd_types["ring"])  # fmt: skip
    fwd_kernel, bwd_kernel = (
        (lstm_proj_fwd_kernel, lstm_proj_bwd_kernel) if variant.proj else (rnn_fwd_kernel, rnn_bwd_kernel)
    )
    fwd = _resources(
        fwd_kernel,
        fwd_types,
        dict(constants, SAVE=True, SYNC=plan.persistent, WRITE_Y=variant.write_y, **tagged, **transposed),
        arch,
        num_warps,
        num_stages,
    )
    bwd = _resources(
        bwd_kernel, bwd_types, dict(bwd_constants, SYNC=plan.persistent, **tagged), arch, bwd_warps, bwd_stages
    )  # fmt: skip
    # A backward with a plan of its own (tuned) says where it differs.
    own = plan.backward is not None and plan.backward != plan
    bwd_plan = f" on its own plan: BLOCK_K={plan.backward.block_k} K_SPLIT={plan.backward.k_split} " \
               f"warps={bwd_warps} stages={bwd_stages}" if own else ""  # fmt: skip
    line = (
        f"{cell:8} H={hidden:5} B={batch:4} {t}: programs={plan.num_programs:3} BLOCK_H={plan.block_h} "
        f"BLOCK_B={plan.block_b} BLOCK_K={plan.block_k} K_SPLIT={plan.k_split} warps={num_warps} stages={num_stages} "
        f"{variant}"
        f"{' halves' * plan.held_halves}{' tagged' * plan.tagged} "
        f"| fwd {fwd} | bwd {bwd}{bwd_plan}"
    )
    return line, max(fwd["smem"], bwd["smem"]), max(fwd["stack"], bwd["stack"])


def stack_report(
    cell: str, hidden: int, batch: int, dtype: torch.dtype, arch: int, layers: int, variant: str = "plain",
    tagged: bool = False,
) -> tuple[str, int, int]:  # fmt: skip
    """A line on the stack kernels of ``layers`` equal layers, the larger shared memory and the larger local stack
    frame (both 0: layer by layer)."""
    variant = VARIANTS[variant]
    if variant.directions > 1 or variant.residual or variant.varlen or variant.proj:
        return f"{cell:8} H={hidden:5} B={batch:4}: {variant} is not for the stack kernel", 0, 0
    with mock.patch.object(_plan, "_sm_count", return_value=132), _exchange(tagged):
        plan = _plan.plan_stack(cell, hidden, layers, batch, dtype, torch.device("cuda", 0))
    t = TRITON_TYPES[dtype]
    if isinstance(plan, str):
        return f"{cell:8} H={hidden:5} B={batch:4} {t} L={layers}: layer by layer ({plan})", 0, 0
    head = f"{cell:8} H={hidden:5} B={batch:4} {t} L={layers}:"
    # As fused_stack.fused_plan: one pipeline stage where more do not fit (each stage count compiled once).
    for stages in dict.fromkeys((plan.num_stages, 1)):
        fwd, bwd, num_warps = _stack_resources(cell, hidden, dtype, arch, dataclasses.replace(plan, num_stages=stages),
                                               variant, tagged)  # fmt: skip
        shared = max(fwd["smem"], bwd["smem"])
        if shared <= H100_MAX_SHARED:
            break
    if shared > H100_MAX_SHARED:
        # What fused_stack does on the GPU: the compiled kernel is the fact (the held-bytes rule is a first guess).
        return f"{head} layer by layer (needs {shared} bytes of shared memory)", 0, 0
    line = (
        f"{head} programs={plan.num_programs:3}x{layers} "
        f"BLOCK_H={plan.block_h} BLOCK_B={plan.block_b} BLOCK_K={plan.block_k} warps={num_warps} stages={stages} "
        f"{variant}{' tagged' * tagged} | stack fwd {fwd} | stack bwd {bwd}"
    )
    return line, shared, max(fwd["stack"], bwd["stack"])


def _stack_resources(cell, hidden, dtype, arch, plan, variant, tagged) -> tuple[dict, dict, int]:
    """The stack kernels' resources at ``plan``: (forward, backward, num_warps)."""
    t = TRITON_TYPES[dtype]
    constants = _kernel_constants(cell, hidden, dtype, plan, variant)
    for name in ("D", "RESIDUAL", "VARLEN"):
        constants.pop(name)
    num_warps, num_stages = constants.pop("num_warps"), constants.pop("num_stages")
    acc = "fp32"
    ring = "i32" if dtype.itemsize == 2 else "i64"
    fwd_types = dict(xproj=t, w_ih=t, bias=t, w_hh=t, b_hn=t, hseq=t, state=acc, saved=t, z=t, counter="i32",
                     seed_ptr="i64", ring=ring)  # fmt: skip
    bwd_types = dict(w_ih=t, w_hh=t, hseq=t, saved=t, c0=acc, grad_y=t, grad_above=acc, grad_gates=t,
                     grad_xgates=t, grad_h=acc, grad_c=acc, counter="i32", seed_ptr="i64", ring=ring)  # fmt: skip
    constants.update(SYNC=True, TAGGED=tagged, **({} if tagged else dict(ring=None)))  # as _report_plan
    transposed = weights_transposed(cell, dtype, plan.k_split)  # as fused_stack's forward launch
    fwd = _resources(stack_fwd_kernel, fwd_types, dict(constants, SAVE=True, W_T=transposed), arch, num_warps,
                     num_stages)  # fmt: skip
    bwd = _resources(stack_bwd_kernel, bwd_types, dict(constants, ALL_LAYERS=False), arch, num_warps, num_stages)
    return fwd, bwd, num_warps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"], choices=sorted(_plan.CELLS))
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(VARIANTS))
    parser.add_argument("--stack", type=int, default=0, help="report the stack kernels of this many equal layers")
    parser.add_argument("--tagged", action="store_true", help="the kernels with TRITONRNN_EXCHANGE=tagged")
    parser.add_argument("--check", action="store_true", help="exit 1 on a kernel over H100 shared memory")
    parser.add_argument(
        "--max-stack", type=int, default=None, metavar="BYTES",
        help="with --check, also exit 1 on a kernel whose local stack frame (spilled registers) is larger",
    )  # fmt: skip
    args = parser.parse_args(argv)
    failures = barrier_lowering_problems(args.arch)
    print("grid barrier lowering:", "; ".join(failures) or "ok", flush=True)
    wait_failures = wait_each_lowering_problems(args.arch)
    print("per-program wait lowering:", "; ".join(wait_failures) or "ok", flush=True)
    failures += wait_failures
    exchange_failures = exchange_load_problems(args.arch)
    print("exchange loads:", "; ".join(exchange_failures) or "ok", flush=True)
    failures += exchange_failures
    for dtype in args.dtype:
        for cell in args.cells:
            for hidden in args.hidden:
                for batch in args.batch:
                    for variant in args.variants:
                        if args.stack:
                            line, shared, stack = stack_report(
                                cell, hidden, batch, DTYPES[dtype], args.arch, args.stack, variant, args.tagged
                            )  # fmt: skip
                        else:
                            line, shared, stack = report(
                                cell, hidden, batch, DTYPES[dtype], args.arch, variant, args.tagged
                            )  # fmt: skip
                        print(line, flush=True)
                        if shared > H100_MAX_SHARED:
                            failures.append(f"over shared memory: {line}")
                        if args.max_stack is not None and stack > args.max_stack:
                            failures.append(f"a stack frame of {stack} bytes: {line}")
    if args.check and failures:
        print("FAILED:\n" + "\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
