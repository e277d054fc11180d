#!/usr/bin/env bash
# Issue #22, first GPU call: six tiny variants trained side by side on one GPU (benchmarks.ablations, the same
# budget as generalization.md section 2's Mamba2 row), pass keys at 4K-1M, then benchmarks.probe (does the model
# read the needle's chunk?) and benchmarks.drift (do landmarks and states move with length?) on each model.
# Run from the repository root: bash benchmarks/results/raw/generalization/mamba2_2026-12-05/m1.sh
# (STEPS_N, LIMIT_S and DEVICE shrink it for a CPU dry run). Outputs: $OUT/m1.tar.gz, $OUT/model-*.safetensors (bf16).
set -u
out="${OUT:-out}"; runs=runs/m1; mkdir -p "$runs" "$out"
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
start=$SECONDS
dev=${DEVICE:+--device $DEVICE}
steps=${STEPS_N:-1200}
common="--steps $steps --batch-size 32 --eval-every 200 --lengths ${LENGTHS:-4k,64k,1m} --depths 0,0.5,1 --samples 2
  --segment 65536 $dev"
for v in base mamba2 mamba2-horizon mamba2-upper mamba2-lower; do
    timeout "${LIMIT_S:-400}" python3 -m benchmarks.ablations --variants $v --length 640 --min-length 160 $common \
        --out "$runs/$v" > "$runs/$v.log" 2>&1 &
done
# the guess of generalization.md: prompts too long for the recurrent state to carry the key (as many tokens a step)
timeout "${LIMIT_S:-400}" python3 -m benchmarks.ablations --variants mamba2 --length 2048 --min-length 1024 \
    $(echo $common | sed 's/--batch-size 32/--batch-size 8/') --out "$runs/mamba2-long" > "$runs/mamba2-long.log" 2>&1 &
wait
echo "training and pass keys: $((SECONDS - start)) s"
tar czf "$out/m1.tar.gz" --exclude='*.safetensors' "$runs"
left=$(( ${BUDGET_S:-520} - (SECONDS - start) ))
models=()
for d in "$runs"/*/; do
    for m in "$d"*/; do [ -f "$m/model.safetensors" ] && models+=("$(basename "$d")=$m"); done
done
for nm in "${models[@]}"; do
    timeout $(( left > 20 ? left - 10 : 10 )) python3 -m benchmarks.probe --checkpoint "${nm#*=}" --task passkey \
        --lengths ${PROBE_LENGTHS:-4k,64k} --samples 6 --segment 65536 $dev --out "$runs/probe-${nm%%=*}.md" \
        > "$runs/probe-${nm%%=*}.log" 2>&1 &
done
timeout $(( left > 20 ? left - 10 : 10 )) python3 -m benchmarks.drift $(printf -- "--checkpoint %s " "${models[@]}") \
    --length ${DRIFT_LENGTH:-256k} --segment 4096 $dev --out "$runs/drift.md" > "$runs/drift.log" 2>&1 &
wait
echo "probe and drift: $((SECONDS - start)) s"
tar czf "$out/m1.tar.gz" --exclude='*.safetensors' "$runs"
for v in mamba2-horizon mamba2-upper mamba2-lower mamba2-long; do  # bf16 weights (a file comes back under 16 MiB)
    for m in "$runs/$v"/*/model.safetensors; do
        [ -f "$m" ] && python3 -c "import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" \
            "$m" "$out/model-$v.safetensors"
    done
done
grep -h -A12 "^| model\|^| checkpoint" "$runs"/*/passkey/summary.md 2>/dev/null | head -60
cat "$runs"/probe-*.md "$runs/drift.md" 2>/dev/null | grep "^|" | head -80
