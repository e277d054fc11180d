# Multi-key stage 3 on distractor-needle haystacks (niah_multikey_2: every line is a keyed needle, so only the
# key tells the asked one apart), side by side on one GPU: three from the shipped model, one fresh (stage 1 with
# niah_multikey_2 in place of niah_multikey_1, then stage 3); then RULER multi-key at 4K on each.
source benchmarks/device_setup.sh >/dev/null 2>&1
export OMP_NUM_THREADS=4
TRAIN_S=${TRAIN_S:-420}; S1_S=${S1_S:-220}
SHIPPED=benchmarks/results/generalization/model-swa
MIX="data.tasks=[niah_multikey_2,niah_multikey_2,niah_multikey_1,passkey]"
S3="--config recipes/configs/generalization-stage2.yaml data.seq_len=768 data.min_len=256 data.eval_sequences=128
    train.steps=3000 train.batch_size=64 train.eval_every=200 train.save_every=200"
declare -A V=(
  [mk2]="model.checkpoint=$SHIPPED $MIX train.lr=5e-4"
  [mk2_lr1e-3]="model.checkpoint=$SHIPPED $MIX train.lr=1e-3"
  [mk2_only]="model.checkpoint=$SHIPPED data.tasks=[niah_multikey_2] data.seq_len=512 train.lr=5e-4"
  [fresh_mk2]="model.checkpoint=models/fresh_mk2-s1 $MIX train.lr=5e-4"
)
stage3() {
  timeout $1 python recipes/sft.py $S3 ${V[$2]} train.output_dir=runs/mk/$2 > runs-$2.log 2>&1
  python recipes/export.py runs/mk/$2 models/$2 --dtype bfloat16 2>&1 | tail -1
}
fresh() {
  timeout $S1_S python recipes/sft.py --config recipes/configs/generalization-stage1.yaml \
    "data.tasks=[passkey,niah_single_1,niah_multikey_2]" data.eval_sequences=128 train.eval_every=100 \
    train.save_every=100 train.output_dir=runs/s1/fresh_mk2 > s1-fresh_mk2.log 2>&1
  python recipes/export.py runs/s1/fresh_mk2 models/fresh_mk2-s1 --dtype bfloat16 > /dev/null 2>&1
  stage3 $((TRAIN_S - S1_S)) fresh_mk2
}
echo "=== train $(date +%T)"
for name in mk2 mk2_lr1e-3 mk2_only; do stage3 $TRAIN_S $name & done
fresh &
wait
echo "=== ruler 4k $(date +%T)"
mkdir -p $OUT/logs
for name in "${!V[@]}"; do
  cp runs/mk/$name/metrics.jsonl $OUT/logs/$name-metrics.jsonl
  grep eval_answer $OUT/logs/$name-metrics.jsonl | tail -2 | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print('$name', r['step'], {k[21:]: round(v, 3) for k, v in r.items() if k.startswith('eval_answer')})"
  timeout 90 python -m benchmarks.ruler --checkpoint $name=models/$name --lengths 4k --tasks niah_multikey_1,niah_multikey_2 \
    --samples 4 --depths 0,0.25,0.5,0.75,1 --seed 1 --out runs/ruler-$name > /dev/null 2>&1 &
done
cp runs/s1/fresh_mk2/metrics.jsonl $OUT/logs/s1-fresh_mk2-metrics.jsonl
wait
for name in "${!V[@]}"; do grep -A4 "niah_multikey" runs/ruler-$name/summary.md | head -6; cp runs/ruler-$name/summary.md $OUT/logs/ruler4k-$name.md; done
for name in "${!V[@]}"; do tar cf $OUT/model-$name.tar models/$name; done
tar czf $OUT/logs.tar.gz -C $OUT logs && rm -r $OUT/logs
echo "=== done $(date +%T)"
