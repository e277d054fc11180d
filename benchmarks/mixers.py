"""The local mixers' ops on each backend: sliding-window attention and Mamba2, forward and forward+backward.

python -m benchmarks.mixers [--sections swa,mamba2] [--lengths 4k,16k,32k,128k] [--out benchmarks/results/mixers.md]

On one CUDA GPU, in one run, at the `small` preset's shapes in bf16 (the backends that are not installed or do
not import here say why, from `ramba.ops.backends`):
- swa: `sliding_window_attention` (12 query heads, 2 kv heads, head dim 64, window 512), one sequence of each
  length, on "flash" (flash-attn 4, 3 or 2), "flex", "fla" and "torch" (ramba's reference), each first checked
  against the float32 reference at 4K (relative norm error of the output and of the gradients);
- mamba2: its SSD scan (24 heads of 64, d_state 128, chunk 64), its causal conv (width 4 over 1792 channels) on
  causal-conv1d, fla-core, the compiled and the reference path, its gated norm, and the whole Mamba2 layer under
  bf16 autocast, at 4 x 4096 tokens, each checked against the reference backend.
Times in ms, medians of triton.testing.do_bench (L2 flushed before each call); the first call of each
(compilation, autotuning) is not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import parse_length
from benchmarks.kernels.harness import Bench, Runner, fmt, log, ratio, rel_err, table, time_fwd_bwd, write_report
from benchmarks.profiling import top_ops
from ramba import HSAHybridConfig
from ramba.layers.mamba2 import Mamba2
from ramba.ops import backends, causal_conv1d, gated_rms_norm, sliding_window_attention, ssd_scan
from ramba.ops.ssd.cuda import causal_conv1d_cuda
from ramba.ops.ssd.fla import causal_conv1d_fla

SECTIONS = ("swa", "mamba2")
SWA_BACKENDS = ("flash", "flex", "fla", "torch")
BATCH, TOKENS = 4, 4096  # the Mamba2 section's batch (the training benchmark's)
DEVICE = "cuda"


def why_not(kind: str, backend: str) -> str | None:
    """None when `backend` can run `kind` here, else a short reason for the table."""
    if backend == "torch":
        return None
    reason = backends.unusable(kind, backend)
    return None if reason is None else "n/a: " + reason.split(";")[0].removeprefix("needs ")


def grads_error(make: Callable[[], Runner], reference: Callable[[], Runner], seed: int) -> tuple[float, float]:
    """(output, worst gradient) relative norm errors of make()'s forward against reference()'s."""
    (fn, leaves), (ref_fn, ref_leaves) = make(), reference()
    out, want = fn(), ref_fn()
    upstream = torch.randn(want.shape, generator=torch.Generator(DEVICE).manual_seed(seed), device=DEVICE)
    got_grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    want_grads = torch.autograd.grad(want, ref_leaves, upstream.to(want.dtype))
    return rel_err(out, want), max(rel_err(g, w) for g, w in zip(got_grads, want_grads))


# ---- sliding-window attention ----

def swa_runner(config: HSAHybridConfig, length: int, backend: str, dtype: torch.dtype, seed: int) -> Runner:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    q = torch.randn(1, length, config.num_heads, config.head_dim, device=DEVICE, generator=gen)
    k, v = (torch.randn(1, length, config.num_kv_heads, config.head_dim, device=DEVICE, generator=gen)
            for _ in range(2))
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    return (lambda: sliding_window_attention(*leaves, config.window, backend=backend)), leaves


def swa_section(bench: Bench, lengths: list[int]) -> str:
    config = HSAHybridConfig.preset("small", local_mixer="swa")
    rows, times = [], {}
    for backend in SWA_BACKENDS:
        reason = why_not("swa", backend)
        if reason:
            rows.append([backend, reason, *["-"] * len(lengths)])
            continue
        log(f"swa {backend}")
        check = bench.attempt(f"swa {backend} check", lambda: grads_error(
            lambda: swa_runner(config, 4096, backend, torch.bfloat16, 0),
            lambda: swa_runner(config, 4096, "torch", torch.float32, 0), 1))
        times[backend] = [time_fwd_bwd(bench, f"swa {backend} {n}",
                                       lambda: swa_runner(config, n, backend, torch.bfloat16, 2)) for n in lengths]
        error = check if isinstance(check, str) else f"{check[0]:.1e} / {check[1]:.1e}"
        rows.append([backend, error, *[f"{fmt(f)} / {fmt(b)}" for f, b in times[backend]]])
    for row in rows:
        mine, flex = times.get(row[0]), times.get("flex")
        row.append(", ".join(ratio(f[1], m[1]) for f, m in zip(flex, mine)) if mine and flex else "-")
    header = ["backend", "error at 4K (out / grads)", *[f"{n // 1024}K fwd / fwd+bwd" for n in lengths],
              "flex's fwd+bwd time / this one's"]
    return (f"## Sliding-window attention\n\nB=1, {config.num_heads} query heads, {config.num_kv_heads} kv heads, "
            f"head dim {config.head_dim}, window {config.window}, bf16; errors against the float32 reference "
            "(relative norm).\n\n" + table(header, rows))


# ---- Mamba2 ----

def scan_runner(config: HSAHybridConfig, backend: str, dtype: torch.dtype, seed: int) -> Runner:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    heads, p, g, n = config.d_inner // config.mamba_head_dim, config.mamba_head_dim, config.n_groups, config.d_state
    x = torch.randn(BATCH, TOKENS, heads, p, device=DEVICE, generator=gen)
    dt = F.softplus(torch.randn(BATCH, TOKENS, heads, device=DEVICE, generator=gen) - 2)
    A = -torch.rand(heads, device=DEVICE, generator=gen) * 4 - 0.5
    B, C = (torch.randn(BATCH, TOKENS, g, n, device=DEVICE, generator=gen) for _ in range(2))
    D = torch.randn(heads, device=DEVICE, generator=gen)
    x, B, C = (t.to(dtype).requires_grad_() for t in (x, B, C))
    leaves = [x, dt.requires_grad_(), B, C]
    return (lambda: ssd_scan(x, dt, A, B, C, config.mamba_chunk_size, D, backend=backend)), leaves


def conv_runner(config: HSAHybridConfig, backend: str, dtype: torch.dtype, seed: int) -> Runner:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    channels = config.d_inner + 2 * config.n_groups * config.d_state
    x = torch.randn(BATCH, TOKENS, channels, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(channels, config.d_conv, device=DEVICE, generator=gen).requires_grad_()
    bias = torch.randn(channels, device=DEVICE, generator=gen).requires_grad_()
    calls = {"causal-conv1d": lambda: causal_conv1d_cuda(x, weight, bias),
             "fla": lambda: causal_conv1d_fla(x, weight, bias)}
    return calls.get(backend, lambda: causal_conv1d(x, weight, bias, backend=backend)), [x, weight, bias]


def norm_runner(config: HSAHybridConfig, backend: str, dtype: torch.dtype, seed: int) -> Runner:
    gen = torch.Generator(DEVICE).manual_seed(seed)
    y, z = (torch.randn(BATCH, TOKENS, config.d_inner, device=DEVICE, generator=gen).to(dtype).requires_grad_()
            for _ in range(2))
    weight = torch.randn(config.d_inner, device=DEVICE, generator=gen).requires_grad_()
    group = config.d_inner // config.n_groups
    return (lambda: gated_rms_norm(y, z, weight, group, config.norm_eps, backend=backend)), [y, z, weight]


def layer_runner(config: HSAHybridConfig, backend: str, dtype: torch.dtype, seed: int) -> Runner:
    torch.manual_seed(seed)  # the same weights for every backend
    layer = Mamba2(dataclasses.replace(config, mamba_backend=backend), layer_idx=0).to(DEVICE)
    x = torch.randn(BATCH, TOKENS, config.d_model, device=DEVICE,
                    generator=torch.Generator(DEVICE).manual_seed(seed)).requires_grad_()

    def forward() -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            return layer(x)

    return forward, [x, *layer.parameters()]


MAMBA_ROWS: list[tuple[str, str, str, Callable[..., Runner]]] = [  # (op, backend, kind it needs, runner)
    ("SSD scan", "cuda", "ssd", scan_runner), ("SSD scan", "compile", "ssd", scan_runner),
    ("SSD scan", "torch", "ssd", scan_runner),
    ("causal conv", "causal-conv1d", "", conv_runner), ("causal conv", "fla", "", conv_runner),
    ("causal conv", "compile", "conv", conv_runner), ("causal conv", "torch", "conv", conv_runner),
    ("gated norm", "cuda", "norm", norm_runner), ("gated norm", "compile", "norm", norm_runner),
    ("gated norm", "torch", "norm", norm_runner),
    ("Mamba2 layer", "cuda", "ssd", layer_runner), ("Mamba2 layer", "compile", "ssd", layer_runner),
    ("Mamba2 layer", "torch", "ssd", layer_runner),
]


def conv_package_reason(backend: str) -> str | None:
    module = {"causal-conv1d": ("causal_conv1d", "causal_conv1d_fn"), "fla": ("fla.modules.causal_conv1d",
                                                                               "causal_conv1d")}[backend]
    reason = backends.module_unusable(*module)
    return None if reason is None else "n/a: " + reason.removeprefix("needs ")


def profile_fwd_bwd(name: str, runner: Runner) -> None:
    """Print the top CUDA ops of three forward+backward calls of `runner` (after one untimed call)."""
    fn, leaves = runner
    grad = torch.randn_like(fn())

    def step() -> None:
        torch.autograd.grad(fn(), leaves, grad)

    step()
    log(f"profile of {name}, forward+backward:\n{top_ops(step, calls=3, rows=20)}")


def mamba2_section(bench: Bench, profile: bool = False) -> str:
    config = HSAHybridConfig.preset("small", local_mixer="mamba2")
    rows, baseline = [], {}
    for op, backend, kind, runner in MAMBA_ROWS:
        reason = conv_package_reason(backend) if not kind else why_not(kind, backend)
        if reason:
            rows.append([op, backend, reason, "-", "-", "-"])
            continue
        log(f"mamba2 {op} {backend}")
        check = bench.attempt(f"{op} {backend} check", lambda: grads_error(
            lambda: runner(config, backend, torch.bfloat16, 0), lambda: runner(config, "torch", torch.float32, 0), 1))
        fwd, both = time_fwd_bwd(bench, f"{op} {backend}", lambda: runner(config, backend, torch.bfloat16, 2))
        if profile and op == "Mamba2 layer":
            profile_fwd_bwd(f"{op} {backend}", runner(config, backend, torch.bfloat16, 2))
        if backend == "torch":
            baseline[op] = both
        error = check if isinstance(check, str) else f"{check[0]:.1e} / {check[1]:.1e}"
        rows.append([op, backend, error, fmt(fwd), fmt(both), both])
    for row in rows:
        row[-1] = ratio(baseline.get(row[0], "-"), row[-1]) if row[-1] != "-" else "-"
    header = ["op", "backend", "error (out / grads)", "fwd ms", "fwd+bwd ms", "reference's fwd+bwd / this"]
    return (f"## Mamba2\n\n{BATCH} x {TOKENS} tokens, bf16 (the layer: float32 weights under bf16 autocast), "
            f"the `small` preset's shapes; errors against the reference backend in float32 (relative norm; the "
            "layer's worst gradient includes its parameters').\n\n" + table(header, rows))


def preamble(argv: list[str]) -> str:
    import triton

    return (f"# Local mixers: sliding-window attention and Mamba2 on each backend\n\n"
            f"`python -m benchmarks.mixers {' '.join(argv)}`\n\n{torch.cuda.get_device_name()}, torch "
            f"{torch.__version__}, triton {triton.__version__}, {datetime.date.today()}. Times in ms, medians of "
            "triton.testing.do_bench. Backends found here (`ramba.print_backends()`):\n\n```\n"
            f"{backends.describe('cuda')}\n```")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--lengths", default="4k,16k,32k,128k", help="sequence lengths of the swa section")
    p.add_argument("--rep-ms", type=int, default=100, help="milliseconds of timed repetitions per measurement")
    p.add_argument("--profile", action="store_true", help="print the top CUDA ops of each Mamba2 layer's fwd+bwd")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if set(sections) - set(SECTIONS):
        p.error(f"unknown sections {sorted(set(sections) - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.mixers times GPU kernels and needs a CUDA GPU: torch.cuda.is_available() is "
                         "False here")
    bench = Bench(rep_ms=args.rep_ms, notes=[])
    blocks = [preamble(argv)]
    if "swa" in sections:
        blocks.append(swa_section(bench, [parse_length(n) for n in args.lengths.split(",")]))
    if "mamba2" in sections:
        blocks.append(mamba2_section(bench, args.profile))
    if bench.notes:
        blocks.append("## Errors\n\n" + "\n".join(f"- {note}" for note in bench.notes))
    write_report(blocks, args.out)


if __name__ == "__main__":
    main()
