"""Compile the persistent kernels for a GPU architecture without a GPU and report their resources.

    python -m perf.compile_report [--arch 90] [--hidden 256 512 1024] [--dtype bf16 fp32]

Prints registers per thread, spilled bytes, local stack and shared memory of every kernel at the
configuration ``tritonrnn._plan.plan_layer`` would pick on a 132-SM GPU. It needs only the ptxas and
cuobjdump shipped with Triton, so the fit of a configuration is known before a device is lent.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from tritonrnn.kernels.recurrent import rnn_bwd_kernel, rnn_fwd_kernel

from tritonrnn import _plan
from tritonrnn.functional import _kernel_constants

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _signature(fn, pointer_types: dict[str, str], constants: dict) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
            constexprs[name] = constants[name]
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
        else:
            signature[name] = "i32"
    return signature, constexprs


def _resources(fn, pointer_types: dict[str, str], constants: dict, arch: int, num_warps: int) -> dict:
    signature, constexprs = _signature(fn, pointer_types, constants)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.findall(r"(\d+) bytes spill stores", kernel.asm.get("ptx", "")) or ["?"]
    return dict(
        regs=int(fields.get("REG", -1)),
        stack=int(fields.get("STACK", -1)),
        smem=kernel.metadata.shared,
        spill=spills[0],
    )


def report(cell: str, hidden: int, batch: int, dtype: torch.dtype, arch: int) -> str:
    with mock.patch.object(_plan, "_sm_count", return_value=132):
        plan = _plan.plan_layer(cell, hidden, batch, dtype, torch.device("cuda", 0))
    if isinstance(plan, str):
        return f"{cell:8} H={hidden:5} B={batch:4} {TRITON_TYPES[dtype]}: fallback ({plan})"
    constants = _kernel_constants(cell, hidden, dtype, plan)
    num_warps = constants.pop("num_warps")
    t, acc = TRITON_TYPES[dtype], "fp32"
    fwd = _resources(
        rnn_fwd_kernel,
        dict(xproj=t, w_hh=t, b_hn=t, hseq=t, state=acc, saved=acc, counter="i32"),
        dict(constants, SAVE=True, SYNC=plan.persistent),
        arch,
        num_warps,
    )
    bwd = _resources(
        rnn_bwd_kernel,
        dict(
            w_hh=t,
            hseq=t,
            saved=acc,
            c0=acc,
            grad_out=t,
            grad_gates=t,
            grad_xn=t,
            grad_h=acc,
            grad_c=acc,
            counter="i32",
        ),
        dict(constants, SYNC=plan.persistent),
        arch,
        num_warps,
    )
    return (
        f"{cell:8} H={hidden:5} B={batch:4} {t}: programs={plan.num_programs:3} BLOCK_H={plan.block_h} "
        f"BLOCK_B={plan.block_b} warps={num_warps} | fwd {fwd} | bwd {bwd}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn_tanh"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    args = parser.parse_args()
    for dtype in args.dtype:
        for cell in args.cells:
            for hidden in args.hidden:
                for batch in args.batch:
                    print(report(cell, hidden, batch, DTYPES[dtype], args.arch), flush=True)


if __name__ == "__main__":
    main()
