#!/usr/bin/env bash
# The length-generalization study of benchmarks/results/generalization.md, on one GPU machine.
# Usage: PARTS="train:swa evals:swa:4k,64k,1m:4 ablations pack" bash benchmarks/generalization.sh
#   train:MIXER             recipes/sft.py, stage 1 then stage 2 (recipes/configs/generalization-stage{1,2}.yaml)
#                           for local_mixer MIXER (swa or mamba2); steps from STEPS_<MIXER> ("stage1 stage2")
#   multikey:MIXER          stages 3, 4 and 5 (generalization-stage{3,4,5}.yaml, keyed needles) from that
#                           model's stage 2; MULTIKEY_ARGS are added to each stage's overrides
#   evals:MIXER:LENGTHS:N[:BENCHMARKS]  benchmarks.passkey, benchmarks.ruler (niah_single_1, niah_multikey_1)
#                           and benchmarks.babilong (qa1, qa2), or those of BENCHMARKS (comma-separated), on that
#                           model, N samples per depth (DEPTHS, default 0,0.25,0.5,0.75,1)
#   ablations               benchmarks.ablations with ABLATIONS_ARGS
#   pack                    results (logs, metrics, benchmark outputs) to $OUT/results.tar.gz and each trained
#                           model, in bfloat16, to $OUT/NAME.tar, NAME as in benchmarks/models/ (MIXER-passkey
#                           after stage 2, MIXER-multikey after stage 5): tar xf NAME.tar -C benchmarks/models
# STAGE=5 makes evals and pack take the stage-5 model instead of the stage-2 one.
# Each command stops after PART_S seconds (default 600). Carry .wheels (see benchmarks/device_setup.sh).
set -u
out="${OUT:-out}"; runs=runs/generalization; mkdir -p "$out" "$runs/logs"
source benchmarks/device_setup.sh
limit="${PART_S:-600}"
segment="${SEGMENT:-4096}"
depths="${DEPTHS:-0,0.25,0.5,0.75,1}"
stage="${STAGE:-2}"
shipped() {  # the name of MIXER's packed model in benchmarks/models/
    case $stage in 2) echo "$1-passkey" ;; 5) echo "$1-multikey" ;; *) echo "$1-stage$stage" ;; esac
}

train() {
    local mixer=$1 steps="STEPS_${1^^}"; read -r s1 s2 <<< "${!steps:-800 600}"
    timeout "$limit" python3 recipes/sft.py --config recipes/configs/generalization-stage1.yaml \
        model.overrides.local_mixer="$mixer" train.steps="$s1" train.output_dir="$runs/$mixer-stage1" \
        ${STAGE1_ARGS:-} 2>&1 | tee "$runs/logs/train-$mixer-stage1.log" | grep "eval_loss\|Error\|error"
    timeout "$limit" python3 recipes/sft.py --config recipes/configs/generalization-stage2.yaml \
        model.checkpoint="$runs/$mixer-stage1/final" train.steps="$s2" train.output_dir="$runs/$mixer-stage2" \
        ${STAGE2_ARGS:-} 2>&1 | tee "$runs/logs/train-$mixer-stage2.log" | grep "eval_loss\|Error\|error"
}
multikey() {
    local mixer=$1 stage
    for stage in 3 4 5; do
        timeout "$limit" python3 recipes/sft.py --config "recipes/configs/generalization-stage$stage.yaml" \
            model.checkpoint="$runs/$mixer-stage$((stage - 1))/final" train.output_dir="$runs/$mixer-stage$stage" \
            ${MULTIKEY_ARGS:-} 2>&1 | tee "$runs/logs/train-$mixer-stage$stage.log" | grep "eval_loss\|Error\|error"
    done
}
evals() {
    local mixer=$1 lengths=$2 n=$3 model="$1=$runs/$1-stage$stage/final"
    [ -d "$runs/$1-stage$stage/final" ] || model="$1=$runs/$(shipped "$1")"  # packed by an earlier call, carried back
    local common=(--lengths "$lengths" --samples "$n" --segment "$segment")
    local benches=",${4:-passkey,ruler,babilong},"
    if [[ $benches == *,passkey,* ]]; then
        timeout "$limit" python3 -m benchmarks.passkey --checkpoint "$model" "${common[@]}" \
            --depths "$depths" --out "$runs/passkey" 2>&1 | grep -i "error"
        head -8 "$runs/passkey/summary.md"
    fi
    if [[ $benches == *,ruler,* ]]; then
        timeout "$limit" python3 -m benchmarks.ruler --checkpoint "$model" "${common[@]}" --depths "$depths" \
            --tasks niah_single_1,niah_multikey_1 --out "$runs/ruler" 2>&1 | grep -i "error"
        head -10 "$runs/ruler/summary.md"
    fi
    if [[ $benches == *,babilong,* ]]; then
        timeout "$limit" python3 -m benchmarks.babilong --checkpoint "$model" "${common[@]}" --tasks qa1,qa2 \
            --samples $((n * 5)) --out "$runs/babilong" 2>&1 | grep -i "error"
        head -10 "$runs/babilong/summary.md"
    fi
}
ablations() {
    timeout "$limit" python3 -m benchmarks.ablations ${ABLATIONS_ARGS:-} --out "$runs/ablations" 2>&1 \
        | tr '\r' '\n' | tee "$runs/logs/ablations.log" | grep -E "^## |^\| [0-9]+ \||took|rror"
    head -16 "$runs/ablations/passkey/summary.md"
}
pack() {
    for folder in "$runs"/*-stage$stage/final; do
        [ -d "$folder" ] || continue
        local name; name=$(shipped "$(basename "$(dirname "$folder")" "-stage$stage")")
        python3 -c "import sys, torch; from ramba import HSAHybrid
HSAHybrid.from_pretrained(sys.argv[1]).to(torch.bfloat16).save_pretrained(sys.argv[2])" "$folder" "$runs/$name"
        tar cf "$out/$name.tar" -C "$runs" "$name"
    done
    tar czf "$out/results.tar.gz" --exclude="*.safetensors" --exclude=checkpoints "$runs"
}
for part in ${PARTS:-train:swa evals:swa:4k,64k,1m:4 pack}; do
    echo "=== $part ($(date +%T))"
    IFS=: read -r -a words <<< "$part"
    "${words[@]}"
done
echo "=== done ($(date +%T))"
