#!/usr/bin/env bash
# Issue #23, a CPU version of s1.sh (2026-12-07, 2 cores): does the auxiliary retrieval loss make the selection of
# the shipped multi-key SWA model (benchmarks/models/swa-multikey) content-selective? Two runs, one after the
# other, 400 steps each (about 22 minutes each here): niah_multikey_2 prompts of 768-1024 tokens (12-16 chunks
# of keyed needles, more than the 8 a token reads), batch 8, lr 3e-4 decaying; "w1" with train.retrieval_loss=1,
# "w0" the control without it. The training metrics log the held-out answers and the retrieval weight on the
# asked fact's chunks; then each model and the starting one are measured on fresh prompts (seed 3, which played
# no part in any choice): benchmarks.probe at 4K (20 prompts, 64 chunks) and RULER niah_multikey_2 at 1K and 4K.
# From the repository root: bash benchmarks/results/raw/selective/s1_cpu.sh  (OUT: where the tables go)
set -u
out="${OUT:-benchmarks/results/raw/selective/s1_cpu}"; mkdir -p "$out" runs/s1cpu
for w in ${RUNS:-1 0}; do
    python recipes/sft.py --config recipes/configs/generalization-stage3.yaml \
        model.checkpoint=benchmarks/models/swa-multikey data.seq_len=1024 data.min_len=768 train.batch_size=8 \
        train.lr=3e-4 train.retrieval_loss=$w train.steps="${STEPS:-400}" train.eval_every=100 train.save_every=100 \
        data.eval_sequences=64 train.output_dir="runs/s1cpu/w$w" > "runs/s1cpu/w$w.log" 2>&1
    cp "runs/s1cpu/w$w/metrics.jsonl" "$out/w$w-metrics.jsonl"
done
# w1b: w1 continued for 600 more steps with the loss (a fresh schedule and data seed 1), after the two runs
python recipes/sft.py --config recipes/configs/generalization-stage3.yaml model.checkpoint=runs/s1cpu/w1/final \
    data.seq_len=1024 data.min_len=768 train.batch_size=8 train.lr=3e-4 train.retrieval_loss=1 train.steps=600 \
    train.eval_every=100 train.save_every=100 data.eval_sequences=64 train.seed=1 train.output_dir=runs/s1cpu/w1b \
    > runs/s1cpu/w1b.log 2>&1
cp runs/s1cpu/w1b/metrics.jsonl "$out/w1b-metrics.jsonl"
for m in base=benchmarks/models/swa-multikey w1=runs/s1cpu/w1/final w0=runs/s1cpu/w0/final w1b=runs/s1cpu/w1b/final; do
    name=${m%%=*}
    python -m benchmarks.probe --checkpoint "${m#*=}" --task niah_multikey_2 --lengths 4k --samples 20 --seed 3 \
        --device cpu --out "$out/probe-$name.md" > /dev/null 2>&1
    python -m benchmarks.ruler --checkpoint "$m" --tasks niah_multikey_2 --lengths 1k,4k --samples 20 --seed 3 \
        --segment 4096 --device cpu --out "runs/s1cpu/ruler-$name" > /dev/null 2>&1
    cp "runs/s1cpu/ruler-$name/summary.md" "$out/ruler-$name.md"
done
