"""Launch settings of the fused Triton retrieval kernel (`LAUNCH` in ops/retrieve/fused.py), swept on one GPU.

python -m benchmarks.retrieve_tuning [--shapes 4096x1048576x128,65536x262144x64,1x1048576x64,4096x64x128]
    [--out FILE]

At each shape (L queries x C chunks x retrieval dim dr; B = 1, Hr = 1, K = 8, S = 64, bf16, every chunk visible
to every query, as in benchmarks.kernels): the time under the current settings, then every setting of a small
grid (query rows a tile, warps, software-pipelining stages, and how a tile's passing scores enter the running
top-k: 64-bit keys or 32-bit score images). Each setting's indices and scores are checked against the current setting's (equal
up to near-ties of bf16 scores) before it is timed. Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.kernels.harness import Bench, generator, log, table, write_report
from ramba.ops.retrieve import fused

GRID = [{"block_m": m, "block_n": 64, "num_warps": w, "num_stages": s, "insert": i}
        for i, m, w, s in itertools.product(("keys", "images"), (32, 64), (4, 8), (1, 3))]
SHAPES = "4096x1048576x128,65536x262144x64,1x1048576x64,4096x64x128"
K, S = 8, 64
AGREE = 0.999  # share of selected chunks two settings must agree on (bf16 near-ties may differ)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: expected LxCxDR items such as 4096x1048576x128, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def sweep(bench: Bench, L: int, C: int, dr: int) -> tuple[float, float, list[list[str]]]:
    """The current setting's ms, its host ms to issue a call, and one row per setting: the setting, its ms, its
    time over the current one's."""
    gen = generator(L + C)
    qr = torch.randn(1, L, 1, dr, generator=gen, device="cuda").bfloat16()
    landmarks = torch.randn(1, C, 1, dr, generator=gen, device="cuda").bfloat16()
    positions = C * S + torch.arange(L, device="cuda")[None]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return fused.retrieve_triton(qr, landmarks, K, S, positions)

    current = dict(fused.LAUNCH)
    want_idx, want_scores = run()
    base = bench.time(run)
    host = enqueue_ms(run)
    rows = []
    try:
        for setting in GRID:
            fused.LAUNCH.update(setting)
            try:
                idx, scores = run()
                agree = float((idx == want_idx).float().mean())
                ranked = [t.sort(-1, descending=True).values for t in (scores, want_scores)]
                ok = agree >= AGREE and torch.allclose(*ranked, rtol=1e-3, atol=1e-3)
                ms = bench.time(run) if ok else float("nan")
                cell = f"{ms:.3g}" if ms == ms else f"wrong (agree {agree:.4f})"
            except Exception as e:  # a setting the compiler rejects (too many resources) is reported, not fatal
                ms, cell = float("nan"), type(e).__name__
            finally:
                fused.LAUNCH.clear()
                fused.LAUNCH.update(current)
            rows.append([", ".join(f"{k}={v}" for k, v in setting.items()), cell,
                         f"{ms / base:.2f}" if ms == ms else "-"])
    finally:
        fused.LAUNCH.clear()
        fused.LAUNCH.update(current)
    return base, host, rows


def enqueue_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Host milliseconds to issue one call without waiting for the GPU: where it is near the timed milliseconds,
    the call is bound by launch overhead, not by the kernel."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1000 * elapsed / calls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieve_tuning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated LxCxDR")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.retrieve_tuning times CUDA kernels: torch.cuda.is_available() is False here")
    bench = Bench(rep_ms=100, notes=[])
    blocks = [f"`python -m benchmarks.retrieve_tuning {' '.join(sys.argv[1:] if argv is None else argv)}`",
              f"{torch.cuda.get_device_name()}, torch {torch.__version__}; current settings: {fused.LAUNCH}"]
    for L, C, dr in shapes:
        label = f"L={L} C={C} dr={dr}"
        log(f"retrieve tuning {label}")
        base, host, rows = sweep(bench, L, C, dr)
        timed = [r for r in rows if r[2] != "-"]
        best = min(timed, key=lambda r: float(r[1])) if timed else None
        summary = f"Best: {best[0]} ({best[1]} ms, {best[2]} of current)" if best else "No setting ran."
        blocks.append(f"## {label}\n\nCurrent settings: {base:.3g} ms ({host:.3g} ms of host time to issue a call). "
                      f"{summary}\n\n"
                      + table(["setting", "ms", "over current"], rows))
        torch.cuda.empty_cache()
    write_report(blocks, args.out)


if __name__ == "__main__":
    main()
