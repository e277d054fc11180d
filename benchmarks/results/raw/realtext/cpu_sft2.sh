#!/usr/bin/env bash
# Issue #26, after cpu_sft.sh (2026-12-08, 2 cores): does copying come with more steps? The "all" arm of
# cpu_sft.sh (the loss on every token plus the answer loss) continued for STEPS (default 200) more steps on pass
# keys alone, 512-1,024 tokens of corpus text, lr 1e-3 with a fresh schedule; then pass keys in held-out corpus
# text (prompt seed 2, 20 a length) and the loss by position beside the pre-trained model.
# As run on 2026-12-08 it was stopped at step 159 (to free the CPU), after the evaluations of steps 50-150 and
# before the pass keys and the perplexity below: realtext.md, section 3.
# From the repository root, after cpu_sft.sh: bash benchmarks/results/raw/realtext/cpu_sft2.sh  (RUNS, OUT as there)
set -u
runs="${RUNS:-runs/cpu26}"; out="${OUT:-benchmarks/results/raw/realtext/cpu_sft}"; mkdir -p "$out"
python recipes/sft.py --config recipes/configs/realtext-sft1.yaml model.checkpoint="$runs/all/final" \
    data.tasks=[passkey] data.seq_len=1024 data.min_len=512 train.batch_size=8 train.lr=1e-3 train.warmup=20 \
    train.steps="${STEPS:-200}" train.eval_every=50 train.save_every=50 data.eval_sequences=32 \
    train.mixed_precision=no train.output_dir="$runs/all2" --overwrite > "$runs/all2.log" 2>&1
cp "$runs/all2/metrics.jsonl" "$out/all2-metrics.jsonl"
python -m benchmarks.passkey --checkpoint "all2=$runs/all2/final" --haystack text:data/debian-corpus/validation.jsonl \
    --lengths 1k,2k --samples 4 --seed 2 --segment 4096 --device cpu --out "$runs/passkey2" > /dev/null 2>&1
cp "$runs/passkey2/summary.md" "$out/passkey-text-all2.md"
python -m benchmarks.perplexity --checkpoints "pre=$runs/pre/final,all2=$runs/all2/final" \
    --data data/debian-corpus/validation.jsonl --max-docs 2 --max-tokens 16k --buckets 1k,4k,16k --segment 4096 \
    --device cpu --out "$out/perplexity-all2.md" > /dev/null 2>&1
