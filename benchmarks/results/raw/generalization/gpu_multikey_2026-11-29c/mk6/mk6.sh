# Continue the two best multi-key models of mk5.sh four ways side by side; RULER multi-key at 4K and 1M on each
# (seed 1, model selection), then the best on fresh prompts (seed 2): multi-key at 4K, 64K, 1M and pass keys at 1M.
source benchmarks/device_setup.sh >/dev/null 2>&1
export OMP_NUM_THREADS=4
TRAIN_S=${TRAIN_S:-300}
M=scratch/mk5/out/models
MIX="data.tasks=[niah_multikey_2,niah_multikey_2,niah_multikey_1,passkey]"
S3="--config recipes/configs/generalization-stage2.yaml data.seq_len=768 data.min_len=256 data.eval_sequences=128
    train.batch_size=64 train.lr=3e-4 train.eval_every=200 train.save_every=200 train.steps=1400"
declare -A V=(
  [only_mix2]="model.checkpoint=$M/only_mix $MIX"
  [mk2_c2]="model.checkpoint=$M/mk2_c $MIX"
  [only_mix_mk1]="model.checkpoint=$M/only_mix data.tasks=[niah_multikey_2,niah_multikey_2,niah_multikey_1,niah_multikey_1,passkey]"
  [only_mix_1k]="model.checkpoint=$M/only_mix $MIX data.seq_len=1024 train.steps=1000"
)
echo "=== train $(date +%T)"
for name in "${!V[@]}"; do
  ( timeout $TRAIN_S python recipes/sft.py $S3 ${V[$name]} train.output_dir=runs/mk/$name > runs-$name.log 2>&1
    python recipes/export.py runs/mk/$name models/$name --dtype bfloat16 2>&1 | tail -1 ) &
done
wait
echo "=== ruler 4k, 1m (seed 1) $(date +%T)"
mkdir -p $OUT/logs
for name in "${!V[@]}"; do
  cp runs/mk/$name/metrics.jsonl $OUT/logs/$name-metrics.jsonl
  grep eval_answer $OUT/logs/$name-metrics.jsonl | tail -1 | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); print('$name', r['step'], {k[21:]: round(v, 3) for k, v in r.items() if k.startswith('eval_answer')})"
  timeout 90 python -m benchmarks.ruler --checkpoint $name=models/$name --lengths 4k,1m --tasks niah_multikey_1 \
    --samples 4 --depths 0,0.25,0.5,0.75,1 --seed 1 --segment 65536 --out runs/sel-$name > /dev/null 2>&1 &
done
wait
for name in "${!V[@]}"; do grep "| $name | niah_multikey_1" runs/sel-$name/summary.md; cp runs/sel-$name/summary.md $OUT/logs/select-$name.md; done
BEST=$(for name in "${!V[@]}"; do grep "| $name | niah_multikey_1" runs/sel-$name/summary.md; done | sort -t'|' -k5 -g -r | head -1 | cut -d'|' -f2 | tr -d ' ')
echo "=== $BEST on fresh prompts (seed 2) $(date +%T)"
timeout ${FINAL_S:-100} python -m benchmarks.ruler --checkpoint $BEST=models/$BEST --lengths 4k,64k,1m --tasks niah_multikey_1 \
  --samples 10 --depths 0,0.25,0.5,0.75,1 --seed 2 --segment 65536 --out runs/final-ruler > runs/final-ruler.log 2>&1 &
timeout ${FINAL_S:-100} python -m benchmarks.passkey --checkpoint $BEST=models/$BEST --lengths 4k,1m \
  --samples 4 --depths 0,0.25,0.5,0.75,1 --seed 2 --segment 65536 --out runs/final-passkey > runs/final-passkey.log 2>&1 &
wait
for b in ruler passkey; do
  head -12 runs/final-$b/summary.md; tail -2 runs/final-$b.log
  mkdir -p $OUT/logs/final-$b; cp runs/final-$b/*.md runs/final-$b/*.jsonl runs/final-$b/*.json $OUT/logs/final-$b/ 2>/dev/null
done
for name in "${!V[@]}"; do tar cf $OUT/model-$name.tar models/$name; done
tar czf $OUT/logs.tar.gz -C $OUT logs && rm -r $OUT/logs
echo "=== done $(date +%T)"
