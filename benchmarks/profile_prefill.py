"""Where a checkpoint's prefill time goes: milliseconds per segment as the memory grows, and a CUDA profile.

python -m benchmarks.profile_prefill [--checkpoint benchmarks/models/mamba2-passkey] [--length 4m]
    [--segment 65536] [--rows 25]

Prefills `length` random tokens through the cache in segments (bf16, one sequence), prints the median
milliseconds of the segments in each quarter of the prompt (the per-segment cost grows with the memory when
retrieval dominates), then the ops with the most CUDA time in one more segment.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.common import parse_lengths
from benchmarks.long_context import synchronize_time
from benchmarks.profiling import top_ops
from ramba import HSAHybrid


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="benchmarks/models/mamba2-passkey")
    p.add_argument("--length", default="4m", help="prompt tokens before the profiled segment")
    p.add_argument("--segment", type=int, default=65536)
    p.add_argument("--rows", type=int, default=25, help="ops in the profile table")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile_prefill profiles CUDA work: torch.cuda.is_available() is False here")
    (length,) = parse_lengths(args.length)
    model = HSAHybrid.from_pretrained(args.checkpoint, device="cuda", dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    cache = model.new_cache(1, max_tokens=length + 2 * args.segment)
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for pos in range(0, length, args.segment):
        ids = torch.randint(0, vocab, (1, min(args.segment, length - pos)), device="cuda", generator=gen)
        start = synchronize_time()
        model(ids, cache=cache, logits_to_keep=1)
        times.append(1000 * (synchronize_time() - start))
    quarters = [times[i * len(times) // 4:(i + 1) * len(times) // 4] for i in range(4)]
    print(f"{args.checkpoint}: {length:,} tokens in {sum(times) / 1000:.1f} s; median ms a segment of "
          f"{args.segment:,} by quarter: {', '.join(f'{statistics.median(q):.1f}' for q in quarters if q)}")
    ids = torch.randint(0, vocab, (1, args.segment), device="cuda", generator=gen)
    print(top_ops(lambda: model(ids, cache=cache, logits_to_keep=1), calls=1, rows=args.rows))


if __name__ == "__main__":
    main()
