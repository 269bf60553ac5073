#!/usr/bin/env bash
# On the lent GPU (the device tool): GPU tests, then the benchmarks against cuDNN, in stages that each fit
# one 10-minute device call. Logs and reports go to $OUT (or perf/results).
#
#   bash perf/device_run.sh tests            # GPU tier (pytest -m gpu), then the rest of the tests on the GPU
#   bash perf/device_run.sh quick            # the quick suite (the README's table and the baseline)
#   bash perf/device_run.sh stacks wavefront # dropout / bidirectional overheads; the stacks again with the wavefront
#   bash perf/device_run.sh fused            # the stacks suite with each stack of equal layers in one launch (kernels/stack.py)
#   bash perf/device_run.sh quick_fused      # the quick suite so (compare with `quick`: python -m perf compare)
#   bash perf/device_run.sh tagged           # the persist suite with h exchanged in tagged words (no grid barrier)
#   bash perf/device_run.sh persist large    # where cuDNN runs its persistent kernel; hidden sizes read in part each step
#   bash perf/device_run.sh tune             # tune a few bf16 LSTM keys: the tuner's cost and effect
# No stage named: tests quick stacks.
set -uo pipefail
out="${OUT:-perf/results}"
mkdir -p "$out"
unset TRITON_INTERPRET
# The repository is not installed there: run from the tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"

suite() {  # suite NAME [DIR]: one perf run into $out/DIR, its log beside it
    local name="$1" dir="${2:-$1}"
    python3 -m perf run --suite "$name" --out "$out/$dir" 2>&1 | tee "$out/perf_$dir.txt" | tail -n 40
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests quick stacks)
done_dirs=()
for stage in "${stages[@]}"; do
    case "$stage" in
        tests)
            python3 -m pytest -q --maxfail=10 -m gpu -p no:cacheprovider 2>&1 | tail -n 60 | tee "$out/pytest_gpu.txt"
            python3 -m pytest -q -p no:cacheprovider -m "not gpu" --deselect tests/test_packaging.py 2>&1 \
                | tail -n 5 | tee "$out/pytest_rest.txt" ;;
        quick|stacks|persist|full|large)
            suite "$stage"; done_dirs+=("$stage") ;;
        wavefront)
            TRITONRNN_WAVEFRONT=1 suite stacks stacks_wavefront; done_dirs+=(stacks_wavefront) ;;
        fused)
            TRITONRNN_WAVEFRONT=fused suite stacks stacks_fused; done_dirs+=(stacks_fused) ;;
        quick_fused)
            TRITONRNN_WAVEFRONT=fused suite quick quick_fused; done_dirs+=(quick_fused) ;;
        tagged)
            TRITONRNN_EXCHANGE=tagged suite persist persist_tagged; done_dirs+=(persist_tagged) ;;
        tune)
            # A first, small matrix: what tuning one key costs and what it changes (the whole quick matrix would
            # not fit one 10-minute call). Compare with `quick` rows after TRITONRNN_AUTOTUNE=1.
            TRITONRNN_CACHE_DIR="$out/tuned" python3 -m tritonrnn.autotune --cells lstm --hidden 512 1024 \
                --batch 16 64 --dtypes bf16 --export "$out/tuned/export.json" 2>&1 | tail -n 20 | tee "$out/tune.txt" ;;
        *)
            echo "unknown stage $stage (tests, quick, stacks, wavefront, fused, quick_fused, tagged, persist, large, full, tune)"; exit 2 ;;
    esac
done
# The device tool brings back at most 8 files from $OUT: pack the report folders (results.csv, report.md,
# report.html, plots/) into one archive there.
if [ -n "${OUT:-}" ] && [ ${#done_dirs[@]} -gt 0 ]; then
    tar -C "$out" -czf "$out/perf_reports.tar.gz" "${done_dirs[@]}" && (cd "$out" && rm -r "${done_dirs[@]}")
fi
