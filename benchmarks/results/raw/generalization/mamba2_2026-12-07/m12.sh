#!/usr/bin/env bash
# Issue #22, multi-key needles for the Mamba2 hybrid (2026-12-07; as run: once, as written, on one H100, 465 s;
# results in generalization.md section 6, item 18; its outputs were not kept). The SWA model learned
# them from haystacks made of keyed needles (generalization.md section 1, stages 3-5: 3000 + 1500 + 1400 steps);
# here the same data from benchmarks/models/mamba2-passkey, two runs side by side on one GPU, both with the
# auxiliary retrieval loss (W = 1: the weight on the asked needle's chunk, which is what multi-key needs):
#   mk2   stage 3's data (niah_multikey_2 only, 256-512 tokens)
#   mix   stage 4's data from the start (niah_multikey_2 twice, niah_multikey_1, passkey; 256-768 tokens)
# then, for each, RULER niah_multikey_1 at 4K and 1M and pass keys at 1M on prompt seed 1 (selection only: the
# chosen model is measured on fresh seeds in a later call). From the repository root on the device machine
# (carry .wheels/slim.tar.xz):
#   bash benchmarks/results/raw/generalization/mamba2_2026-12-07/m12.sh
# INIT=DIR continues from another model (a run exported by an earlier call, carried); STEPS, LIMIT (seconds of
# training) and RUNS (a subset of "mk2 mix") size it. Outputs under $OUT: each run's metrics and log tail, its
# evaluation summaries, its weights in bf16 (model-<run>.safetensors, config beside).
set -u
out="${OUT:-out}"; mkdir -p "$out" runs/m12; LENGTHS="${LENGTHS:-4k,1m}"
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh  # DEVICE=cpu: a dry run here (with STEPS=4, LENGTHS=4k)
dev=${DEVICE:+--device $DEVICE}
init="${INIT:-benchmarks/models/mamba2-passkey}"
start=$SECONDS
train() {  # name config [overrides...]
    local name=$1 config=$2; shift 2
    timeout "${LIMIT:-420}" python3 recipes/sft.py --config "recipes/configs/$config" model.checkpoint="$init" \
        train.retrieval_loss=1 train.steps="${STEPS:-3000}" train.eval_every=250 train.save_every=250 \
        train.output_dir="runs/m12/$name" "$@" > "runs/m12/$name.log" 2>&1
    python3 recipes/export.py "runs/m12/$name" "runs/m12/$name-model" --dtype bfloat16 > /dev/null 2>&1
}
for name in ${RUNS:-mk2 mix}; do
    case $name in
    mk2) train mk2 generalization-stage3.yaml & ;;
    mix) train mix generalization-stage4.yaml & ;;
    esac
done
wait
echo "training: $((SECONDS - start)) s"
for name in ${RUNS:-mk2 mix}; do
    m=runs/m12/$name-model
    [ -f "$m/model.safetensors" ] || { echo "$name: no model"; continue; }
    grep -h "eval_answer_accuracy" "runs/m12/$name/metrics.jsonl" | tail -1 | cut -c1-400
    cp "runs/m12/$name/metrics.jsonl" "$out/$name-metrics.jsonl"
    cp "$m/model.safetensors" "$out/model-$name.safetensors"; cp "$m/config.json" "$out/config-$name.json"
    timeout 60 python3 -m benchmarks.ruler --checkpoint "$name=$m" --tasks niah_multikey_1 --lengths "${LENGTHS:-4k,1m}" \
        --samples 2 --seed 1 --segment 1048576 $dev --out "runs/m12/$name-mk1" 2>&1 | grep -A3 "^| model"
    cp "runs/m12/$name-mk1/summary.md" "$out/$name-multikey_1.md" 2>/dev/null
    timeout 30 python3 -m benchmarks.passkey --checkpoint "$name=$m" --lengths "${LENGTHS##*,}" --samples 2 --seed 1 \
        --segment 1048576 $dev --out "runs/m12/$name-pk" 2>&1 | grep -A3 "^| model"
done
echo "total: $((SECONDS - start)) s"
