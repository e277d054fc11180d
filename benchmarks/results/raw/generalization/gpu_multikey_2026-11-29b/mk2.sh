# Four variants with the loss on every token, side by side on one GPU; then RULER multi-key at 4K on each.
source benchmarks/device_setup.sh >/dev/null 2>&1
export OMP_NUM_THREADS=4
TRAIN_S=${TRAIN_S:-450}
S3="--config recipes/configs/generalization-stage2.yaml model.checkpoint=benchmarks/results/generalization/model-swa data.seq_len=768 data.min_len=256 data.tasks=[niah_multikey_1,niah_multikey_1,niah_multikey_1,passkey] data.loss=all"
declare -A V=(
  [all]="$S3 train.lr=5e-4"
  [all_obo]="$S3 train.lr=5e-4 model.overrides.softmax_off_by_one=true"
  [all_lr1e-3]="$S3 train.lr=1e-3"
  [fresh_all]="--config recipes/configs/generalization-stage1.yaml data.loss=all train.lr=1e-3 train.warmup=100 data.tasks=[passkey,niah_single_1,niah_multikey_1,niah_multikey_1]"
)
echo "=== train $(date +%T)"
for name in "${!V[@]}"; do
  timeout $TRAIN_S python recipes/sft.py ${V[$name]} \
    data.eval_sequences=128 train.steps=${STEPS:-3000} train.batch_size=64 train.eval_every=200 \
    train.save_every=200 train.output_dir=runs/mk/$name > runs-$name.log 2>&1 &
done
wait
echo "=== export $(date +%T)"
mkdir -p $OUT/logs
for name in "${!V[@]}"; do
  python recipes/export.py runs/mk/$name models/$name --dtype bfloat16 2>&1 | tail -1
  cp runs/mk/$name/metrics.jsonl $OUT/logs/$name-metrics.jsonl; tr '\r' '\n' < runs-$name.log | grep -v "it/s\]" | tail -30 > $OUT/logs/$name.log
  grep eval_answer $OUT/logs/$name-metrics.jsonl | tail -3 | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print('$name', r['step'], {k[20:]: round(v, 3) for k, v in r.items() if k.startswith('eval_answer')})"
done
echo "=== ruler 4k $(date +%T)"
for name in "${!V[@]}"; do
  timeout 60 python -m benchmarks.ruler --checkpoint $name=models/$name --lengths 4k --tasks niah_multikey_1 \
    --samples 4 --depths 0,0.25,0.5,0.75,1 --seed 1 --out runs/ruler-$name > /dev/null 2>&1 &
done
wait
for name in "${!V[@]}"; do grep -A3 "niah_multikey" runs/ruler-$name/summary.md | head -4; cp runs/ruler-$name/summary.md $OUT/logs/ruler4k-$name.md; done
for name in "${!V[@]}"; do tar cf $OUT/model-$name.tar models/$name; done
tar czf $OUT/logs.tar.gz -C $OUT logs && rm -r $OUT/logs
echo "=== done $(date +%T)"
