"""The first minute on a lent GPU: what the card is, what a grid barrier costs on it, and whether the kernels run.

    python -m perf.probe

Prints, as it goes (a hang shows where it happened):
1. the card and the versions (GPU, SMs, shared memory per block, L2; torch, triton, CUDA, cuDNN, numpy);
2. the synchronisation floor: a kernel whose programs only meet at the grid barrier (kernels/sync.py) once per
   step, 1024 steps, at 1, 16, 64 and all-SM programs, in us per step (ANCHORS.md has the H100's figures);
3. one small layer of each cell (bf16, B=16, H=512, T=256) through the benchmark runner: tritonrnn against cuDNN,
   forward and training step, time per step and relative error against float64.
Exit code 1 when a kernel failed to run or erred more than 1.5x cuDNN (or 1e-3, whichever is larger).

    python -m perf.probe --widths

times instead one layer (bf16, B=16, T=256) at the widths the heuristics chose between from sm_90 compiles alone
(tritonrnn/_plan.heuristic_width): 16 or 32 units a program, the reduction in one chunk or one a warp, against the
heuristics' own choice, forward and training step, with each one's error against float64 (the same exit code); the
same for float32 without TF32 (its FMA dots in chunks or in one: _plan.fma_chunks; with rows streamed, in two
pipeline stages or one); at B=256, plans in chunks on 16-row batch tiles (the heuristics') against 32-row ones; then
float32 layers with the forward's W_hh transposed and row-major (perf/NOTES.md, thirty-first to thirty-seventh
sessions).
"""

from __future__ import annotations

import math
import sys
from unittest import mock

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from perf import runner
from perf.compile_report import _barrier_probe
from perf.suites import Config
from tritonrnn import _plan, functional, layer_run

BARRIER_STEPS = 1024


def _config(cell: str, H: int, dtype: str = "bf16", B: int = 16) -> Config:
    """One layer, T=256, input size H (B=16 unless said): the probe's problems."""
    return Config(cell, dtype, B=B, H=H, T=256, L=1, input_size=H, bidirectional=False, dropout=0.0,
                  dropout_mode="standard", proj_size=0, passes=("fwd", "fwd+bwd"))  # fmt: skip


PROBE_CONFIGS = [_config(cell, 512) for cell in ("lstm", "gru", "rnn_tanh")]
# The plan fields each width forces (the rest derived as the heuristics derive them for that width), and the
# (cell, H, widths) timed: every width where the heuristics' choice was closest, two elsewhere.
WIDTHS = {
    "heuristics": {},
    "32 units": dict(block_h=32, k_split=1),
    "16 units": dict(block_h=16, k_split=1),
    "16 units, 8 chunks": dict(block_h=16, k_split=8),
    "32 units, 4 chunks": dict(block_h=32, k_split=4),
    "8 chunks, 1 stage": dict(block_h=16, k_split=8, num_stages=1),
    "32-row tiles": dict(block_b=32),
    "32-row tiles, 1 stage": dict(block_b=32, num_stages=1),
    "32-row tiles, 2 stages": dict(block_b=32, num_stages=2),
}
TENSOR_CORE_WIDTHS = ("heuristics", "32 units", "16 units", "16 units, 8 chunks", "32 units, 4 chunks")
WIDTH_CASES = [
    ("lstm", 1024, "bf16", TENSOR_CORE_WIDTHS),
    ("lstm", 512, "bf16", TENSOR_CORE_WIDTHS),
    ("gru", 1024, "bf16", ("heuristics", "32 units")),
    ("lstm", 2048, "bf16", ("heuristics", "16 units")),
    # float32 without TF32 (cuDNN too): the FMA dots in chunks against one (_plan.fma_chunks).
    ("lstm", 256, "fp32", ("heuristics", "16 units")),
    ("gru", 256, "fp32", ("heuristics", "16 units")),
    # Rows streamed beyond the 512 held (in halves: _plan.fma_halves): 8 chunks in two stages (where three do not
    # fit: _plan.smaller_plan) against one stage, and against one chunk (both kernels, three stages).
    ("lstm", 1024, "fp32", ("heuristics", "8 chunks, 1 stage", "16 units")),
]
# float32 without TF32 (cuDNN too), the forward on W_hh transposed and row-major (layer_run.weights_transposed), and
# half the slice held in chunks, the rest read from L2 every step (the heuristics hold it all, in two halves at H=512:
# _plan.fma_halves): fewer shared-memory wavefronts a step against L2 traffic (sm_90 compiles, perf/NOTES.md).
TRANSPOSED_CASES = [("lstm", 512), ("gru", 512)]
# (cell, H, dtype, B, widths): plans in chunks at B=256, where a group of programs loops over 8 or 16 batch tiles and
# reads its held rows from shared memory, and its streamed rows from L2, once a tile: the heuristics' 16-row tiles
# against 32 (the tuner's candidates too), at the most stages that fit (sm_90 compiles, perf/NOTES.md, thirty-seventh
# session; float32's 32-row backward spills 784-904 bytes a thread, its forward nothing).
BATCH_TILE_CASES = [
    ("lstm", 1024, "bf16", 256, ("heuristics", "32-row tiles")),
    ("lstm", 2048, "bf16", 256, ("heuristics", "32-row tiles, 2 stages")),
    ("lstm", 1024, "fp32", 256, ("heuristics", "32-row tiles, 1 stage")),
]
# (row, forward on W_hh transposed, plan fields forced)
TRANSPOSED_ROWS = [
    ("W_hh transposed", True, {}),
    ("W_hh row-major", False, {}),
    ("256 held, 8 chunks", True, dict(block_h=16, k_split=8, block_k=256)),
]


def card() -> str:
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    import numpy

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    # torch sends bf16 RNNs to cuDNN only when built against cuDNN 9.13 or newer (else ATen's step loop): what the
    # fallback layers and torch.nn's bf16 layers run.
    built = getattr(getattr(torch._C, "_cudnn", None), "getCompileVersion", lambda: None)()
    cudnn = f"{cudnn} (built with {'.'.join(map(str, built)) if built else 'unknown'})"
    return (
        f"{torch.cuda.get_device_name()}: {props['multiprocessor_count']} SMs, "
        f"{props['max_shared_mem']} B shared memory per block, L2 "
        f"{torch.cuda.get_device_properties(0).L2_cache_size / 2**20:.0f} MB | torch {torch.__version__}, triton "
        f"{triton.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, numpy {numpy.__version__}"
    )


def barrier_us_per_step(programs: int) -> float:
    """Median us per step of ``programs`` programs meeting at the grid barrier BARRIER_STEPS times."""
    out = torch.zeros(programs, dtype=torch.int32, device="cuda")  # not empty: reused memory could hold the 1s

    def launch() -> None:
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        _barrier_probe[(programs,)](counter=counter, out=out, n=BARRIER_STEPS, launch_cooperative_grid=True)

    launch()
    torch.cuda.synchronize()
    if not bool((out == 1).all()):
        raise RuntimeError(f"barrier probe with {programs} programs: not every program finished")
    return triton.testing.do_bench(launch, warmup=20, rep=100, return_mode="median") * 1e3 / BARRIER_STEPS


def main() -> int:
    if not torch.cuda.is_available():
        print("perf.probe needs a CUDA GPU")
        return 2
    print(card(), flush=True)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    for programs in sorted({1, 16, 64, sm_count}):
        print(f"grid barrier, {programs:3} programs: {barrier_us_per_step(programs):.2f} us/step", flush=True)
    failed = False
    for config in PROBE_CONFIGS:
        case = None
        for pass_ in config.passes:
            try:
                case = case or runner.Case(config, torch.device("cuda"))
                rows = {provider: runner.measure(case, provider, pass_) for provider in ("tritonrnn", "cudnn")}
            except Exception as error:  # one cell that fails is a finding; the other cells still run
                failed = True
                print(f"{config.cell:8} bf16 B16 H512 T256 {pass_:7}: FAILED {type(error).__name__}: "
                      f"{(str(error).splitlines() or [''])[0][:200]}", flush=True)  # fmt: skip
                continue
            ours, theirs = rows["tritonrnn"], rows["cudnn"]
            bound = max(1.5 * theirs["rel_err"], 1e-3)
            ok = math.isfinite(ours["rel_err"]) and ours["rel_err"] <= bound
            failed |= not ok
            print(
                f"{config.cell:8} bf16 B16 H512 T256 {pass_:7}: tritonrnn {ours['us_per_step_layer']:6.2f} us/step "
                f"err {ours['rel_err']:.1e} | cuDNN {theirs['us_per_step_layer']:6.2f} us/step err "
                f"{theirs['rel_err']:.1e} | {'ok' if ok else 'ERROR ABOVE 1.5x cuDNN'}"
                f"{' | ' + ours['note'] if ours['note'] else ''}",
                flush=True,
            )
    return 1 if failed else 0


def _per_pass(rows: dict[str, dict]) -> str:
    return " | ".join(f"{p} {r['us_per_step_layer']:6.2f} us/step err {r['rel_err']:.1e}" for p, r in rows.items())


def widths() -> int:
    """Each WIDTH_CASES layer (B=16), then each BATCH_TILE_CASES layer, at each of its WIDTHS: us per step forward and
    training step, error against float64."""
    if not torch.cuda.is_available():
        print("perf.probe needs a CUDA GPU")
        return 2
    print(card(), flush=True)
    device = torch.device("cuda")
    failed = False
    cases = [(cell, H, dtype, 16, names) for cell, H, dtype, names in WIDTH_CASES] + BATCH_TILE_CASES
    for cell, H, dtype, B, names in cases:
        with runner.tf32_flags(False):  # float32 in IEEE, tritonrnn and cuDNN alike (no effect on bf16)
            failed |= _time_widths(cell, H, dtype, names, device, B)
    return 1 if failed | (transposed(device) != 0) else 0


def _time_widths(cell: str, H: int, dtype: str, names: tuple[str, ...], device: torch.device, B: int = 16) -> bool:
    """One layer at each of its widths, printed; True where one failed or erred above 1.5x cuDNN."""
    failed = False
    config = _config(cell, H, dtype, B)
    case = runner.Case(config, device)
    cudnn = {pass_: runner.measure(case, "cudnn", pass_) for pass_ in config.passes}
    print(f"{cell} {dtype} B{B} H{H} T256 {'cuDNN':20}: {_per_pass(cudnn)}", flush=True)
    for name in names:
        _plan.force_plan(**WIDTHS[name])
        try:
            # A forced plan is not shrunk to fit: kernel_plan says why it cannot run (the layer would fall back).
            plan = functional.kernel_plan(cell, H, config.B, runner.DTYPES[dtype], device)
            if isinstance(plan, str):
                print(f"  {name:20}: does not run here ({plan})", flush=True)
                continue
            rows = {pass_: runner.measure(case, "tritonrnn", pass_) for pass_ in config.passes}
        except Exception as error:  # a width that does not compile or run here is a finding, not the end
            failed = True
            message = (str(error).splitlines() or [""])[0][:200]
            print(f"  {name:20}: FAILED {type(error).__name__}: {message}", flush=True)
            continue
        finally:
            _plan.force_plan()
        floor = 1e-3 if dtype != "fp32" else 1e-5
        ok = all(
            math.isfinite(r["rel_err"]) and r["rel_err"] <= max(1.5 * cudnn[p]["rel_err"], floor)
            for p, r in rows.items()
        )
        failed |= not ok
        verdict = "ok" if ok else "ERROR ABOVE 1.5x cuDNN"
        print(f"  {name:20}: {_per_pass(rows)} | {verdict} | {_described(plan)}", flush=True)
    return failed


def _described(plan: _plan.LayerPlan) -> str:
    described = (
        f"{plan.num_programs} programs x {plan.block_h} units, {plan.k_split} chunk(s), {plan.num_warps} "
        f"warps, {plan.num_stages} stage(s), {plan.block_k} held rows, {plan.block_b}-row tiles"
    )
    if plan.backward is not None:
        described += f"; backward {plan.backward.k_split} chunk(s), {plan.backward.num_stages} stage(s)"
    return described


def transposed(device: torch.device) -> int:
    """Each TRANSPOSED_CASES layer in float32 without TF32 with the forward's W_hh transposed and row-major, and half
    the slice held in chunks (TRANSPOSED_ROWS): us per step forward and training step, error against float64; 1 where
    one fails or errs above 1.5x cuDNN's."""
    failed = False
    with runner.tf32_flags(False):
        for cell, H in TRANSPOSED_CASES:
            config = _config(cell, H, "fp32")
            case = runner.Case(config, device)
            cudnn = {pass_: runner.measure(case, "cudnn", pass_) for pass_ in config.passes}
            print(f"{cell} fp32 B16 H{H} T256 {'cuDNN':20}: {_per_pass(cudnn)}", flush=True)
            plan = functional.kernel_plan(cell, H, config.B, torch.float32, device)
            if isinstance(plan, str):
                print(f"  does not run here ({plan})", flush=True)
                continue
            for name, flag, forced in TRANSPOSED_ROWS:
                _plan.force_plan(**forced)
                try:
                    row_plan = functional.kernel_plan(cell, H, config.B, torch.float32, device) if forced else plan
                    if isinstance(row_plan, str):
                        print(f"  {name:20}: does not run here ({row_plan})", flush=True)
                        continue
                    streamed = row_plan.block_k < H
                    if flag and not layer_run.weights_transposed(cell, torch.float32, row_plan.k_split, streamed):
                        print(f"  {name:20}: not with Triton {triton.__version__} (layer_run.weights_transposed)")
                        continue
                    with mock.patch.object(layer_run, "weights_transposed", lambda *plan, flag=flag: flag):
                        rows = {pass_: runner.measure(case, "tritonrnn", pass_) for pass_ in config.passes}
                except OutOfResources as error:  # the layout flipped past the plan's fit check (cached without it)
                    print(f"  {name:20}: does not run here ({(str(error).splitlines() or [''])[0][:200]})", flush=True)
                    continue
                except Exception as error:  # as widths(): a finding, not the end
                    failed = True
                    print(f"  {name:20}: FAILED {type(error).__name__}: {str(error)[:200]}", flush=True)
                    continue
                finally:
                    _plan.force_plan()
                ok = all(
                    math.isfinite(r["rel_err"]) and r["rel_err"] <= max(1.5 * cudnn[p]["rel_err"], 1e-5)
                    for p, r in rows.items()
                )
                failed |= not ok
                verdict = "ok" if ok else "ERROR ABOVE 1.5x cuDNN"
                print(f"  {name:20}: {_per_pass(rows)} | {verdict} | {_described(row_plan)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(widths() if sys.argv[1:] == ["--widths"] else main())
