#!/usr/bin/env bash
# One call on the lent GPU (the device tool): GPU tests, then the benchmark against cuDNN.
# Usage there: bash perf/device_run.sh [--quick]; logs and CSVs go to $OUT (or perf/results).
set -uo pipefail
out="${OUT:-perf/results}"
mkdir -p "$out"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$out/gpu.txt"
# The repository is not installed there: run from the tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -x -m gpu -p no:cacheprovider 2>&1 | tail -n 30 | tee "$out/pytest_gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m "not gpu" --deselect tests/test_packaging.py 2>&1 | tail -n 5 | tee "$out/pytest_rest.txt"
python3 -m perf.bench_core "$@" --out "$out/core.csv" 2>&1 | tee "$out/bench_core.txt" | tail -n 80
