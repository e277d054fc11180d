#!/usr/bin/env bash
# Issues #25 and #22 (2026-12-07): the retrieval kernel's launch settings swept on the GPU, a profile of the
# shipped Mamba2 model's prefill, then fresh 64M pass keys with the fastest setting. From the repository root on
# the device machine (carry .wheels/kernels.tar.xz):
#   PART=tune bash benchmarks/results/raw/generalization/mamba2_2026-12-07/m11.sh
#       GPU tests of the retrieval kernel (every swept tile shape against the reference), the sweep
#       (python -m benchmarks.retrieve_tuning), a profile of one 64K-token segment of mamba2-passkey after 4M
#       tokens, then 64M pass keys (seed 103) until the call's time runs out
#   PART=64m bash ...m11.sh      more of the same 64M pass keys (results.jsonl resumes: done prompts are skipped)
#   PART=pool bash ...m11.sh     fresh pass keys at 1M (40) and 16M (20), seed 104, and niah_multikey_1 at 4K and 1M
# SEG: the prefill segment of the pass keys (PART=tune without SEG profiles 64K and 1M tokens and takes the
# faster; 1048576 was faster on the H200).
# LAUNCH (the retrieval kernel's settings, JSON) overrides ops/retrieve/fused.py's for the pass keys; PART=tune
# takes the best setting of the prefill-like shape (65536 queries x 262144 chunks, dr 64) from the sweep.
# As run (one H200): PART=tune (574 s: 4 of the 64M prompts); then, on the same warm machine, with SEG=1048576,
# `PART=pool` under `timeout 200` (1M and 16M done, the niah_multikey_1 part cut) followed by `PART=64m` under
# `timeout 330`, which stopped it before its copy (4 more 64M prompts, copied out by the next call); then the
# passkey command of passkeys_64m alone under `timeout 265` (3 more): 11 prompts at 64M in all.
# Then (2026-12-07, later session, one H100; the 11 prompts resumed from fresh/):
#   LAUNCH='{"insert": "images"}' PART=64m SEG=1048576 bash ...m11.sh   (517 s: the other 9 prompts, 49.7 s each
#   with the reworked kernel inserting images): 20 of 20 at 64M (fresh/passkey_64m_seed103.*).
set -u
out="${OUT:-out}"; mkdir -p "$out"
source benchmarks/device_setup.sh
model=benchmarks/models/mamba2-passkey
with_launch() {  # run a benchmark module's main with fused.LAUNCH updated from $LAUNCH
    python3 -c "import json, os, runpy, sys; from ramba.ops.retrieve import fused
fused.LAUNCH.update(json.loads(os.environ.get('LAUNCH') or '{}')); print('retrieval LAUNCH', fused.LAUNCH, flush=True)
sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')" "$@"
}
passkeys_64m() {  # until $1 seconds have passed
    if [ ! -f /tmp/pk64/results.jsonl ]; then  # resume from the prompts a previous machine finished
        mkdir -p /tmp/pk64; cp "$(dirname "$0")/fresh/passkey_64m_seed103.jsonl" /tmp/pk64/results.jsonl; fi
    timeout "$1" bash -c "$(declare -f with_launch); with_launch benchmarks.passkey --checkpoint m9=$model \
        --lengths 64m --samples 4 --seed 103 --segment ${SEG:-65536} --out /tmp/pk64" 2>&1 | grep -E "^\||rror|LAUNCH"
    cp /tmp/pk64/results.jsonl "$out/passkey_64m_seed103.jsonl"; cp /tmp/pk64/summary.md "$out/" 2>/dev/null
    python3 -c "import json; r=[json.loads(l) for l in open('/tmp/pk64/results.jsonl')]
print(f'64M: {sum(x[\"score\"] for x in r):.0f}/{len(r)}, seconds', [x['seconds'] for x in r])"
}
case "${PART:?PART=tune, 64m or pool}" in
tune)
    start=$SECONDS
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_retrieve_triton.py -k "tuning or exact or different_tiles or nan_and_inf" 2>&1 | tail -2
    timeout 200 python3 -m benchmarks.retrieve_tuning --out "$out/retrieve_tuning.md" > /tmp/tune.log 2>&1
    grep -E "^## |^Current" "$out/retrieve_tuning.md"
    timeout 60 python3 -c "import torch; from benchmarks.profiling import top_ops; from ramba.ops import hsa_retrieve
q = torch.randn(1, 4096, 1, 128, device='cuda').bfloat16(); l = torch.randn(1, 64, 1, 128, device='cuda').bfloat16()
p = 4096 + torch.arange(4096, device='cuda')[None]; f = lambda: hsa_retrieve(q, l, 8, 64, p, backend='triton')
f(); print('retrieval, 4096 queries x 64 chunks, 20 calls:'); print(top_ops(f, calls=20, rows=8))" 2>&1 | tail -14
    export LAUNCH=$(python3 -c "import json, re; t=open('$out/retrieve_tuning.md').read().split('## L=65536')[1]
m=re.search(r'Best: ([^(]*) \(', t); pairs=[kv.split('=') for kv in m.group(1).strip().split(', ')] if m else []
print(json.dumps({k: int(v) if v.isdigit() else v for k, v in pairs}))")
    echo "LAUNCH=$LAUNCH"
    [ -n "${SEG:-}" ] || for seg in 65536 1048576; do  # prefill segments (skipped when SEG is given)
        timeout 100 bash -c "$(declare -f with_launch); with_launch benchmarks.profile_prefill --segment $seg" \
            > /tmp/profile_$seg.txt 2>&1; grep -A32 "tokens in" /tmp/profile_$seg.txt | cut -c1-160
    done
    [ -n "${SEG:-}" ] || export SEG=$(for seg in 65536 1048576; do
        sed -n "s/.* tokens in \([0-9.]*\) s.*/\1 $seg/p" /tmp/profile_$seg.txt; done | sort -n | head -1 | cut -d' ' -f2)
    echo "SEG=${SEG:=65536}"
    passkeys_64m $((560 - (SECONDS - start))) ;;
64m)
    passkeys_64m 560 ;;
pool)
    for length in 1m 16m; do
        n=$([ $length = 1m ] && echo 8 || echo 4)  # x 5 depths: 40 at 1M, 20 at 16M
        timeout 280 bash -c "$(declare -f with_launch); with_launch benchmarks.passkey --checkpoint m9=$model \
            --lengths $length --samples $n --seed 104 --segment ${SEG:-65536} --out /tmp/pk_$length" 2>&1 | grep -E "^\||rror"
        cp /tmp/pk_$length/summary.md "$out/passkey_${length}_seed104.md"
        cp /tmp/pk_$length/results.jsonl "$out/passkey_${length}_seed104.jsonl"
    done
    timeout 150 python3 -m benchmarks.ruler --checkpoint m9=$model --tasks niah_multikey_1 --lengths 4k,1m \
        --samples 10 --seed 104 --segment ${SEG:-65536} --out /tmp/mk 2>&1 | grep -E "^\||rror"
    cp /tmp/mk/summary.md "$out/multikey_1.md" ;;
esac
