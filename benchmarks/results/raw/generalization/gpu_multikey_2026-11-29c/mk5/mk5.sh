# Continue the two distractor-needle stage-3 models of mk4.sh (exported in bf16, fresh optimizer, the schedule
# run to its end), four ways side by side; RULER multi-key at 4K on each, then at 64K and 1M on the best two.
source benchmarks/device_setup.sh >/dev/null 2>&1
export OMP_NUM_THREADS=4
TRAIN_S=${TRAIN_S:-320}
M=scratch/mk4/out/models
MIX="data.tasks=[niah_multikey_2,niah_multikey_2,niah_multikey_1,passkey]"
S3="--config recipes/configs/generalization-stage2.yaml data.seq_len=768 data.min_len=256 data.eval_sequences=128
    train.batch_size=64 train.lr=5e-4 train.eval_every=200 train.save_every=200"
declare -A V=(
  [mk2_c]="model.checkpoint=$M/mk2 $MIX train.steps=1500"
  [only_mix]="model.checkpoint=$M/mk2_only $MIX train.steps=1500"
  [only_c]="model.checkpoint=$M/mk2_only data.tasks=[niah_multikey_2] data.seq_len=512 train.steps=2500"
  [mk2_long]="model.checkpoint=$M/mk2 data.tasks=[niah_multikey_2,niah_multikey_2,niah_multikey_1,niah_multikey_1,passkey,niah_single_2] data.seq_len=2048 train.batch_size=32 train.steps=1500"
)
echo "=== train $(date +%T)"
for name in "${!V[@]}"; do
  ( timeout $TRAIN_S python recipes/sft.py $S3 ${V[$name]} train.output_dir=runs/mk/$name > runs-$name.log 2>&1
    python recipes/export.py runs/mk/$name models/$name --dtype bfloat16 2>&1 | tail -1 ) &
done
wait
echo "=== ruler 4k $(date +%T)"
mkdir -p $OUT/logs
for name in "${!V[@]}"; do
  cp runs/mk/$name/metrics.jsonl $OUT/logs/$name-metrics.jsonl
  grep eval_answer $OUT/logs/$name-metrics.jsonl | tail -2 | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print('$name', r['step'], {k[21:]: round(v, 3) for k, v in r.items() if k.startswith('eval_answer')})"
  timeout 60 python -m benchmarks.ruler --checkpoint $name=models/$name --lengths 4k --tasks niah_multikey_1 \
    --samples 4 --depths 0,0.25,0.5,0.75,1 --seed 1 --out runs/ruler-$name > /dev/null 2>&1 &
done
wait
for name in "${!V[@]}"; do grep "| $name | niah_multikey_1" runs/ruler-$name/summary.md; cp runs/ruler-$name/summary.md $OUT/logs/ruler4k-$name.md; done
BEST=$(for name in "${!V[@]}"; do grep "| $name | niah_multikey_1" runs/ruler-$name/summary.md; done | sort -t'|' -k4 -g -r | head -2 | cut -d'|' -f2)
echo "=== ruler 64k, 1m on" $BEST "$(date +%T)"
for name in $BEST; do
  timeout ${LONG_S:-150} python -m benchmarks.ruler --checkpoint $name=models/$name --lengths 64k,1m --tasks niah_multikey_1 \
    --samples 2 --depths 0,0.25,0.5,0.75,1 --seed 1 --segment 65536 --out runs/long-$name > runs/long-$name.log 2>&1 &
done
wait
for name in $BEST; do
  head -12 runs/long-$name/summary.md; tail -3 runs/long-$name.log
  mkdir -p $OUT/logs/long-$name; cp runs/long-$name/*.md runs/long-$name/*.jsonl $OUT/logs/long-$name/ 2>/dev/null
done
for name in "${!V[@]}"; do tar cf $OUT/model-$name.tar models/$name; done
tar czf $OUT/logs.tar.gz -C $OUT logs && rm -r $OUT/logs
echo "=== done $(date +%T)"
