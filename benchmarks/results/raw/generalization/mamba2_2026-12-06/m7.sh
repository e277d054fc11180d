#!/usr/bin/env bash
# Issue #22, seventh GPU call (2026-12-06). m3's mamba2-reset weights (the curriculum's start) were lost with the
# last session's ignored run folder, so this call first retrains them (stage 1: the m3 recipe, mamba2-reset from
# scratch at a constant 1e-3), then runs the curriculum of m6 from them (stage 2, three jobs side by side):
# the staggered restarts of mamba_reset_stagger against m6's best (all-1e-4), pass keys at 4K, 64K and 1M.
# Run from the repository root (STEPS1, STEPS2, LENGTHS and DEVICE shrink it for a CPU dry run):
#   RUN=m7 bash benchmarks/results/raw/generalization/mamba2_2026-12-06/m7.sh
# Outputs: $OUT/$RUN.tar.gz (logs, curves, per-prompt results), $OUT/model-*.safetensors (bf16 weights).
set -u
run="${RUN:-m7}"; out="${OUT:-out}"; runs=runs/$run; mkdir -p "$runs" "$out"
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
start=$SECONDS
dev=${DEVICE:+--device $DEVICE}
common=(--length 640 --min-length 160 --batch-size 32 --eval-every 300 --depths 0,0.25,0.5,0.75,1 --samples 4
        --segment 65536 $dev)
python3 -m benchmarks.ablations --variants mamba2-reset --steps "${STEPS1:-1800}" --lr 1e-3 --lengths 4k \
    "${common[@]}" --out "$runs/init" > "$runs/init.log" 2>&1
echo "stage 1: $((SECONDS - start)) s"; grep "^|" "$runs/init/mamba2-reset.md" | tail -3
init=$runs/init/mamba2-reset
# name variant lr
jobs="${JOBS:-stagger-1e-4 mamba2-reset-all-stagger 1e-4
stagger-3e-4 mamba2-reset-all-stagger 3e-4
all-1e-4 mamba2-reset-all 1e-4}"
while read -r name variant lr; do
    timeout "${LIMIT_S:-400}" python3 -m benchmarks.ablations --variants "$variant" --steps "${STEPS2:-3000}" \
        --lr "$lr" --min-lr-ratio 0.1 --lengths "${LENGTHS:-4k,64k,1m}" --init "$init" "${common[@]}" \
        --out "$runs/$name" > "$runs/$name.log" 2>&1 &
done <<< "$jobs"
wait
echo "stage 2 and pass keys: $((SECONDS - start)) s"
tar czf "$out/$run.tar.gz" --exclude='*.safetensors' "$runs"
to_bf16() {  # a file comes back under 16 MiB
    python3 -c "import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" "$1" "$2"
}
to_bf16 "$init/model.safetensors" "$out/model-init.safetensors"
while read -r name variant lr; do
    [ -f "$runs/$name/$variant/model.safetensors" ] && to_bf16 "$runs/$name/$variant/model.safetensors" "$out/model-$name.safetensors"
    echo "$name"; grep "^|" "$runs/$name/$variant.md" | tail -2; grep -A2 "^| model" "$runs/$name/passkey/summary.md" | tail -1
done <<< "$jobs"
