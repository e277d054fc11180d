#!/usr/bin/env bash
# Issue #26, second call (written 2026-12-07; run 2026-12-08 right after r1.sh, benchmarks/results/realtext.md
# section 2): the two-stage long-context fine-tuning of the real-text
# model, then pass keys hidden in held-out corpus text. INIT is r1's "hsa" model (its model.safetensors and
# config.json carried as runs/init-realtext/). Stages, each from the previous one's weights:
#   sft1  recipes/configs/realtext-sft1.yaml  passkey, niah_single_2, niah_multikey_1 in corpus haystacks,
#         1-2K tokens, retrieval loss W = 1
#   sft2  recipes/configs/realtext-sft2.yaml  the same tasks at 256-4096 tokens
# then benchmarks.passkey with --haystack text:data/debian-corpus/validation.jsonl at LENGTHS (default 4k,64k,1m;
# 4 prompts at each of five depths, prompt seed 2) and the loss by position of the fine-tuned model beside
# INIT's (does fine-tuning on needles cost the language model?). MINUTES_sft1, MINUTES_sft2 (whole minutes,
# default 2): each stage's training time (train.max_minutes). On the device right after r1.sh (the machine still
# warm, so runs/r1 is still there): INIT=runs/r1/hsa-model.
# From the repository root on the device machine (carry .wheels/slim.tar.xz, data/corpus-xz, runs/init-realtext):
#   bash benchmarks/results/raw/realtext/r2.sh
# A dry run here: DEVICE=cpu INIT=<a tiny model> STEPS=2 LENGTHS=2k SAMPLES=1 MAXTOK=2k EXTRA="data.seq_len=1024
#   data.min_len=512 train.batch_size=2 data.eval_sequences=4 train.eval_every=1" bash ...r2.sh
# As run on 2026-12-08 the two configs had the loss on the answer only; they now have data.loss=all and
# train.answer_loss=1 (r3.sh): EXTRA="data.loss=answer train.answer_loss=0" repeats that run.
# Outputs under $OUT: each stage's metrics, the pass-key and perplexity tables, the fine-tuned weights (bf16).
set -u
out="${OUT:-out}"; mkdir -p "$out" runs/r2 data/debian-corpus
[ -n "${DEVICE:-}" ] || source benchmarks/device_setup.sh
dev=${DEVICE:+--device $DEVICE}
for split in train validation; do
    [ -f "data/debian-corpus/$split.jsonl" ] || xz -dc "data/corpus-xz/$split.jsonl.xz" > "data/debian-corpus/$split.jsonl"
done
init="${INIT:-runs/init-realtext}"; prev="$init"; start=$SECONDS
for stage in sft1 sft2; do
    minutes_var="MINUTES_$stage"; minutes=${!minutes_var:-2}; t0=$SECONDS
    timeout $((minutes * 60 + 120)) python3 recipes/sft.py --config "recipes/configs/realtext-$stage.yaml" \
        model.checkpoint="$prev" train.output_dir="runs/r2/$stage" train.max_minutes="$minutes" \
        ${STEPS:+train.steps=$STEPS} ${EXTRA:-} --overwrite \
        > "runs/r2/$stage.log" 2>&1
    python3 recipes/export.py "runs/r2/$stage" "runs/r2/$stage-model" --dtype bfloat16 > /dev/null 2>&1 \
        || { echo "$stage: no checkpoint"; tail -5 "runs/r2/$stage.log"; exit 1; }
    echo "$stage: $((SECONDS - t0)) s"
    grep -h "eval_answer_accuracy" "runs/r2/$stage/metrics.jsonl" | tail -1 | cut -c1-400
    cp "runs/r2/$stage/metrics.jsonl" "$out/$stage-metrics.jsonl"
    prev="runs/r2/$stage-model"
done
cp "$prev/model.safetensors" "$out/model-sft.safetensors"; cp "$prev/config.json" "$out/config-sft.json"
hay="text:data/debian-corpus/validation.jsonl"
timeout 150 python3 -m benchmarks.passkey --checkpoint "sft=$prev" --haystack "$hay" --lengths "${LENGTHS:-4k,64k,1m}" \
    --samples "${SAMPLES:-4}" --seed 2 --segment 65536 $dev --out runs/r2/passkey 2>&1 | grep -A3 "^| model"
cp runs/r2/passkey/summary.md "$out/passkey-text.md" 2>/dev/null
timeout 100 python3 -m benchmarks.perplexity --checkpoints "pretrained=$init,sft=$prev" \
    --data data/debian-corpus/validation.jsonl --max-docs 2 --max-tokens "${MAXTOK:-1m}" --buckets 1k,4k,16k,64k,256k \
    --segment 65536 $dev --out "$out/perplexity-sft.md" 2>&1 | grep -E "^\||rror"
echo "total: $((SECONDS - start)) s"
