#!/usr/bin/env bash
# Issue #22, fifth GPU call: the fourth call's bounded variants (mamba2-reset-256, -all, -lower) did not learn in
# 2400 steps. Two questions side by side on one GPU: (1) a curriculum: m3's mamba2-reset model (which learned with
# its unbounded upper state) retrained for 2400 steps with its upper blocks restarted every 256 tokens or every
# chunk; (2) mamba2-reset-lower from scratch for twice the steps. Then pass keys at 4K-1M, probe and drift.
# Needs m3's mamba2-reset weights in runs/init/mamba2-reset (carried; config.json = the tiny preset with that
# variant's fields). Run from the repository root (STEPS_N, LIMIT_S, LENGTHS and DEVICE shrink it for a CPU dry run):
#   RUN=m5 bash benchmarks/results/raw/generalization/mamba2_2026-12-05/m5.sh
# Outputs: $OUT/$RUN.tar.gz, $OUT/model-*.safetensors.
# The sixth call (the curriculum with a lower, decaying learning rate; m5's runs were unstable at a constant 1e-3):
#   RUN=m6 JOBS="$M6" bash .../m5.sh, with M6 the three lines
#   all-3e-4 mamba2-reset-all 3000 runs/init/mamba2-reset 3e-4 0.1
#   all-1e-4 mamba2-reset-all 3000 runs/init/mamba2-reset 1e-4 0.1
#   256-3e-4 mamba2-reset-256 3000 runs/init/mamba2-reset 3e-4 0.1
set -u
run="${RUN:-m5}"; out="${OUT:-out}"; runs=runs/$run; mkdir -p "$runs" "$out"
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
start=$SECONDS
dev=${DEVICE:+--device $DEVICE}
steps=${STEPS_N:-2400}
# name variant steps init lr min-lr-ratio
jobs="${JOBS:-curriculum-256 mamba2-reset-256 $steps runs/init/mamba2-reset 1e-3 1
curriculum-all mamba2-reset-all $steps runs/init/mamba2-reset 1e-3 1
scratch-lower mamba2-reset-lower $((2 * steps)) - 1e-3 1}"
while read -r name variant n init lr ratio; do
    init_arg=(); [ "$init" = - ] || init_arg=(--init "$init")
    timeout "${LIMIT_S:-470}" python3 -m benchmarks.ablations --variants "$variant" --steps "$n" --length 640 \
        --lr "$lr" --min-lr-ratio "$ratio" \
        --min-length 160 --batch-size 32 --eval-every 300 --lengths "${LENGTHS:-4k,64k,1m}" \
        --depths 0,0.25,0.5,0.75,1 --samples 4 --segment 65536 "${init_arg[@]}" $dev --out "$runs/$name" \
        > "$runs/$name.log" 2>&1 &
done <<< "$jobs"
wait
echo "training and pass keys: $((SECONDS - start)) s"
tar czf "$out/$run.tar.gz" --exclude='*.safetensors' "$runs"
left=$(( ${BUDGET_S:-540} - (SECONDS - start) )); left=$(( left > 20 ? left - 10 : 10 ))
models=()
while read -r name variant n init lr ratio; do
    [ -f "$runs/$name/$variant/model.safetensors" ] && models+=("$name=$runs/$name/$variant")
done <<< "$jobs"
for nm in "${models[@]}"; do
    timeout $left python3 -m benchmarks.probe --checkpoint "${nm#*=}" --task passkey --lengths "${PROBE_LENGTHS:-4k,64k}" \
        --samples 6 --segment 65536 $dev --out "$runs/probe-${nm%%=*}.md" > "$runs/probe-${nm%%=*}.log" 2>&1 &
done
timeout $left python3 -m benchmarks.drift $(printf -- "--checkpoint %s " "${models[@]}") \
    --length "${DRIFT_LENGTH:-64k}" --segment 4096 $dev --out "$runs/drift.md" > "$runs/drift.log" 2>&1 &
wait
echo "probe and drift: $((SECONDS - start)) s"
tar czf "$out/$run.tar.gz" --exclude='*.safetensors' "$runs"
for nm in "${models[@]}"; do  # bf16 weights (a file comes back under 16 MiB)
    python3 -c "import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" \
        "${nm#*=}/model.safetensors" "$out/model-${nm%%=*}.safetensors"
done
while read -r name variant n init lr ratio; do grep "^|" "$runs/$name/$variant.md" | tail -4; done <<< "$jobs"
while read -r name variant n init lr ratio; do echo "$name"; grep -A2 "^| model" "$runs/$name/passkey/summary.md" | tail -1; done <<< "$jobs"
for nm in "${models[@]}"; do echo "${nm%%=*}"; grep "^|" "$runs/probe-${nm%%=*}.md" | tail -2; done
grep "^|" "$runs/drift.md"
