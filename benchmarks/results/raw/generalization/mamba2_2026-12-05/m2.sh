#!/usr/bin/env bash
# Issue #22, second GPU call: m1.sh's budget doubled (2400 steps) for the variants that learned something there,
# and two with a 128-token horizon (states at 64M distributed as in training), side by side on one GPU; pass keys
# at 4K-1M, then benchmarks.probe and benchmarks.drift on each model.
# Run from the repository root: bash benchmarks/results/raw/generalization/mamba2_2026-12-05/m2.sh
# (STEPS_N, LIMIT_S, LENGTHS and DEVICE shrink it for a CPU dry run). Outputs: $OUT/$RUN.tar.gz, $OUT/model-*.safetensors.
# The third call (2026-12-06; mamba_horizon bounding the decay only, mamba_reset, 20 prompts a cell): RUN=m3
#   DEPTHS=0,0.25,0.5,0.75,1 SAMPLES=4 LIMIT_S=500 BUDGET_S=560 DRIFT_LENGTH=64k
#   VARIANTS="mamba2 mamba2-horizon-128 mamba2-upper-horizon mamba2-reset mamba2-reset-horizon" bash .../m2.sh
# The fourth call (mamba_reset_upper): RUN=m4 DEPTHS=0,0.25,0.5,0.75,1 SAMPLES=4 LIMIT_S=400 BUDGET_S=450
#   DRIFT_LENGTH=64k VARIANTS="mamba2-reset-256 mamba2-reset-all mamba2-reset-lower" bash .../m2.sh
set -u
run="${RUN:-m2}"; out="${OUT:-out}"; runs=runs/$run; mkdir -p "$runs" "$out"
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
start=$SECONDS
dev=${DEVICE:+--device $DEVICE}
variants="${VARIANTS:-mamba2 mamba2-upper mamba2-lower mamba2-horizon-128 mamba2-upper-horizon}"
for v in $variants; do
    timeout "${LIMIT_S:-450}" python3 -m benchmarks.ablations --variants "$v" --steps "${STEPS_N:-2400}" --length 640 \
        --min-length 160 --batch-size 32 --eval-every 300 --lengths "${LENGTHS:-4k,64k,1m}" --depths "${DEPTHS:-0,0.5,1}" \
        --samples "${SAMPLES:-2}" --segment 65536 $dev --out "$runs/$v" > "$runs/$v.log" 2>&1 &
done
wait
echo "training and pass keys: $((SECONDS - start)) s"
tar czf "$out/$run.tar.gz" --exclude='*.safetensors' "$runs"
left=$(( ${BUDGET_S:-540} - (SECONDS - start) )); left=$(( left > 20 ? left - 10 : 10 ))
models=()
for v in $variants; do [ -f "$runs/$v/$v/model.safetensors" ] && models+=("$v=$runs/$v/$v"); done
for nm in "${models[@]}"; do
    timeout $left python3 -m benchmarks.probe --checkpoint "${nm#*=}" --task passkey --lengths "${PROBE_LENGTHS:-4k,64k}" \
        --samples 6 --segment 65536 $dev --out "$runs/probe-${nm%%=*}.md" > "$runs/probe-${nm%%=*}.log" 2>&1 &
done
timeout $left python3 -m benchmarks.drift $(printf -- "--checkpoint %s " "${models[@]}") \
    --length "${DRIFT_LENGTH:-256k}" --segment 4096 $dev --out "$runs/drift.md" > "$runs/drift.log" 2>&1 &
wait
echo "probe and drift: $((SECONDS - start)) s"
tar czf "$out/$run.tar.gz" --exclude='*.safetensors' "$runs"
for nm in "${models[@]}"; do  # bf16 weights (a file comes back under 16 MiB)
    python3 -c "import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" \
        "${nm#*=}/model.safetensors" "$out/model-${nm%%=*}.safetensors"
done
for v in $variants; do grep "^|" "$runs/$v/$v.md" | tail -3; done
for v in $variants; do grep -A2 "^| model" "$runs/$v/passkey/summary.md" | tail -1; done
for nm in "${models[@]}"; do echo "${nm%%=*}"; grep "^|" "$runs/probe-${nm%%=*}.md" | tail -2; done
grep "^|" "$runs/drift.md"
