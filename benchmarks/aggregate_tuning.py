"""Launch settings of the Triton aggregation kernels, timed one kernel at a time.

python -m benchmarks.aggregate_tuning [--shapes 8x4096x16x1,2x16384x32x2] [--out FILE]

On one CUDA GPU, at each shape (B x L x HQ x H; bf16, D=64, K=8, S=64 as in benchmarks.kernels): first the
share of each kernel under the current settings (`LAUNCH` in ops/aggregate/fused.py): the forward, the
backward without dk/dv (the dq kernel), and the whole backward. Then, for one kernel at a time with the
other two at their current settings, every setting of a small grid: the forward for "fwd", forward plus
backward for "dq" (k and v without gradients, so the dk/dv kernel does not run) and for "dkdv". Each setting is
checked against the current one (same outputs and gradients within bf16 rounding) before it is timed.
Times are medians of triton.testing.do_bench (L2 flushed before every call).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path
from typing import Callable

import torch

from benchmarks.kernels.aggregate import AggInputs, agg_inputs
from benchmarks.kernels.harness import Bench, generator, log, rel_err, table, write_report
from ramba.ops import hsa_aggregate
from ramba.ops.aggregate import fused as agg

GRID = {
    "fwd": [{"num_warps": w, "num_stages": s} for w, s in itertools.product((1, 2, 4, 8), (1, 2, 3))],
    "dq": [{"num_warps": w, "num_stages": s} for w, s in itertools.product((1, 2, 4, 8), (1, 2, 3))],
    "dkdv": [{"rows": r, "programs": n, "num_warps": w, "num_stages": s}
             for r, n, w, s in itertools.product((64, 128, 256), (512, 2048), (4, 8), (1, 2))],
}
SHAPES = "8x4096x16x1,2x16384x32x2"
TOL = 2e-2  # relative norm error between two settings, both bf16


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--shapes: expected BxLxHQxH items such as 8x4096x16x1, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


GRADS = {"fwd": ("q",), "dq": ("q", "weights"), "dkdv": ("q", "k", "v", "weights")}  # what each call differentiates


def runs(x: AggInputs, grads_of: tuple[str, ...]) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) closures over the shape's inputs; the backward differentiates `grads_of`,
    and the inputs not in it are detached (so that k, v left out skip the dk/dv kernel)."""
    inputs = {name: getattr(x, name) if name in grads_of else getattr(x, name).detach()
              for name in ("q", "k", "v", "weights")}
    leaves = [inputs[name] for name in grads_of]
    grad = torch.randn(x.q.shape, device=x.q.device, dtype=x.q.dtype, generator=generator(1))

    def forward():
        return hsa_aggregate(inputs["q"], inputs["k"], inputs["v"], x.indices, inputs["weights"], 64,
                             backend="triton", check_indices=False)

    def both():
        return torch.autograd.grad(forward(), leaves, grad)

    return forward, both


def timed(kernel: str, x: AggInputs) -> Callable[[], object]:
    """The call whose time `kernel`'s setting changes: the forward (fwd), forward and backward without dk/dv
    (dq), or with it (dkdv)."""
    forward, both = runs(x, GRADS[kernel])
    return forward if kernel == "fwd" else both


def outputs(kernel: str, x: AggInputs) -> list[torch.Tensor]:
    """What `kernel`'s setting can change: the output, or the gradients it computes."""
    with torch.no_grad() if kernel == "fwd" else contextlib.nullcontext():
        out = timed(kernel, x)()
    return [out] if kernel == "fwd" else list(out)


def shares(bench: Bench, x: AggInputs) -> list[str]:
    """Current settings: forward, forward + backward without dk/dv, forward + backward (ms)."""
    return [f"{bench.time(timed(kernel, x)):.3g}" for kernel in GRADS]


def sweep(bench: Bench, kernel: str, x: AggInputs) -> list[list[str]]:
    """One row per setting of `kernel`: the setting, its time, its time over the current setting's."""
    current = dict(agg.LAUNCH[kernel])
    expected = outputs(kernel, x)
    fn = timed(kernel, x)
    rows = []
    try:
        base = bench.time(fn)
        for setting in GRID[kernel]:
            agg.LAUNCH[kernel] = setting
            try:
                err = max(rel_err(a, b) for a, b in zip(outputs(kernel, x), expected))
                ms = bench.time(fn) if err < TOL else float("nan")
                cell = f"{ms:.3g}" if err < TOL else f"wrong ({err:.1e})"
            except Exception as e:  # a setting the compiler rejects (too many resources) is reported, not fatal
                ms, cell = float("nan"), type(e).__name__
            rows.append([kernel, ", ".join(f"{k}={v}" for k, v in setting.items()), cell,
                         f"{ms / base:.2f}" if ms == ms else "-"])
    finally:
        agg.LAUNCH[kernel] = current
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.aggregate_tuning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated BxLxHQxH")
    p.add_argument("--kernels", default="fwd,dq,dkdv", help="comma-separated subset of fwd,dq,dkdv")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    kernels = args.kernels.split(",")
    if set(kernels) - set(GRID):
        p.error(f"--kernels: choose from {','.join(GRID)}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.aggregate_tuning times CUDA kernels: torch.cuda.is_available() is False here")
    bench = Bench(rep_ms=50, notes=[])
    blocks = [f"`python -m benchmarks.aggregate_tuning {' '.join(sys.argv[1:] if argv is None else argv)}`",
              f"{torch.cuda.get_device_name()}, torch {torch.__version__}; current settings: {agg.LAUNCH}"]
    for B, L, HQ, H in parse_shapes(args.shapes):
        label = f"B={B} L={L} HQ={HQ} H={H}"
        log(f"aggregate tuning {label}")
        x = agg_inputs(B, L, HQ, H, torch.bfloat16, generator(L + B))
        rows = [r for k in kernels for r in sweep(bench, k, x)]
        fwd, no_dkdv, full = shares(bench, x)
        blocks.append(f"## {label}\n\nCurrent settings, ms: forward {fwd}, forward + backward without dk/dv "
                      f"{no_dkdv}, forward + backward {full}\n\n"
                      + table(["kernel", "setting", "ms", "over current"], rows))
        del x
        torch.cuda.empty_cache()
    write_report(blocks, args.out)


if __name__ == "__main__":
    main()
