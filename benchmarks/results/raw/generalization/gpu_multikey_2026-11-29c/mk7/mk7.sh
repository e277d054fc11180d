# The multi-key model of mk6.sh (only_mix2) on more fresh prompts (seed 3): multi-key needles at 1M and 16M,
# pass keys at 64M, side by side; whatever finishes within the time limit is kept (results.jsonl).
source benchmarks/device_setup.sh >/dev/null 2>&1
export OMP_NUM_THREADS=8
MODEL=multikey=scratch/mk6/out/models/only_mix2
echo "=== $(date +%T)"
timeout ${RULER_S:-300} python -m benchmarks.ruler --checkpoint $MODEL --lengths 1m,16m --tasks niah_multikey_1 \
  --samples 20 --depths 0,0.25,0.5,0.75,1 --seed 3 --segment 65536 --out runs/ruler > runs/ruler.log 2>&1 &
timeout ${PASSKEY_S:-300} python -m benchmarks.passkey --checkpoint $MODEL --lengths 64m \
  --samples 2 --depths 0,0.25,0.5,0.75,1 --seed 3 --segment 65536 --out runs/passkey > runs/passkey.log 2>&1 &
wait
for b in ruler passkey; do
  head -12 runs/$b/summary.md 2>/dev/null; tail -2 runs/$b.log
  python3 -c "
import json, collections
c = collections.defaultdict(list)
for l in open('runs/$b/results.jsonl'):
    r = json.loads(l); c[(r['task'], r['length'])].append(r['score'])
for k, v in c.items(): print('$b', k, len(v), 'prompts, mean', sum(v) / len(v))"
  mkdir -p $OUT/$b; cp runs/$b/*.md runs/$b/*.jsonl runs/$b/*.json $OUT/$b/ 2>/dev/null
done
echo "=== done $(date +%T)"
