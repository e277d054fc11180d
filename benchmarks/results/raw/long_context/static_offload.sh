#!/usr/bin/env bash
# Issue #25 (2026-12-07): static decoding of an offloaded cache on the GPU (the captured steps read the selected
# chunks from pinned CPU memory), at 64M tokens of context; the retrieval kernel's sweep, kept; batch 8.
# From the repository root on the device machine (carry .wheels/slim.tar.xz):
#   bash benchmarks/results/raw/long_context/static_offload.sh
# PARTS: a subset of "tests ops decode64m tune batch8" (default: all, in that order). Outputs under $OUT: the GPU
# test log, the decoding ops' table, the long_context tables and the sweep (retrieve_tuning.md).
set -u
out="${OUT:-out}"; mkdir -p "$out"
source benchmarks/device_setup.sh
start=$SECONDS
for part in ${PARTS:-tests ops decode64m tune batch8}; do
    t0=$SECONDS
    case $part in
    tests)  # the static decoder and its ops on CUDA: captured steps, offloaded caches, pinned reads and writes
        timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py -k cuda \
            > "$out/gpu_tests.log" 2>&1; tail -3 "$out/gpu_tests.log" ;;
    ops)  # the decoding ops at 1M and 64M tokens of history, the static decoder's (Triton and PyTorch) included
        timeout 150 python3 -m benchmarks.kernels --sections decode --out "$out/kernels_decode.md" > /tmp/ops.log 2>&1
        grep -E "^\|" "$out/kernels_decode.md" || tail -5 /tmp/ops.log ;;
    decode64m)  # memory K/V offloaded (above 8 GiB): prefill, then model-call and static decoding at 64M
        timeout 330 python3 -m benchmarks.long_context --presets small --mixers swa --lengths 64m --segment 65536 \
            --no-dense --static-decode --decode-steps 32 --out "$out/long_context_64m.md" 2>&1 | grep -E "^\||rror" ;;
    batch8)  # 8 sequences side by side at 1M (not offloaded) and at 4M (offloaded)
        timeout 200 python3 -m benchmarks.long_context --presets small --mixers swa --lengths 1m,4m --segment 65536 \
            --no-dense --static-decode --decode-steps 32 --batch 8 --out "$out/long_context_b8.md" 2>&1 \
            | grep -E "^\||rror" ;;
    tune)
        timeout 170 python3 -m benchmarks.retrieve_tuning --out "$out/retrieve_tuning.md" > /tmp/tune.log 2>&1
        grep -E "^## |^Current" "$out/retrieve_tuning.md" || tail -5 /tmp/tune.log ;;
    *) echo "unknown part $part"; exit 2 ;;
    esac
    echo "$part: $((SECONDS - t0)) s"
done
echo "total: $((SECONDS - start)) s"
