#!/usr/bin/env bash
# Issue #23, CPU (2026-12-08, 2 cores; no device machine was lent): the retrieval loss over every visible chunk
# (train.retrieval_loss_over=all) against s1_cpu.sh's w1, the loss over the 8 selected chunks. The same run
# otherwise: from benchmarks/models/swa-multikey, 400 steps of niah_multikey_2 prompts of 768-1024 tokens (12-16
# chunks of keyed needles), batch 8, lr 3e-4 decaying, W = 1. Then, on fresh prompts (seed 3): benchmarks.probe
# at 4K (20 prompts), RULER niah_multikey_2 at 1K and 4K (20 each), and the key probes of the new model and of
# w1 (does the landmark now hold the key?).
# From the repository root: bash benchmarks/results/raw/selective/s2_cpu.sh
#   (W1: s1_cpu.sh's w1 model, default runs/s1cpu/w1/final; RUNS: where the runs go; OUT: where the tables go)
set -u
runs="${RUNS:-runs/s2cpu}"; out="${OUT:-benchmarks/results/raw/selective/s2_cpu}"; mkdir -p "$runs" "$out"
w1="${W1:-runs/s1cpu/w1/final}"
python recipes/sft.py --config recipes/configs/generalization-stage3.yaml \
    model.checkpoint=benchmarks/models/swa-multikey data.seq_len=1024 data.min_len=768 train.batch_size=8 \
    train.lr=3e-4 train.retrieval_loss=1 train.retrieval_loss_over=all train.steps="${STEPS:-400}" \
    train.eval_every=100 train.save_every=100 data.eval_sequences=64 train.output_dir="$runs/a1" --overwrite \
    > "$runs/a1.log" 2>&1
cp "$runs/a1/metrics.jsonl" "$out/a1-metrics.jsonl"
python -m benchmarks.probe --checkpoint "$runs/a1/final" --task niah_multikey_2 --lengths 4k --samples 20 --seed 3 \
    --device cpu --out "$out/probe-a1.md" > /dev/null 2>&1
python -m benchmarks.ruler --checkpoint "a1=$runs/a1/final" --tasks niah_multikey_2 --lengths 1k,4k --samples 20 \
    --seed 3 --segment 4096 --device cpu --out "$runs/ruler-a1" > /dev/null 2>&1
cp "$runs/ruler-a1/summary.md" "$out/ruler-a1.md"
for m in a1="$runs/a1/final" w1="$w1"; do
    python -m benchmarks.key_probe --checkpoint "${m#*=}" --prompts 2000 --seed 3 --device cpu \
        --out "$out/key_probe-${m%%=*}.md" > /dev/null 2>&1
done
