#!/usr/bin/env bash
# One call on a lent GPU machine (no internet): install carried wheels, run the GPU tests, then the benchmarks.
# Carry .wheels (pytest, hypothesis wheels for the machine's Python) and .thirdparty (the baselines, see
# benchmarks/kernels.py); neither is committed.
# Each step has its own time limit; outputs go to $OUT (or ./out). Usage: bash benchmarks/device_run.sh
set -u
out="${OUT:-out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --find-links .wheels pytest hypothesis 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "${TESTS_S:-180}" python3 -m pytest -q -rs -p no:cacheprovider -x tests/test_gpu.py tests/test_aggregate_triton.py \
    tests/test_retrieve_triton.py 2>&1 | tee "$out/gpu_tests.log" | tail -8
timeout "${KERNELS_S:-200}" python3 -m benchmarks.kernels --quick --out "$out/kernels.md" 2>&1 | tail -40
timeout "${TRAINING_S:-120}" python3 -m benchmarks.training --steps 5 --out "$out/training.md" 2>&1 | tail -8
timeout "${LONG_S:-120}" python3 -m benchmarks.long_context --presets tiny --mixers swa,mamba2 --lengths 64k,1m \
    --out "$out/long_context.md" 2>&1 | tail -10
