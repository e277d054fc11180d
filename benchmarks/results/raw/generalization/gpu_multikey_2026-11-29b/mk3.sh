# Fresh models, stage 1 then a multi-key stage 3, side by side on one GPU: mean-pooled landmarks without an
# encoder layer against the CLS landmark; then RULER multi-key at 4K on each.
source benchmarks/device_setup.sh >/dev/null 2>&1
export OMP_NUM_THREADS=4
S1_S=${S1_S:-220}; S3_S=${S3_S:-230}
declare -A V=(
  [cls]=""
  [mean0]="model.overrides.landmark=mean model.overrides.encoder_layers=0"
  [mean0_seed1]="model.overrides.landmark=mean model.overrides.encoder_layers=0 train.seed=1"
  [mean0_mk]="model.overrides.landmark=mean model.overrides.encoder_layers=0 data.tasks=[passkey,niah_single_1,niah_multikey_1,niah_multikey_1]"
)
one() {
  local name=$1
  timeout $S1_S python recipes/sft.py --config recipes/configs/generalization-stage1.yaml ${V[$name]} \
    data.eval_sequences=128 train.eval_every=100 train.save_every=100 train.output_dir=runs/s1/$name > s1-$name.log 2>&1
  python recipes/export.py runs/s1/$name models/$name-s1 --dtype bfloat16 > /dev/null 2>&1
  timeout $S3_S python recipes/sft.py --config recipes/configs/generalization-stage2.yaml model.checkpoint=models/$name-s1 \
    data.seq_len=768 data.min_len=256 "data.tasks=[niah_multikey_1,niah_multikey_1,niah_multikey_1,passkey]" \
    data.eval_sequences=128 train.steps=3000 train.batch_size=64 train.lr=5e-4 train.eval_every=100 \
    train.save_every=100 train.output_dir=runs/s3/$name > s3-$name.log 2>&1
  python recipes/export.py runs/s3/$name models/$name --dtype bfloat16 > /dev/null 2>&1
}
echo "=== train $(date +%T)"
for name in "${!V[@]}"; do one $name & done
wait
echo "=== ruler 4k $(date +%T)"
mkdir -p $OUT/logs
for name in "${!V[@]}"; do
  timeout 60 python -m benchmarks.ruler --checkpoint $name=models/$name --lengths 4k --tasks niah_multikey_1 \
    --samples 4 --depths 0,0.25,0.5,0.75,1 --seed 1 --out runs/ruler-$name > /dev/null 2>&1 &
done
wait
for name in "${!V[@]}"; do
  for s in s1 s3; do
    cp runs/$s/$name/metrics.jsonl $OUT/logs/$s-$name-metrics.jsonl
    grep eval_answer $OUT/logs/$s-$name-metrics.jsonl | tail -2 | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print('$s $name', r['step'], {k[21:]: round(v, 3) for k, v in r.items() if k.startswith('eval_answer')})"
  done
  grep "| niah_multikey" runs/ruler-$name/summary.md | head -1; cp runs/ruler-$name/summary.md $OUT/logs/ruler4k-$name.md
done
for name in "${!V[@]}"; do tar cf $OUT/model-$name.tar models/$name; done
tar czf $OUT/logs.tar.gz -C $OUT logs && rm -r $OUT/logs
echo "=== done $(date +%T)"
