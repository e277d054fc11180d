r"""The ablation study of benchmarks/results/generalization.md: each variant of the tiny preset trained the same
way by benchmarks.learnability (pass-key prompts, same steps, batch, lengths and seed), then benchmarks.passkey
on the saved model at long lengths.

python -m benchmarks.ablations [--variants base,mean,...] [--steps 600] [--length 768] [--min-length 160] \
    [--batch-size 32] [--lr 1e-3] [--min-lr-ratio 1] [--lengths 4k,64k,1m] [--depths 0,0.25,0.5,0.75,1] \
    [--samples 2] [--segment 4096] [--init DIR] [--retrieval-loss 0] [--out DIR] [--device cuda]

OUT/VARIANT/ holds the saved model and training.md (the learning curve); OUT/passkey/ the benchmark's
results.jsonl, summary.md and plots, one line per variant. A variant is never evaluated at lengths beyond
what its local attention can reach when it has no chunk memory (the dense baseline stops at its window).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import learnability, passkey
from benchmarks.common import BenchmarkError, format_length, parse_lengths

BASE = {"hsa_residual": "standard", "window": 32}  # CLS landmarks, one encoder layer, top-8, SWA
DENSE_WINDOW = 65536
VARIANTS: dict[str, dict[str, object]] = {
    "base": BASE,
    "mean": {**BASE, "landmark": "mean"},
    "mean-encoder-0": {**BASE, "landmark": "mean", "encoder_layers": 0},  # CLS needs an encoder layer
    "encoder-2": {**BASE, "encoder_layers": 2},
    "bypass": {**BASE, "hsa_residual": "bypass"},
    "topk-64": {**BASE, "topk": 64},
    "mixer-only": {**BASE, "use_hsa": False},
    "dense": {**BASE, "use_hsa": False, "window": DENSE_WINDOW},  # full causal attention up to 64K tokens
    "mamba2": {**BASE, "local_mixer": "mamba2"},  # the base model with Mamba2 as every block's local mixer
    # Mamba2 whose heads all forget within the SWA window's 32 tokens: its state at 64K looks like in training
    "mamba2-horizon": {**BASE, "local_mixer": "mamba2", "mamba_horizon": 32},
    # SWA below the memory (chunk encoder input, landmarks), Mamba2 in the upper blocks
    "mamba2-upper": {**BASE, "local_mixer": ["swa", "swa", "mamba2", "mamba2"]},
    # the converse: Mamba2 below the memory (landmarks read its states), SWA in the upper blocks
    "mamba2-lower": {**BASE, "local_mixer": ["mamba2", "mamba2", "swa", "swa"]},
    # a horizon well inside the training prompts (160-640 tokens): states at any length look like in training
    "mamba2-horizon-128": {**BASE, "local_mixer": "mamba2", "mamba_horizon": 128},
    # landmarks from SWA blocks and retrieval queries from Mamba2 blocks whose states cannot drift
    "mamba2-upper-horizon": {**BASE, "local_mixer": ["swa", "swa", "mamba2", "mamba2"], "mamba_horizon": 128},
    # Mamba2 below the memory restarts its state at every 64-token chunk (chunk-local, as the chunk encoder is):
    # landmarks and retrieval queries read no state older than a chunk; the upper Mamba2 blocks are unbounded
    "mamba2-reset": {**BASE, "local_mixer": "mamba2", "mamba_reset": 64},
    # the same, and every head (upper ones included) forgets within 128 tokens
    "mamba2-reset-horizon": {**BASE, "local_mixer": "mamba2", "mamba_reset": 64, "mamba_horizon": 128},
    # chunk-local below, and the upper Mamba2 blocks restart every 256 tokens: no state at any length has seen
    # more tokens than in training (prompts of 160-640), and a needle before the last restart needs the memory
    "mamba2-reset-256": {**BASE, "local_mixer": "mamba2", "mamba_reset": 64, "mamba_reset_upper": 256},
    # chunk-local Mamba2 everywhere: the memory is the only path beyond a chunk
    "mamba2-reset-all": {**BASE, "local_mixer": "mamba2", "mamba_reset": 64, "mamba_reset_upper": 64},
    # the same with staggered restarts: every second block restarts at the chunks' middles (context >= 32 tokens)
    "mamba2-reset-all-stagger": {**BASE, "local_mixer": "mamba2", "mamba_reset": 64, "mamba_reset_upper": 64,
                                 "mamba_reset_stagger": True},
    # chunk-local Mamba2 below the memory (landmarks, queries) and SWA above it (reading, answering)
    "mamba2-reset-lower": {**BASE, "local_mixer": ["mamba2", "mamba2", "swa", "swa"], "mamba_reset": 64},
}


def reach(overrides: dict[str, object]) -> int | None:
    """The longest prompt worth evaluating: the window for a model without chunk memory and a window of at
    least 4K tokens (dense), else no limit."""
    window = int(overrides.get("window", 0))
    if overrides.get("use_hsa", True) is False and window >= 4096:
        return window
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--length", type=int, default=768, help="longest training prompt in tokens")
    p.add_argument("--min-length", type=int, default=160, help="shortest training prompt in tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=1.0, help="cosine decay to this fraction of --lr (1: constant)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--lengths", default="4k,64k,1m", help="benchmark prompt lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--samples", type=int, default=2, help="benchmark samples per (length, depth)")
    p.add_argument("--segment", type=int, default=4096, help="prefill segment of the benchmark in tokens")
    p.add_argument("--init", metavar="DIR", help="start every variant from this saved model, its config changed by "
                   "the variant's fields (a curriculum: e.g. a model trained with a shortcut, retrained without)")
    p.add_argument("--retrieval-loss", type=float, default=0.0, metavar="W",
                   help="benchmarks.learnability's auxiliary retrieval loss weight (0: off)")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    lengths = parse_lengths(args.lengths)
    out = Path(args.out)
    for name in names:
        overrides, folder = VARIANTS[name], out / name
        train_args = ["--length", str(args.length), "--min-length", str(args.min_length), "--steps", str(args.steps),
                      "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--min-lr-ratio",
                      str(args.min_lr_ratio), "--eval-every", str(args.eval_every), "--save", str(folder),
                      "--out", str(out / f"{name}.md")]
        train_args += [f"--set={k}={v}" for k, v in overrides.items()]
        if args.init:
            train_args += ["--init", args.init]
        if args.retrieval_loss:
            train_args += ["--retrieval-loss", str(args.retrieval_loss)]
        if args.device:
            train_args += ["--device", args.device]
        print(f"## {name}: {overrides}", flush=True)
        try:
            learnability.main(train_args)
        except BenchmarkError as err:
            raise SystemExit(f"error: variant {name}: {err}") from None
        limit = reach(overrides)
        usable = [n for n in lengths if limit is None or n <= limit]
        if not usable:
            continue
        start = time.perf_counter()
        bench_args = ["--checkpoint", f"{name}={folder}", "--lengths", ",".join(format_length(n) for n in usable),
                      "--depths", args.depths, "--samples", str(args.samples), "--segment", str(args.segment),
                      "--out", str(out / "passkey")]
        if args.device:
            bench_args += ["--device", args.device]
        passkey.main(bench_args)
        print(f"{name}: benchmark took {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
