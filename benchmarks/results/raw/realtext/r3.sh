#!/usr/bin/env bash
# Issue #26, third round (written 2026-12-08): the three small models pre-trained on the Debian corpus at 4K for
# the same number of steps (train.steps=STEPS, default 2000: the same tokens, the same step-based schedule),
# side by side on one GPU, across several calls on one warm machine:
#   PART=pretrain  trains each run not yet finished for at most LIMIT seconds (default 480), from scratch or
#                  from its newest checkpoint (saved every 100 steps); call again (right away, so that runs/r3
#                  is still there) until every run has its final model. FINISH=1 then exports each run (its
#                  final model, or its newest checkpoint when it did not finish) and measures the held-out loss
#                  by position: hsa and mixer to MAXTOK (default 1m), dense to DENSE_MAXTOK (default 128k).
#   PART=sft       fine-tunes the hsa model with r2.sh (realtext-sft1.yaml then -sft2.yaml: the loss on every
#                  token plus train.answer_loss=1, so that the text is not unlearned), MINUTES_sft1 and
#                  MINUTES_sft2 minutes, then pass keys in held-out corpus text and the loss by position.
# The runs (see r1.sh): hsa (the config as it is), mixer (use_hsa=false), dense (use_hsa=false, window 65536).
# From the repository root on the device machine (carry .wheels/slim.tar.xz and data/corpus-xz):
#   PART=pretrain LIMIT=480 bash benchmarks/results/raw/realtext/r3.sh
#   PART=pretrain LIMIT=330 FINISH=1 bash benchmarks/results/raw/realtext/r3.sh
#   PART=sft MINUTES_sft1=3 MINUTES_sft2=2 bash benchmarks/results/raw/realtext/r3.sh
# A dry run here: DEVICE=cpu STEPS=4 LIMIT=200 FINISH=1 MAXTOK=2k DENSE_MAXTOK=2k EXTRA="data.seq_len=256
#   train.batch_size=1 model.preset=tiny train.eval_every=2 train.save_every=2" PART=pretrain bash ...r3.sh
# Outputs: $OUT/PART.tgz (the device returns at most 8 files): the runs' metrics, the loss-by-position tables and
# plots, and for sft r2.sh's outputs less the fine-tuned weights.
set -u
part="${PART:-pretrain}"; out="runs/r3/out-$part"; rm -rf "$out"; mkdir -p "$out" "${OUT:-out}" data/debian-corpus
bundle() { tar czf "${OUT:-out}/$part.tgz" --exclude '*.safetensors' -C "$out" .; }
trap bundle EXIT
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
dev=${DEVICE:+--device $DEVICE}
for split in train validation; do
    [ -f "data/debian-corpus/$split.jsonl" ] || xz -dc "data/corpus-xz/$split.jsonl.xz" > "data/debian-corpus/$split.jsonl"
done
start=$SECONDS
runs="${RUNS:-hsa mixer dense}"
if [ "$part" = sft ]; then
    OUT="$out" INIT=runs/r3/hsa-model EXTRA="${SFT_EXTRA:-}" bash benchmarks/results/raw/realtext/r2.sh
    exit
fi
train() {  # name overrides
    [ -d "runs/r3/$1/final" ] && return
    local how=--overwrite
    ls -d runs/r3/"$1"/checkpoints/checkpoint-* > /dev/null 2>&1 && how=--resume
    timeout "${LIMIT:-480}" python3 recipes/pretrain.py --config recipes/configs/realtext-small.yaml \
        train.output_dir="runs/r3/$1" train.steps="${STEPS:-2000}" train.save_every=100 $2 ${EXTRA:-} $how \
        >> "runs/r3/$1.log" 2>&1
}
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
for name in $runs; do
    [ -f "runs/r3/$name/metrics.jsonl" ] || { echo "$name: no metrics"; tail -5 "runs/r3/$name.log"; continue; }
    cp "runs/r3/$name/metrics.jsonl" "$out/$name-metrics.jsonl"
    echo "$name: $(ls -d runs/r3/$name/final 2>/dev/null || ls -d runs/r3/$name/checkpoints/checkpoint-* 2>/dev/null | tail -1)"
    grep -h '"eval_loss"' "runs/r3/$name/metrics.jsonl" | tail -1 | cut -c1-200
done
[ -n "${FINISH:-}" ] || exit 0
long=""; short=""
for name in $runs; do
    python3 recipes/export.py "runs/r3/$name" "runs/r3/$name-model" --dtype bfloat16 > /dev/null 2>&1 \
        || { echo "$name: no checkpoint"; continue; }
    if [ "$name" = dense ]; then short="dense=runs/r3/dense-model"; else long="${long:+$long,}$name=runs/r3/$name-model"; fi
done
perplexity() {  # checkpoints max-tokens buckets name
    timeout 150 python3 -m benchmarks.perplexity --checkpoints "$1" --data data/debian-corpus/validation.jsonl \
        --max-docs 2 --max-tokens "$2" --buckets "$3" --segment 65536 $dev \
        --out "$out/perplexity-$4.md" --plot "$out/perplexity-$4.png" 2>&1 | grep -E "^\||rror"
}
[ -n "$long" ] && perplexity "$long" "${MAXTOK:-1m}" 1k,4k,16k,64k,256k,1m long
[ -n "$short" ] && perplexity "$short" "${DENSE_MAXTOK:-128k}" 1k,4k,16k,64k dense
echo "total: $((SECONDS - start)) s"
