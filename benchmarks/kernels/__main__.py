"""Kernel benchmark: HSA aggregation and retrieval (Triton) against the PyTorch reference and the baselines.

python -m benchmarks.kernels [--quick] [--out benchmarks/results/kernels.md] [--sections check,aggregate,...]

On one CUDA GPU, in one run: (1) our kernels against a float64 reference, forward and gradients, on fresh
random inputs; (2) aggregation fwd and fwd+bwd in bf16 at the DESIGN section 5 shapes for ours, the PyTorch
reference, dense causal SDPA, FLA's NSA selected attention and the authors' Triton kernel, on one shared random
causal selection, with the compute and memory floors from the matmul rate and copy bandwidth measured in the
same run; (3) retrieval of 4K queries against 64 to 1M chunks; (4) decoding, one query per sequence.
The baselines are imported from .thirdparty/ (see .thirdparty/NOTES.md; never committed): "n/a" when absent.
Times are medians of triton.testing.do_bench, which flushes the L2 cache before every call.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from benchmarks.kernels.aggregate import (AGG_CHECKS, aggregate_section, baseline_version, check_aggregate,
                                          decode_section, load_baselines)
from benchmarks.kernels.harness import Bench, ceilings, generator, log, table, write_report
from benchmarks.kernels.retrieve import RETRIEVE_CHECKS, check_retrieve, retrieve_section

SECTIONS = ("check", "aggregate", "retrieve", "decode")


def check_section(bench: Bench) -> str:
    rows = []
    for i, case in enumerate(AGG_CHECKS):
        log(f"check aggregate {case}")
        row = bench.attempt(f"check aggregate {case}", lambda: check_aggregate(*case, generator(100 + i)))
        rows.append(row if isinstance(row, list) else ["aggregate", str(case), "-", "-", "-", row])
    for i, case in enumerate(RETRIEVE_CHECKS):
        log(f"check retrieve {case}")
        row = bench.attempt(f"check retrieve {case}", lambda: check_retrieve(*case, generator(7 + i)))
        rows.append(row if isinstance(row, list) else ["retrieve", str(case), "-", "-", "-", row])
    header = ["kernel", "case", "dtype", "output error", "gradients", "result"]
    return "## Correctness (relative norm error against float64)\n\n" + table(header, rows)


def preamble(argv: list[str], rates: tuple[float, float]) -> str:
    import triton

    command = " ".join(["python -m benchmarks.kernels", *argv])
    return (f"# Kernel benchmark\n\n`{command}`\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, {datetime.date.today()}. Measured here: bf16 matmul "
            f"{rates[0] / 1e12:.0f} TFLOP/s, device copy {rates[1] / 1e12:.2f} TB/s (read + written).\n\n"
            f"Baselines: FLA {baseline_version('fla')}; authors {baseline_version('hsa_authors')}. Times in ms, "
            "medians of triton.testing.do_bench (L2 flushed before each call); forwards run with grad enabled, "
            "decoding and retrieval without. FLA NSA gets the same selections (one softmax over the selected "
            "chunks, no weights); the authors' kernel gets empty slots as chunk 0 with weight 0, as their model "
            "passes them. Floors: FLOPs over the measured matmul rate, fewest bytes over the measured copy rate.")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced set for one short GPU call (under ~3 minutes)")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels times CUDA kernels and needs a CUDA GPU: torch.cuda.is_available() "
                         "is False here")
    bench = Bench(rep_ms=40 if args.quick else 100, notes=[])
    rates = ceilings(bench)
    sections = args.sections.split(",")
    blocks = [preamble(argv, rates)]
    if "check" in sections:
        blocks.append(check_section(bench))
    if "aggregate" in sections:
        baselines = load_baselines()
        bench.notes += [f"{name}: {why}" for name, why in baselines.items() if isinstance(why, str)]
        blocks.append(aggregate_section(bench, args.quick, baselines, rates))
    if "retrieve" in sections:
        blocks.append(retrieve_section(bench, args.quick))
    if "decode" in sections:
        blocks.append(decode_section(bench, args.quick))
    if bench.notes:
        blocks.append("Notes:\n\n" + "\n".join(f"- {n}" for n in bench.notes))
    write_report(blocks, args.out)


if __name__ == "__main__":
    main()
