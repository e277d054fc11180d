#!/usr/bin/env bash
# Issue #26, first call (written 2026-12-07): the small model of each kind pre-trained side by side on the Debian
# corpus at 4K (recipes/configs/realtext-small.yaml, byte tokens), each for MINUTES of training (train.max_minutes:
# the run ends, its learning-rate schedule decayed, at that wall time):
#   hsa    the config as it is (the SWA hybrid: window 512, HSA every third block)
#   mixer  use_hsa=false: the mixer-only baseline on the same tokens
#   dense  use_hsa=false, window=65536: full causal attention up to 64K tokens (a dense transformer of the same
#          width and depth; at the 4K training length its window is never reached)
# then held-out loss by context position on the two longest validation documents (FOLDOC, 5.6M tokens; the
# Jargon File, 1.6M) through the cache: hsa and mixer to MAXTOK tokens (default 4m), dense to DENSE_MAXTOK
# (default 128k: its cost grows with the square of the length up to its window).
# Here first (the corpus is 26 MB: only its xz form fits the device's carry beside the repository):
#   python recipes/data/debian_corpus.py --out data/debian-corpus
#   mkdir -p data/corpus-xz && xz -9 -T2 -c data/debian-corpus/train.jsonl > data/corpus-xz/train.jsonl.xz \
#       && xz -9 -T2 -c data/debian-corpus/validation.jsonl > data/corpus-xz/validation.jsonl.xz
# Then from the repository root on the device machine (carry .wheels/slim.tar.xz and data/corpus-xz):
#   bash benchmarks/results/raw/realtext/r1.sh
# MINUTES (default 5), RUNS (subset of "hsa mixer dense"), STEPS; a dry run here:
#   DEVICE=cpu STEPS=2 MAXTOK=2k DENSE_MAXTOK=2k EXTRA="data.seq_len=256 train.batch_size=1 model.preset=tiny train.eval_every=1
#   train.save_every=1" bash benchmarks/results/raw/realtext/r1.sh
# Outputs under $OUT: each run's metrics, the perplexity tables and plots (perplexity-4m.*, perplexity-dense.*).
# First try (2026-12-07, `LIMIT=175 MAXTOK=1m`): every run stopped at once, as local .jsonl corpora were then
# read through `datasets`, which the device does not have; they are now read without it.
# Run 2026-12-08 on an H100 as `MINUTES=5 MAXTOK=1m bash ...r1.sh`: benchmarks/results/realtext.md, section 1.
set -u
out="${OUT:-out}"; mkdir -p "$out" runs/r1 data/debian-corpus
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
dev=${DEVICE:+--device $DEVICE}
for split in train validation; do
    [ -f "data/debian-corpus/$split.jsonl" ] || xz -dc "data/corpus-xz/$split.jsonl.xz" > "data/debian-corpus/$split.jsonl"
done
start=$SECONDS
train() {  # name overrides
    timeout $((${MINUTES:-5} * 60 + 120)) python3 recipes/pretrain.py --config recipes/configs/realtext-small.yaml \
        train.output_dir="runs/r1/$1" train.max_minutes="${MINUTES:-5}" ${STEPS:+train.steps=$STEPS} $2 ${EXTRA:-} \
        > "runs/r1/$1.log" 2>&1
    python3 recipes/export.py "runs/r1/$1" "runs/r1/$1-model" --dtype bfloat16 > /dev/null 2>&1 \
        || { echo "$1: no checkpoint"; tail -5 "runs/r1/$1.log"; }
}
runs="${RUNS:-hsa mixer dense}"
for name in $runs; do
    case $name in
    hsa) extra="" ;;
    mixer) extra="model.overrides.use_hsa=false" ;;
    dense) extra="model.overrides.use_hsa=false model.overrides.window=65536" ;;
    *) echo "unknown run $name"; exit 2 ;;
    esac
    train "$name" "$extra" &
done
wait
echo "training: $((SECONDS - start)) s"
long=""; short=""
for name in $runs; do
    [ -f "runs/r1/$name-model/model.safetensors" ] || continue
    grep -h '"eval_loss"' "runs/r1/$name/metrics.jsonl" | tail -1 | cut -c1-300
    cp "runs/r1/$name/metrics.jsonl" "$out/$name-metrics.jsonl"
    if [ "$name" = dense ]; then short="dense=runs/r1/dense-model"; else long="${long:+$long,}$name=runs/r1/$name-model"; fi
done
perplexity() {  # checkpoints max-tokens buckets name
    timeout 120 python3 -m benchmarks.perplexity --checkpoints "$1" --data data/debian-corpus/validation.jsonl \
        --max-docs 2 --max-tokens "$2" --buckets "$3" --segment 65536 $dev \
        --out "$out/perplexity-$4.md" --plot "$out/perplexity-$4.png" 2>&1 | grep -E "^\||rror"
}
[ -n "$long" ] && perplexity "$long" "${MAXTOK:-4m}" 1k,4k,16k,64k,256k,1m 4m
[ -n "$short" ] && perplexity "$short" "${DENSE_MAXTOK:-128k}" 1k,4k,16k,64k dense
echo "total: $((SECONDS - start)) s"
