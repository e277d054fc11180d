"""Training throughput and peak memory at 4K context: HSA hybrids beside their mixer-only counterparts and a
dense SDPA transformer of the same size, measured in one run.

python -m benchmarks.training [--preset small] [--mixers swa,mamba2] [--seq-len 4096] [--batch-size 4]
    [--steps 10] [--swa-backends auto] [--mamba-backends auto] [--compile no] [--variants hybrid,mixer-only]
    [--no-dense]
    [--out benchmarks/results/training.md] [--profile]

Each mixer runs with each of its listed backends (config `swa_backend` / `mamba_backend`; "auto" takes the
fastest that works here, see `ramba.print_backends()`); the report names the backend each op kind ran on.
--compile lists the `train.compile` modes to run the hybrids with (`HSAHybrid.compile_blocks`; "no" is eager):
each compiled model gets its compilation out of the way in the warm-up steps.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from benchmarks.common import command_line
from benchmarks.profiling import top_ops
from ramba import HSAHybrid, HSAHybridConfig
from ramba.dense import DenseTransformer
from ramba.ops.backends import CUDA_ONLY, MAMBA_KINDS, load, pick
from ramba.training.config import COMPILE_MODES
from ramba.training.optim import build_optimizer, train_step

PACKAGES = {"flash_attn.cute": "flash-attn 4", "flash_attn_interface": "flash-attn 3", "flash_attn": "flash-attn 2",
            "causal_conv1d": "causal-conv1d"}


def ran_on(kind: str, backend: str) -> str:
    """What `backend` of op `kind` runs on CUDA: the package for package backends, else the backend's name."""
    choice = pick(kind, backend, torch.device("cuda"))
    if choice not in CUDA_ONLY:
        return choice
    module = load(kind, choice).__name__
    return PACKAGES.get(module, module.split(".")[0])


def step_fn(model: torch.nn.Module):
    """One ramba.training optimizer step on a batch [B, L] in bf16 autocast; returns a callable of the batch."""
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.01, fused=True)

    def step(ids: torch.Tensor) -> None:
        train_step(model, optimizer, {"input_ids": ids, "labels": ids}, autocast=torch.bfloat16)

    return step


def measure(name: str, model: torch.nn.Module, batch: int, seq_len: int, steps: int, profile: bool = False) -> dict:
    """Median step time over `steps` after three warm-up steps; tokens per second and peak memory.
    With `profile`, also prints the ops that took the most GPU time over two more steps."""
    model = model.cuda().train()
    step = step_fn(model)
    vocab = model.embed.num_embeddings
    inputs = [torch.randint(0, vocab, (batch, seq_len), device="cuda") for _ in range(3)]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(inputs[i % len(inputs)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[3:])
    if profile:
        print(f"profile of {name}:\n" + top_ops(lambda: step(inputs[0]), calls=2), flush=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"model": name, "params_m": params, "step_ms": median * 1e3, "tokens_per_s": batch * seq_len / median,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--mixers", default="swa,mamba2")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--swa-backends", default="auto",
                   help="comma-separated swa_backend values to run the SWA models with")
    p.add_argument("--mamba-backends", default="auto",
                   help="comma-separated mamba_backend values to run the Mamba2 models with")
    p.add_argument("--compile", default="no",
                   help="comma-separated train.compile modes (no, default, reduce-overhead, max-autotune) of the "
                   "hybrids")
    p.add_argument("--variants", default="hybrid,mixer-only",
                   help="which of each mixer's models to run: hybrid (with HSA), mixer-only (use_hsa=False)")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a dense SDPA transformer of the same size")
    p.add_argument("--out")
    p.add_argument("--profile", action="store_true", help="print the top GPU ops of each model's step")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.training measures GPU training and needs a CUDA GPU")
    modes = args.compile.split(",")
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        raise SystemExit(f"--compile: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(COMPILE_MODES)}")
    variants = {"hybrid": True, "mixer-only": False}
    if not args.variants or any(v not in variants for v in args.variants.split(",")):
        raise SystemExit(f"--variants: a comma-separated subset of hybrid, mixer-only, got {args.variants!r}")
    rows = []
    for mixer in args.mixers.split(","):
        field = "swa_backend" if mixer == "swa" else "mamba_backend"
        kinds = ["swa"] if mixer == "swa" else list(MAMBA_KINDS)
        for backend in (args.swa_backends if mixer == "swa" else args.mamba_backends).split(","):
            label = "/".join(ran_on(kind, backend) for kind in kinds)
            for mode, use_hsa in itertools.product(modes, [variants[v] for v in args.variants.split(",")]):
                config = HSAHybridConfig.preset(args.preset, local_mixer=mixer, use_hsa=use_hsa, **{field: backend})
                model = HSAHybrid(config)
                if mode != "no":
                    model.compile_blocks(mode)
                compiled = "" if mode == "no" else f", compile {mode}"
                name = f"{args.preset} {mixer}" + ("" if use_hsa else " mixer-only") + f" ({label}{compiled})"
                rows.append(measure(name, model, args.batch_size, args.seq_len, args.steps, args.profile))
                r = rows[-1]
                print(f"{name}: {r['step_ms']:.1f} ms per step, {r['tokens_per_s']:,.0f} tokens/s, "
                      f"peak {r['peak_gib']:.1f} GiB", flush=True)
                torch.cuda.empty_cache()
    if args.dense:
        dense = DenseTransformer(HSAHybridConfig.preset(args.preset))
        rows.append(measure(f"{args.preset} dense SDPA", dense, args.batch_size, args.seq_len, args.steps,
                            args.profile))
    by_name = {r["model"]: r for r in rows}
    lines = ["| model | params (M) | step ms | tokens/s | vs mixer-only | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name, _, backend = r["model"].partition(" (")
        base = by_name.get(f"{name} mixer-only ({backend}" if backend else f"{name} mixer-only")
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        lines.append(f"| {r['model']} | {r['params_m']:.0f} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{ratio} | {r['peak_gib']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        props = torch.cuda.get_device_properties(0)
        with open(args.out, "w") as f:
            f.write(f"# Training throughput\n\n`{command_line('training', argv)}`\n\n{props.name}, torch "
                    f"{torch.__version__}, bf16 autocast, AdamW, batch {args.batch_size} x {args.seq_len} tokens; "
                    "in brackets the backend of each op kind (swa; or Mamba2's ssd/conv/norm)\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
