#!/usr/bin/env bash
# Issue #22, the next GPU calls (written 2026-12-07, not yet run), after m9 (generalization.md section 6, item 15).
# From the repository root on the device machine (carry .wheels/kernels.tar.xz), one PART a call:
#   PART=64m SEED=103 DEPTHS=0,0.25 SAMPLES=4 bash benchmarks/results/raw/generalization/mamba2_2026-12-06/m10.sh
#       fresh pass keys of the shipped model at 64M (about 60-70 s a prompt on an H100, prompt construction
#       included: 8 a call; DEPTHS 0,0.25 / 0.5,0.75 / 1 with SAMPLES=4 give the 20 over three calls)
#   PART=pool SEED=104 bash ...m10.sh
#       60 more fresh prompts at 1M and 16M (about 3 and 9 s each), to pool 100 from 1M to 64M
#   PART=ablation bash ...m10.sh
#       the ablation of the fixes at 20 prompts a cell: m6's curriculum without the stagger (mamba2-reset-all)
#       from the same first stage (m9/reset-w1, kept in the repository), and the bounded model trained in one
#       stage from scratch with the retrieval loss (m9/stagger-w1, kept) evaluated beyond its 4K
# Outputs under $OUT: the benchmarks' summary.md and results.jsonl (a few files: the device returns a limited count).
set -u
out="${OUT:-out}"; here=benchmarks/results/raw/generalization/mamba2_2026-12-06; mkdir -p "$out"
source benchmarks/device_setup.sh
model=benchmarks/models/mamba2-passkey
keep() {  # name dir: the summary and per-prompt results of a benchmark folder
    cp "$2/summary.md" "$out/$1.md"; cp "$2/results.jsonl" "$out/$1.jsonl"
}
case "${PART:?PART=64m, pool or ablation}" in
64m)
    timeout 560 python3 -m benchmarks.passkey --checkpoint m9=$model --lengths 64m --depths "${DEPTHS:-0,0.25}" \
        --samples "${SAMPLES:-4}" --seed "${SEED:-103}" --segment 65536 --out /tmp/pk64 2>&1 | grep -E "^\||rror"
    keep "passkey_64m_seed${SEED:-103}_${DEPTHS:-0,0.25}" /tmp/pk64 ;;
pool)
    for length in 1m 16m; do
        n=$([ $length = 1m ] && echo 8 || echo 4)  # x 5 depths: 40 at 1M, 20 at 16M
        timeout 280 python3 -m benchmarks.passkey --checkpoint m9=$model --lengths $length --samples $n \
            --seed "${SEED:-104}" --segment 65536 --out /tmp/pk_$length 2>&1 | grep -E "^\||rror"
        keep "passkey_${length}_seed${SEED:-104}" /tmp/pk_$length
    done ;;
ablation)
    timeout 400 python3 -m benchmarks.ablations --variants mamba2-reset-all --steps 3000 --lr 1e-4 --min-lr-ratio 0.1 \
        --lengths 4k,64k,1m --depths 0,0.25,0.5,0.75,1 --samples 4 --length 640 --min-length 160 --batch-size 32 \
        --eval-every 300 --segment 65536 --init $here/m9/reset-w1 --out /tmp/abl > /tmp/abl.log 2>&1 &
    timeout 400 python3 -m benchmarks.passkey --checkpoint one-stage=$here/m9/stagger-w1 --lengths 64k,1m --samples 4 \
        --seed 101 --segment 65536 --out /tmp/one 2>&1 | grep -E "^\||rror"
    wait
    tail -3 /tmp/abl/mamba2-reset-all.md; grep -A2 "^| model" /tmp/abl/passkey/summary.md
    cp /tmp/abl/mamba2-reset-all.md "$out/reset-all-from-w1.md"; keep reset-all-from-w1-passkey /tmp/abl/passkey
    keep one-stage-passkey /tmp/one ;;
esac
