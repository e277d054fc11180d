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
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from ramba.ops import hsa_aggregate, hsa_retrieve
from ramba.ops.aggregate import aggregate_reference
from ramba.ops.retrieve import visible_chunks

THIRDPARTY = Path(__file__).resolve().parents[1] / ".thirdparty"
DEVICE = "cuda"
SECTIONS = ("check", "aggregate", "retrieve", "decode")
DTYPE = torch.bfloat16  # of q, k, v, qr, landmarks in the timed sections
D, K, S = 64, 8, 64  # head dim, chunks per token, chunk size
DR = 128  # retrieval head dim
INDEX_BYTES, WEIGHT_BYTES = 8, 4  # int64 indices, float32 weights
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # relative norm error (float32 dots run in tf32)

Cell = float | str  # milliseconds, or why there is no number ("OOM", "n/a", "error", "skip")
Runner = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]  # a forward closure and its differentiable leaves
T = TypeVar("T")


# ---------------------------------------------------------------- helpers that need no GPU (tested on CPU)


def causal_selection(positions: torch.Tensor, heads: int, topk: int, chunk_size: int, num_chunks: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random causal chunk indices [B, L, heads, topk] (int64) for the tokens at `positions` [B, L].

    Each (token, head) draws min(topk, n) distinct chunks uniformly among the n chunks complete before it
    (Floyd's sampling), sorted most recent first, with -1 in the empty slots, which come last.
    """
    n = visible_chunks(positions, chunk_size, num_chunks, None)[..., None].expand(*positions.shape, heads)
    picked = torch.full((*n.shape, topk), -1, dtype=torch.long, device=positions.device)
    for i in range(topk):
        top = n - topk + i  # draw from [0, top]; a chunk drawn before is replaced by top itself
        uniform = torch.rand(n.shape, generator=generator, device=positions.device, dtype=torch.float64)
        draw = torch.minimum((uniform * (top + 1)).long(), top)
        repeat = (picked[..., :i] == draw[..., None]).any(-1)
        picked[..., i] = torch.where(top >= 0, torch.where(repeat, top, draw), -1)
    return picked.sort(dim=-1, descending=True).values


def random_weights(indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Softmax weights (float32) over the selected slots of `indices`; 0 in empty slots and empty rows."""
    scores = torch.randn(indices.shape, generator=generator, device=indices.device)
    return torch.softmax(scores.masked_fill(indices < 0, float("-inf")), dim=-1).nan_to_num(0.0)


def aggregate_flops(valid_slots: int, group: int, chunk_size: int, head_dim: int, backward: bool = False) -> int:
    """Matmul FLOPs of chunk aggregation over `valid_slots` selected (token, kv head, slot) triples.

    Per slot and query head the forward does q.K^T and P.V (2 * 2*S*D); the backward five more such products
    (q.K^T again, dO.V^T, P^T.dO, dS.K, dS^T.q), so fwd+bwd = 14*S*D, 3.5 times the forward.
    """
    return valid_slots * group * (14 if backward else 4) * chunk_size * head_dim


def aggregate_bytes(q_elems: int, kv_elems: int, slots: int, elem: int, backward: bool = False) -> int:
    """Fewest bytes moved: q_elems = B*L*HQ*D, kv_elems = B*Lk*H*D (one of k, v), slots = B*L*H*K.

    Forward: read q, k, v, indices, weights once, write o. Backward: read q, dO, k, v, indices, weights,
    write dq, dk, dv, dweights.
    """
    selection = slots * (INDEX_BYTES + WEIGHT_BYTES)
    fwd = 2 * q_elems * elem + 2 * kv_elems * elem + selection
    bwd = 3 * q_elems * elem + 4 * kv_elems * elem + selection + slots * WEIGHT_BYTES
    return fwd + bwd if backward else fwd


# ---------------------------------------------------------------- measuring


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


# ---------------------------------------------------------------- baselines from .thirdparty/


def load_baselines() -> dict[str, Callable | str]:
    """{"FLA NSA": ParallelNSAFunction.apply, "authors": HSA}, or the reason each one is missing."""
    found: dict[str, Callable | str] = {}
    for name, folder, load in (("FLA NSA", "fla", _load_fla), ("authors", "hsa_authors", _load_authors)):
        path = THIRDPARTY / folder
        if not path.is_dir():
            found[name] = f"n/a ({path} missing)"
            continue
        sys.path.insert(0, str(path))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found[name] = load()
        except Exception as e:
            found[name] = f"n/a (import failed: {type(e).__name__}: {e})"
    return found


def _load_fla() -> Callable:
    from fla.ops.nsa.parallel import ParallelNSAFunction

    return ParallelNSAFunction.apply


def _load_authors() -> Callable:
    from hsa_triton import HSA

    return HSA


def baseline_version(folder: str) -> str:
    stamp = THIRDPARTY / folder / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "not found"


# ---------------------------------------------------------------- aggregation


@dataclass
class AggInputs:
    q: torch.Tensor  # [B, L, HQ, D] leaf
    k: torch.Tensor  # [B, L, H, D] leaf
    v: torch.Tensor
    indices: torch.Tensor  # [B, L, H, K] int64, -1 last
    weights: torch.Tensor  # [B, L, H, K] float32 leaf

    @property
    def group(self) -> int:
        return self.q.shape[2] // self.k.shape[2]


def agg_inputs(B: int, L: int, HQ: int, H: int, dtype: torch.dtype, gen: torch.Generator) -> AggInputs:
    """Random q, k, v and a random causal selection with softmax weights, on the GPU."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype).requires_grad_()

    positions = torch.arange(L, device=DEVICE).expand(B, L)
    indices = causal_selection(positions, H, K, S, L // S, gen)
    weights = random_weights(indices, gen).requires_grad_()
    return AggInputs(randn(B, L, HQ, D), randn(B, L, H, D), randn(B, L, H, D), indices, weights)


def run_ours(x: AggInputs, backend: str = "triton") -> Runner:
    """hsa_aggregate, the public op with the backend forced, called as the model calls it: its shape checks run,
    the index range check (a device sync; the model's indices come from hsa_retrieve) does not."""
    leaves = [x.q, x.k, x.v, x.weights]
    return (lambda: hsa_aggregate(x.q, x.k, x.v, x.indices, x.weights, S, backend=backend,
                                  check_indices=False)), leaves


def run_sdpa(x: AggInputs) -> Runner:
    """Dense causal attention over all L keys, on [B, HQ, L, D] with the kv heads expanded."""
    q = x.q.detach().transpose(1, 2).contiguous().requires_grad_()
    k, v = (t.detach().repeat_interleave(x.group, dim=2).transpose(1, 2).contiguous().requires_grad_()
            for t in (x.k, x.v))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


def run_fla(x: AggInputs, nsa: Callable) -> Runner:
    """FLA NSA selected attention on the same chunks: one softmax over them all, no weights; -1 slots skipped."""
    blocks = x.indices.to(torch.int32).contiguous()
    scale = 1.0 / math.sqrt(D)
    return (lambda: nsa(x.q, x.k, x.v, blocks, K, S, scale, None)), [x.q, x.k, x.v]


def run_authors(x: AggInputs, hsa: Callable) -> Runner:
    """The authors' HSA: no -1 allowed, so empty slots read chunk 0 with weight 0, as their model does."""
    indices = x.indices.clamp(min=0).contiguous()
    weights = x.weights.detach().masked_fill(x.indices < 0, 0.0).contiguous().requires_grad_()
    return (lambda: hsa(x.q, x.k, x.v, weights, indices, 0.0, S, 1.0 / math.sqrt(D), 0.0, 0.0)), \
        [x.q, x.k, x.v, weights]


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


AGG_SHAPES = [(8, 4096, 16, 1), (1, 32768, 16, 1), (1, 131072, 16, 1), (2, 16384, 32, 2)]  # B, L, HQ, H
AGG_QUICK = [(8, 4096, 16, 1), (2, 16384, 32, 2)]
AGG_REFERENCE_QUICK = 32768  # --quick skips the reference beyond this many tokens (B * L)


def aggregate_section(bench: Bench, quick: bool, baselines: dict[str, Callable | str],
                      rates: tuple[float, float]) -> str:
    rows = []
    for B, L, HQ, H in AGG_QUICK if quick else AGG_SHAPES:
        label = f"B={B} L={tokens(L)} HQ={HQ} H={H}"
        log(f"aggregate {label}")
        x = agg_inputs(B, L, HQ, H, DTYPE, generator(L + B))
        times = {"ours": time_fwd_bwd(bench, f"ours {label}", lambda: run_ours(x))}
        times["reference"] = ("skip", "skip") if quick and B * L > AGG_REFERENCE_QUICK else \
            time_fwd_bwd(bench, f"reference {label}", lambda: run_ours(x, "torch"))
        times["SDPA"] = time_fwd_bwd(bench, f"SDPA {label}", lambda: run_sdpa(x))
        for name, run in (("FLA NSA", run_fla), ("authors", run_authors)):
            fn = baselines[name]
            times[name] = ("n/a", "n/a") if isinstance(fn, str) else \
                time_fwd_bwd(bench, f"{name} {label}", lambda: run(x, fn))
        rows.append(aggregate_row(label, x, times, rates))
        del x
        torch.cuda.empty_cache()
    header = ["shape", "ours", "reference", "dense SDPA", "FLA NSA", "authors", "ours/authors", "ours/FLA",
              "ours % compute floor", "ours % memory floor"]
    return f"## Aggregation ({dtype_name(DTYPE)}, D={D}, K={K}, S={S}; ms fwd / fwd+bwd)\n\n" + table(header, rows)


def aggregate_row(label: str, x: AggInputs, times: dict[str, tuple[Cell, Cell]],
                  rates: tuple[float, float]) -> list[str]:
    valid = int((x.indices >= 0).sum())
    compute, memory = [], []
    for backward, t in zip((False, True), times["ours"]):
        flops = aggregate_flops(valid, x.group, S, D, backward)
        nbytes = aggregate_bytes(x.q.numel(), x.k.numel(), x.indices.numel(), x.q.element_size(), backward)
        compute.append(percent(flops / rates[0] * 1e3, t))
        memory.append(percent(nbytes / rates[1] * 1e3, t))
    ours = times["ours"]
    return [label] + [pair(*times[n]) for n in ("ours", "reference", "SDPA", "FLA NSA", "authors")] + [
        f"{ratio(ours[0], times['authors'][0])} / {ratio(ours[1], times['authors'][1])}",
        f"{ratio(ours[0], times['FLA NSA'][0])} / {ratio(ours[1], times['FLA NSA'][1])}",
        " / ".join(compute), " / ".join(memory)]


# ---------------------------------------------------------------- retrieval and decoding


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


def retrieval_case(bench: Bench, B: int, L: int, C: int, gen: torch.Generator,
                   reference: bool) -> dict[str, tuple[Cell, Cell]]:
    """Ours and the reference on B x L queries that follow C chunks of history (all of them visible)."""
    def make(backend: str) -> Callable[[], object]:
        qr = torch.randn(B, L, 1, DR, generator=gen, device=DEVICE).to(DTYPE)
        landmarks = torch.randn(B, C, 1, DR, generator=gen, device=DEVICE).to(DTYPE)
        positions = C * S + torch.arange(L, device=DEVICE).expand(B, L)
        return lambda: hsa_retrieve(qr, landmarks, K, S, positions, backend=backend)

    result = {"ours": inference(bench, f"retrieve ours B={B} C={C}", lambda: make("triton"))}
    result["reference"] = inference(bench, f"retrieve reference B={B} C={C}", lambda: make("torch")) \
        if reference else ("skip", "skip")
    return result


RETRIEVE_QUERIES = 4096
RETRIEVE_CHUNKS = [64, 1024, 16384, 1 << 20]  # 4K, 64K, 1M, 64M tokens of history
RETRIEVE_REFERENCE_QUICK = 16384  # --quick skips the reference beyond this many chunks


def retrieve_section(bench: Bench, quick: bool) -> str:
    rows = []
    for C in RETRIEVE_CHUNKS:
        log(f"retrieve {RETRIEVE_QUERIES} queries x {C} chunks")
        reference = not (quick and C > RETRIEVE_REFERENCE_QUICK)
        r = retrieval_case(bench, 1, RETRIEVE_QUERIES, C, generator(C), reference)
        rows.append([f"{tokens(C * S)} ({tokens(C)} chunks)", fmt(r["ours"][0]), fmt(r["ours"][1]),
                     fmt(r["reference"][0]), fmt(r["reference"][1]), ratio(r["reference"][0], r["ours"][0])])
    header = ["history tokens", "ours ms", "ours peak GB", "reference ms", "reference peak GB", "speed-up"]
    return (f"## Retrieval ({RETRIEVE_QUERIES} queries, Hr=1, dr={DR}, K={K}, S={S}, {dtype_name(DTYPE)})\n\n"
            + table(header, rows))


def decode_aggregate(bench: Bench, B: int, C: int, gen: torch.Generator) -> dict[str, tuple[Cell, Cell]]:
    """One query token per sequence after C chunks of memory: ours and the reference, forward only."""
    def make(backend: str) -> Callable[[], object]:
        q = torch.randn(B, 1, 16, D, generator=gen, device=DEVICE).to(DTYPE)
        k, v = (torch.randn(B, C * S, 1, D, generator=gen, device=DEVICE).to(DTYPE) for _ in range(2))
        indices = causal_selection(torch.full((B, 1), C * S, device=DEVICE), 1, K, S, C, gen)
        weights = random_weights(indices, gen)
        return lambda: hsa_aggregate(q, k, v, indices, weights, S, backend=backend, check_indices=False)

    return {name: inference(bench, f"decode aggregate {name} B={B} C={C}", lambda: make(backend))
            for name, backend in (("ours", "triton"), ("reference", "torch"))}


DECODE_CHUNKS = [1 << 14, 1 << 20]  # 1M and 64M tokens of history


def decode_section(bench: Bench, quick: bool) -> str:
    rows = []
    for C in DECODE_CHUNKS[:1] if quick else DECODE_CHUNKS:
        for B in (1, 8):
            log(f"decode B={B} history={tokens(C * S)}")
            gen = generator(B * C)
            for op, r in (("retrieve", retrieval_case(bench, B, 1, C, gen, True)),
                          ("aggregate", decode_aggregate(bench, B, C, gen))):
                rows.append([op, str(B), tokens(C * S), fmt(r["ours"][0]), fmt(r["reference"][0]),
                             ratio(r["reference"][0], r["ours"][0]), fmt(r["ours"][1]), fmt(r["reference"][1])])
    header = ["op", "B", "history tokens", "ours ms", "reference ms", "speed-up", "ours peak GB", "reference peak GB"]
    return f"## Decoding (1 query token per sequence, HQ=16, H=1, {dtype_name(DTYPE)})\n\n" + table(header, rows)


# ---------------------------------------------------------------- correctness


AGG_CHECKS = [(2, 2048, 16, 1, torch.bfloat16, False), (1, 1024, 32, 2, torch.bfloat16, True),
              (1, 1024, 16, 1, torch.float32, False)]  # B, L, HQ, H, dtype, softmax_off_by_one


def check_aggregate(B: int, L: int, HQ: int, H: int, dtype: torch.dtype, off_by_one: bool,
                    gen: torch.Generator) -> list[str]:
    """Ours against aggregate_reference in float64: output and the gradients of q, k, v, weights."""
    x = agg_inputs(B, L, HQ, H, dtype, gen)
    leaves = [x.q, x.k, x.v, x.weights]
    out = hsa_aggregate(x.q, x.k, x.v, x.indices, x.weights, S, softmax_off_by_one=off_by_one, backend="triton")
    grad = torch.randn(out.shape, generator=gen, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = aggregate_reference(*ref_leaves[:3], x.indices, ref_leaves[3], S, 1.0 / math.sqrt(D), off_by_one)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    errors = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    ok = all(e < TOL[dtype] for e in errors)  # NaN fails
    case = f"B={B} L={L} HQ={HQ} H={H}" + (" off-by-one" if off_by_one else "")
    return ["aggregate", case, dtype_name(dtype), f"{errors[0]:.1e}",
            "dq {:.1e}, dk {:.1e}, dv {:.1e}, dw {:.1e}".format(*errors[1:]), "pass" if ok else "FAIL"]


RETRIEVE_CHECKS = [(1, 2048, 512), (1, 4096, 1024)]  # B, L, C: split chunk ranges, then one launch per call


def selection_ok(indices: torch.Tensor, n_visible: torch.Tensor, topk: int) -> bool:
    """min(topk, n) chunks among the n visible ones (n_visible [B, L, 1, 1]), distinct, most recent first, -1 last."""
    valid = indices >= 0
    count = valid.sum(-1, keepdim=True) == n_visible.clamp(max=topk)
    ordered = (indices[..., :-1] > indices[..., 1:]) | ~valid[..., 1:]
    causal = (indices < n_visible) | ~valid
    return bool(count.all() and ordered.all() and causal.all())


def check_retrieve(B: int, L: int, C: int, gen: torch.Generator) -> list[str]:
    """Ours against float64 scores: a valid causal top-k (up to near-ties), its scores and their gradients."""
    qr = torch.randn(B, L, 1, DR, generator=gen, device=DEVICE).bfloat16().requires_grad_()
    landmarks = torch.randn(B, C, 1, DR, generator=gen, device=DEVICE).bfloat16().requires_grad_()
    positions = (torch.arange(L, device=DEVICE) * (C * S // L)).expand(B, L)  # from no chunk visible to all
    indices, scores = hsa_retrieve(qr, landmarks, K, S, positions, backend="triton")
    q64, l64 = (t.detach().double().requires_grad_() for t in (qr, landmarks))
    full = torch.einsum("blhd,bchd->blhc", q64, l64) / math.sqrt(DR)
    n_visible = visible_chunks(positions, S, C, None)[:, :, None, None]  # [B, L, 1, 1]
    valid = indices >= 0
    picked = indices.clamp(min=0)
    want = full.gather(-1, picked)
    lowest = want.detach().masked_fill(~valid, float("inf")).min(-1).values
    hidden = (torch.arange(C, device=DEVICE) >= n_visible).expand_as(full)
    rest = full.detach().masked_fill(hidden, float("-inf")).scatter(-1, picked, float("-inf")).max(-1).values
    gap = float((rest - lowest).clamp(min=0).nan_to_num(0.0).max())  # how far a skipped chunk beats a kept one
    structure = selection_ok(indices, n_visible, K)
    grad = torch.randn(scores.shape, generator=gen, device=DEVICE).masked_fill(~valid, 0.0)
    got = torch.autograd.grad(scores.masked_fill(~valid, 0.0), [qr, landmarks], grad)
    ref = torch.autograd.grad(want.masked_fill(~valid, 0.0), [q64, l64], grad.double())
    errors = [rel_err(scores[valid], want[valid]), gap] + [rel_err(g, r) for g, r in zip(got, ref)]
    ok = structure and errors[0] < 1e-3 and gap < 1e-3 and max(errors[2:]) < TOL[torch.bfloat16]
    return ["retrieve", f"B={B} L={L} C={C} dr={DR}", "bf16", f"{errors[0]:.1e}",
            f"top-k gap {gap:.1e}, causal/distinct/ordered {structure}, dqr {errors[2]:.1e}, dlmk {errors[3]:.1e}",
            "pass" if ok else "FAIL"]


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


# ---------------------------------------------------------------- report


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


def write_report(blocks: list[str], out: Path | None) -> None:
    """Print the markdown blocks as one report, and also write it to `out` when given."""
    report = "\n\n".join(blocks) + "\n"
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)


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
