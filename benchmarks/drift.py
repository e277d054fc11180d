r"""Do a model's retrieval inputs drift with length? Landmarks and Mamba2 states by position, beyond training.

python -m benchmarks.drift --checkpoint DIR [--checkpoint NAME=DIR ...] [--length 64k] [--segment 4096]
    [--seed 0] [--device cpu] [--out FILE.md]

Each model reads one random byte sequence (the same for all) through its inference cache, segment by segment.
Reported per position bucket (0-1K, 1K-4K, 4K-16K, ... tokens): the mean norm of the landmarks of the chunks
that end in the bucket, their cosine to the mean landmark of the first bucket (does the direction retrieval
scores against move?), and the norm of every Mamba2 block's recurrent state at the bucket's end (mean over
blocks; '-' for a model without Mamba2). A landmark or state that grows or turns past the training length is
out of the distribution retrieval was trained on. A checkpoint is a save_pretrained folder or builtin:tiny-random.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import command_line, format_length, parse_length
from ramba import HSAHybrid
from ramba.layers.mamba2 import Mamba2State
from ramba.loading import load_model


def buckets(length: int) -> list[tuple[int, int]]:
    """[(0, 1K), (1K, 4K), (4K, 16K), ...] up to `length` (the last one cut there)."""
    edges, edge = [0], 1024
    while edge < length:
        edges.append(edge)
        edge *= 4
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def drift(model: HSAHybrid, length: int, segment: int, seed: int, device: torch.device) -> list[list[str]]:
    """Rows [bucket, landmark norm, cosine to the first bucket, Mamba2 state norm] for one model."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, length), generator=gen).to(device)
    cache = model.new_cache(1)
    state_norms: dict[int, float] = {}
    spans = buckets(length)
    ends = {hi for _, hi in spans}
    cuts = sorted(ends | set(range(segment, length, segment)) | {length})  # read states exactly at bucket ends
    for start, end in zip([0] + cuts[:-1], cuts):
        model(ids[:, start:end], cache=cache, logits_to_keep=0)
        if end in ends:
            ssm = [s.ssm.float().norm().item() for s in cache.states if isinstance(s, Mamba2State)]
            state_norms[end] = sum(ssm) / len(ssm) if ssm else float("nan")
    chunks = cache.store.landmarks[0, :int(cache.store.count[0])].float().flatten(1)  # [C, Hr*dr]
    rows, reference = [], None
    for lo, hi in spans:
        part = chunks[lo // cfg.chunk_size:hi // cfg.chunk_size]
        if part.numel() == 0:
            continue
        mean = part.mean(0)
        reference = mean if reference is None else reference
        cosine = torch.nn.functional.cosine_similarity(mean, reference, dim=0).item()
        state = state_norms.get(hi, float("nan"))
        rows.append([f"{format_length(lo) if lo else 0}-{format_length(hi)}", f"{part.norm(dim=1).mean().item():.3f}",
                     f"{cosine:.3f}", "-" if state != state else f"{state:.3f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="DIR or NAME=DIR (repeatable)")
    p.add_argument("--length", default="64k")
    p.add_argument("--segment", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the table, with the command, to this markdown file")
    args = p.parse_args(argv)
    length, device = parse_length(args.length), torch.device(args.device)
    lines = ["| model | positions | landmark norm | cosine to the first bucket | Mamba2 state norm |",
             "| --- | --- | ---: | ---: | ---: |"]
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        model = load_model(path, device=device, dtype="float32")
        if model.encoder is None:
            raise SystemExit(f"{name}: a model without chunk memory (use_hsa=False) has no landmarks to follow")
        for row in drift(model, length, args.segment, args.seed, device):
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Drift of landmarks and states with length\n\n`{command_line('drift', argv)}`\n\n{table}\n")


if __name__ == "__main__":
    main()
