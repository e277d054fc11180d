"""The timing harness of the kernel benchmarks: settings, timing, memory peaks, rate ceilings and the markdown
tables and report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

DEVICE = "cuda"
DTYPE = torch.bfloat16  # of q, k, v, qr, landmarks in the timed sections
D, K, S = 64, 8, 64  # head dim, chunks per token, chunk size
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # relative norm error (float32 dots run in tf32)

Cell = float | str  # milliseconds, or why there is no number ("OOM", "n/a", "error", "skip")
Runner = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]  # a forward closure and its differentiable leaves
T = TypeVar("T")


@dataclass
class Bench:
    """Timing settings and what the run has learnt so far."""

    rep_ms: int
    notes: list[str]

    def time(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn after one untimed call (compilation, autotuning)."""
        import triton.testing

        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=max(1, self.rep_ms // 4), rep=self.rep_ms, return_mode="median")

    def attempt(self, label: str, run: Callable[[], T]) -> T | str:
        """run(), or "OOM" when the GPU memory runs out, or "error" (with a note) when it fails."""
        try:
            return run()
        except torch.cuda.OutOfMemoryError:
            return "OOM"
        except Exception as e:  # a baseline or a kernel that fails must not stop the other measurements
            self.notes.append(f"{label}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            return "error"
        finally:
            torch.cuda.empty_cache()


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_gb(fn: Callable[[], object]) -> float:
    """Peak allocated GPU memory (GB, inputs included) over one call of fn."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


CEILING_MATMUL, CEILING_COPY = 8192, 2**28  # an 8192^3 bf16 product; a 1 GiB float32 copy


def ceilings(bench: Bench) -> tuple[float, float]:
    """(bf16 matmul FLOP/s, device-to-device copy bytes/s, read + written) measured on random data."""
    n = CEILING_MATMUL
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    matmul = 2 * n**3 / (bench.time(lambda: a @ b) * 1e-3)
    src = torch.randn(CEILING_COPY, device=DEVICE)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() * src.element_size() / (bench.time(lambda: dst.copy_(src)) * 1e-3)
    return matmul, copy


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN when out holds NaN)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-300))


def fmt(cell: Cell) -> str:
    """Three significant digits (whole numbers from 1000 on), or the reason for no number."""
    if not isinstance(cell, float):
        return cell
    return f"{cell:.0f}" if cell >= 1000 else f"{cell:.3g}"


def tokens(n: int) -> str:
    """4096 -> "4K", 2**26 -> "64M"."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def pair(fwd: Cell, both: Cell) -> str:
    return f"{fmt(fwd)} / {fmt(both)}"


def ratio(a: Cell, b: Cell) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"


def percent(floor_ms: float, t: Cell) -> str:
    return f"{100 * floor_ms / t:.0f}%" if isinstance(t, float) else "-"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def time_fwd_bwd(bench: Bench, label: str, make: Callable[[], Runner]) -> tuple[Cell, Cell]:
    """(forward ms, forward+backward ms), each "OOM" or "error" on its own; the forward runs with grad on."""
    state: dict[str, object] = {}

    def fwd() -> float:
        state["runner"] = make()
        forward = state["runner"][0]
        state["grad"] = torch.randn_like(forward())
        return bench.time(forward)

    def both() -> float:
        forward, leaves = state["runner"]
        return bench.time(lambda: torch.autograd.grad(forward(), leaves, state["grad"]))

    first = bench.attempt(f"{label} fwd", fwd)
    second = bench.attempt(f"{label} fwd+bwd", both) if "grad" in state else first
    state.clear()
    torch.cuda.empty_cache()
    return first, second


def inference(bench: Bench, label: str, make: Callable[[], Callable[[], object]]) -> tuple[Cell, Cell]:
    """(median ms, peak GB) of the call that make() prepares (allocating its inputs), without grad."""
    peak: dict[str, float] = {}

    def run() -> float:
        fn = make()
        with torch.no_grad():
            peak["GB"] = peak_gb(fn)
            return bench.time(fn)

    ms = bench.attempt(label, run)
    return ms, peak.get("GB", ms)


def write_report(blocks: list[str], out: Path | None) -> None:
    """Print the markdown blocks as one report, and also write it to `out` when given."""
    report = "\n\n".join(blocks) + "\n"
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
