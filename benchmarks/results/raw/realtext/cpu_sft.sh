#!/usr/bin/env bash
# Issue #26, a CPU check of the fine-tuning recipe (2026-12-08, 2 cores; no device machine was lent): does the
# loss on every token plus the answer's own loss (data.loss=all, train.answer_loss=1) keep the language model
# that the loss on the answer alone unlearned (realtext.md, section 2)? A tiny SWA hybrid pre-trained on the
# Debian corpus for 14 minutes (window 128, 1K tokens), then realtext-sft1.yaml at 512-1024 tokens from it,
# two arms side by side for the same steps:
#   answer  data.loss=answer train.answer_loss=0  (the recipe as run on the GPU)
#   all     data.loss=all train.answer_loss=1     (the recipe now)
# then the held-out loss by position of the three models and pass keys in held-out corpus text (prompt seed 2).
# From the repository root (the corpus built by recipes/data/debian_corpus.py into data/debian-corpus):
#   bash benchmarks/results/raw/realtext/cpu_sft.sh      (RUNS: where the runs go; OUT: where the tables go)
set -u
runs="${RUNS:-runs/cpu26}"; out="${OUT:-benchmarks/results/raw/realtext/cpu_sft}"; mkdir -p "$runs" "$out"
[ -d "$runs/pre/final" ] || python recipes/pretrain.py --config recipes/configs/realtext-small.yaml \
    model.preset=tiny data.seq_len=1024 train.batch_size=8 train.lr=1.5e-3 train.warmup=30 train.steps=100000 \
    train.max_minutes=14 train.eval_every=50 train.save_every=50 data.eval_sequences=16 train.mixed_precision=no \
    train.output_dir="$runs/pre" > "$runs/pre.log" 2>&1
cp "$runs/pre/metrics.jsonl" "$out/pre-metrics.jsonl"
sft() {  # name overrides
    python recipes/sft.py --config recipes/configs/realtext-sft1.yaml model.checkpoint="$runs/pre/final" \
        data.seq_len=1024 data.min_len=512 train.batch_size=8 train.lr=1e-3 train.warmup=20 train.steps="${STEPS:-120}" \
        train.eval_every=40 train.save_every=40 data.eval_sequences=32 train.mixed_precision=no \
        train.output_dir="$runs/$1" $2 --overwrite > "$runs/$1.log" 2>&1
    cp "$runs/$1/metrics.jsonl" "$out/$1-metrics.jsonl"
}
sft answer "data.loss=answer train.answer_loss=0" &
sft all "data.loss=all train.answer_loss=1" &
wait
python -m benchmarks.perplexity --checkpoints "pre=$runs/pre/final,answer=$runs/answer/final,all=$runs/all/final" \
    --data data/debian-corpus/validation.jsonl --max-docs 2 --max-tokens 16k --buckets 1k,4k,16k --segment 4096 \
    --device cpu --out "$out/perplexity.md" > /dev/null 2>&1
python -m benchmarks.passkey --checkpoint "answer=$runs/answer/final" --checkpoint "all=$runs/all/final" \
    --haystack text:data/debian-corpus/validation.jsonl --lengths 1k,2k --samples 4 --seed 2 --segment 4096 \
    --device cpu --out "$runs/passkey" > /dev/null 2>&1
cp "$runs/passkey/summary.md" "$out/passkey-text.md"
