#!/usr/bin/env bash
# One call on a lent GPU machine (no internet): install carried wheels, then run the chosen steps.
# Carry .wheels (wheels for the machine's Python: pytest, hypothesis, accelerate, pyyaml, safetensors, tqdm,
# matplotlib, pytest-xdist and their dependencies) and .thirdparty (the baselines, see
# benchmarks/kernels/aggregate.py); neither is committed. Outputs go to $OUT (or ./out).
# Usage: STEPS="backends tests kernels mixers training long" bash benchmarks/device_run.sh
#   each step has its own time limit in seconds (TESTS_S, KERNELS_S, MIXERS_S, TRAINING_S, LONG_S, TRAIN_S,
#   EVALS_S) and its own arguments (KERNELS_ARGS, MIXERS_ARGS, TRAINING_ARGS, LONG_ARGS, TRAIN_ARGS, EVALS_ARGS).
#   The step "train" runs recipes/${RECIPE:-sft}.py with TRAIN_ARGS; "evals" runs passkey, ruler and babilong
#   on CHECKPOINT with EVALS_ARGS (and PASSKEY_ARGS, RULER_ARGS, BABILONG_ARGS) and packs their outputs into $OUT/evals.tar.gz.
set -u
out="${OUT:-out}"; mkdir -p "$out"
source benchmarks/device_setup.sh

tests() {  # TESTS: the test files (default: the whole suite), in TEST_WORKERS processes where pytest-xdist is installed
    local workers="" n="${TEST_WORKERS:-8}"
    if python3 -c "import xdist" 2>/dev/null; then  # CPU threads shared out: 12 workers x all cores starved each other
        workers="-n $n"; local -x OMP_NUM_THREADS=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))
    fi
    # SIGINT at the limit: pytest then still prints its summary of the tests run so far
    timeout -s INT -k 30 "${TESTS_S:-300}" python3 -m pytest -v -rfEs --durations=20 -p no:cacheprovider $workers \
        ${TESTS:-tests} > "$out/gpu_tests.log" 2>&1
    grep -E "FAILED|ERROR|passed|failed|Interrupted" "$out/gpu_tests.log" | tail -30
}
backends() {  # which backend each op takes here, and why the others are skipped
    python3 -c "import ramba; ramba.print_backends()" 2>&1 | tee "$out/backends.txt"
}
mixers() {
    timeout "${MIXERS_S:-240}" python3 -m benchmarks.mixers ${MIXERS_ARGS:-} --out "$out/mixers.md" 2>&1 \
        | tee "$out/mixers.log" | tail -60
}
kernels() {
    timeout "${KERNELS_S:-200}" python3 -m benchmarks.kernels ${KERNELS_ARGS:---quick} --out "$out/kernels.md" 2>&1 \
        | tee "$out/kernels.log" | tail -60
}
training() {
    timeout "${TRAINING_S:-120}" python3 -m benchmarks.training ${TRAINING_ARGS:---steps 5} --out "$out/training.md" \
        2>&1 | tee "$out/training.log" | tail -12
}
long() {
    timeout "${LONG_S:-120}" python3 -m benchmarks.long_context ${LONG_ARGS:---presets tiny --lengths 64k,1m} \
        --out "$out/long_context.md" 2>&1 | tee "$out/long_context.log" | tr '\r' '\n' | grep -v "seg/s\]" | tail -30
}
train() {
    timeout "${TRAIN_S:-300}" python3 "recipes/${RECIPE:-sft}.py" ${TRAIN_ARGS:-} 2>&1 | tee "$out/train.log" \
        | tr '\r' '\n' | grep -v "it/s\]" | tail -15
}
evals() {
    for bench in ${EVALS:-passkey ruler babilong}; do
        extra="${bench^^}_ARGS"  # PASSKEY_ARGS, RULER_ARGS, BABILONG_ARGS: arguments of one benchmark only
        timeout "${EVALS_S:-120}" python3 -m "benchmarks.$bench" --checkpoint "${CHECKPOINT:-runs/sft/final}" \
            ${EVALS_ARGS:-} ${!extra:-} --out "evals/$bench" 2>&1 | tr '\r' '\n' | grep -v "it/s\]" | tail -12
    done
    tar czf "$out/evals.tar.gz" evals
}
for step in ${STEPS:-tests kernels training long}; do
    echo "=== $step ($(date +%T))"
    "$step"
done
echo "=== done ($(date +%T))"
