#!/usr/bin/env bash
# Issue #22, the next GPU call (written 2026-12-06, not yet run). m7 and m8 showed that the curriculum to
# bounded Mamba2 states works only from a first stage that reads the memory, which a run may or may not learn.
# Here the first stage gets the auxiliary retrieval loss (benchmarks.learnability --retrieval-loss W: minus the
# log of the retrieval weight on the needle's chunks at the answer's positions), at two weights beside the
# control, and every table now has the column "weight on the needle" (the check that a first stage reads the
# memory: above 0.5). Beside them, the bounded model from scratch with the loss (does it then learn to read?).
# The second stage (m6's curriculum, staggered) starts from the first-stage run with the highest final weight on
# the needle among those with keys right >= 0.9 (chosen on the training table, not on any benchmark prompt).
# From the repository root (STEPS1, STEPS2, LENGTHS and DEVICE shrink it for a CPU dry run):
#   RUN=m9 bash benchmarks/results/raw/generalization/mamba2_2026-12-06/m9.sh
# Outputs: $OUT/$RUN.tar.gz, $OUT/model-*.safetensors (bf16: every first stage, and the second stage).
# STAGE2=0 runs the first stage only; STAGE1=0 then runs the second from it (on the same, still warm machine).
set -u
run="${RUN:-m9}"; out="${OUT:-out}"; runs=runs/$run; mkdir -p "$runs" "$out"
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
start=$SECONDS
dev=${DEVICE:+--device $DEVICE}
common=(--length 640 --min-length 160 --batch-size 32 --eval-every 300 --depths 0,0.25,0.5,0.75,1 --samples 4
        --segment 65536 $dev)
stage() {  # name variant steps lr min-lr-ratio W lengths [init]
    local init=(); [ -n "${8:-}" ] && init=(--init "$8")
    timeout "${LIMIT:-86400}" python3 -m benchmarks.ablations --variants "$2" --steps "$3" --lr "$4" --min-lr-ratio "$5" --retrieval-loss "$6" \
        --lengths "$7" "${init[@]}" "${common[@]}" --out "$runs/$1" > "$runs/$1.log" 2>&1
}
if [ "${STAGE1:-1}" = 1 ]; then  # STAGE1=0: the first stage ran in an earlier call on this machine (runs/$RUN kept)
    stage reset-w0 mamba2-reset "${STEPS1:-1800}" 1e-3 1 0 4k &
    stage reset-w0.1 mamba2-reset "${STEPS1:-1800}" 1e-3 1 0.1 4k &
    stage reset-w1 mamba2-reset "${STEPS1:-1800}" 1e-3 1 1 4k &
    stage stagger-w1 mamba2-reset-all-stagger "${STEPS1:-1800}" 1e-3 1 1 4k &
    wait
    echo "first stage: $((SECONDS - start)) s"
fi
best=$(for name in reset-w0 reset-w0.1 reset-w1; do
    tail -1 "$runs/$name/mamba2-reset.md" | awk -F'|' -v n="$name" '$6 + 0 >= 0.9 {print $7 + 0, n}'
done | sort -rn | head -1 | cut -d' ' -f2)
echo "second stage from: ${best:-none}"
stage2=${STAGE2:-1}  # STAGE2=0: the first stage only (its weights come back, the curriculum runs in a later call)
if [ -n "$best" ] && [ "$stage2" = 1 ]; then  # stopped in time to pack what it has within the call's limit (BUDGET_S from the start)
    LIMIT=$(( ${BUDGET_S:-540} - SECONDS )) stage "$best-stagger" mamba2-reset-all-stagger "${STEPS2:-3000}" 1e-4 0.1 0 "${LENGTHS:-4k,64k,1m}" \
        "$runs/$best/mamba2-reset"
    echo "second stage: $((SECONDS - start)) s"
fi
tar czf "$out/$run.tar.gz" --exclude='*.safetensors' "$runs"
to_bf16() {  # a file comes back under 16 MiB
    python3 -c "import sys, torch; from safetensors.torch import load_file, save_file
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])" "$1" "$2"
}
names="reset-w0 reset-w0.1 reset-w1 stagger-w1"
[ -n "$best" ] && [ "$stage2" = 1 ] && names="$names $best-stagger"
for name in $names; do
    md=$(ls "$runs/$name"/mamba2-*.md | head -1); echo "$name"; grep "^|" "$md" | tail -2
    grep -A2 "^| model" "$runs/$name/passkey/summary.md" | tail -1
done
for name in reset-w0 reset-w0.1 reset-w1; do  # every first stage: the one to continue is chosen on its table
    [ -f "$runs/$name/mamba2-reset/model.safetensors" ] && to_bf16 "$runs/$name/mamba2-reset/model.safetensors" "$out/model-$name.safetensors"
done
[ -f "$runs/stagger-w1/mamba2-reset-all-stagger/model.safetensors" ] \
    && to_bf16 "$runs/stagger-w1/mamba2-reset-all-stagger/model.safetensors" "$out/model-stagger-w1.safetensors"
[ -n "$best" ] && [ "$stage2" = 1 ] \
    && to_bf16 "$runs/$best-stagger/mamba2-reset-all-stagger/model.safetensors" "$out/model-$best-stagger.safetensors"
true
