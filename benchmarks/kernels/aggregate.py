"""HSA aggregation: random causal selections, FLOP and byte counts, the baselines, the timed section (training
shapes and decoding) and the check against a float64 reference."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.kernels.harness import (DEVICE, DTYPE, TOL, Bench, Cell, D, K, Runner, S, dtype_name, fmt, generator,
                                        inference, log, pair, percent, ratio, rel_err, table, time_fwd_bwd, tokens)
from benchmarks.kernels.retrieve import DR, retrieval_case
from ramba.ops import hsa_aggregate
from ramba.ops.aggregate import aggregate_decode, aggregate_reference
from ramba.ops.retrieve import retrieve_decode, visible_chunks

THIRDPARTY = Path(__file__).resolve().parents[2] / ".thirdparty"
INDEX_BYTES, WEIGHT_BYTES = 8, 4  # int64 indices, float32 weights


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


def static_decode_ops(bench: Bench, B: int, C: int, gen: torch.Generator,
                      pinned: bool) -> dict[str, dict[str, tuple[Cell, Cell]]]:
    """The static decoder's ops (retrieve_decode over a full landmark buffer, then aggregate_decode), Triton
    ("ours") and PyTorch ("reference"); with `pinned`, also the aggregation reading k, v from pinned CPU memory."""
    count = torch.full((B,), C, device=DEVICE)
    positions = count * S

    def retrieve(backend: str) -> Callable[[], object]:
        qr = torch.randn(B, 1, DR, generator=gen, device=DEVICE).to(DTYPE)
        landmarks = torch.randn(B, C, 1, DR, generator=gen, device=DEVICE).to(DTYPE)
        return lambda: retrieve_decode(qr, landmarks, count, positions, K, S, backend=backend)

    def aggregate(backend: str, host: bool = False) -> Callable[[], object]:
        q = torch.randn(B, 16, D, generator=gen, device=DEVICE).to(DTYPE)
        k, v = (torch.randn(B, C * S, 1, D, generator=gen, device=DEVICE).to(DTYPE) for _ in range(2))
        if host:
            k, v = k.cpu().pin_memory(), v.cpu().pin_memory()
        indices = causal_selection(positions[:, None], 1, K, S, C, gen)[:, 0]
        weights = random_weights(indices, gen)
        return lambda: aggregate_decode(q, k, v, indices, weights, S, D ** -0.5, backend=backend)

    result = {op: {name: inference(bench, f"static {op} {name} B={B} C={C}", lambda: make(backend))
                   for name, backend in (("ours", "triton"), ("reference", "torch"))}
              for op, make in (("retrieve_decode", retrieve), ("aggregate_decode", aggregate))}
    if pinned:
        result["aggregate_decode, k/v in pinned CPU memory"] = {
            "ours": inference(bench, f"static aggregate pinned B={B} C={C}", lambda: aggregate("triton", True)),
            "reference": ("n/a", "n/a")}
    return result


DECODE_CHUNKS = [1 << 14, 1 << 20]  # 1M and 64M tokens of history


def decode_section(bench: Bench, quick: bool) -> str:
    rows = []
    for C in DECODE_CHUNKS[:1] if quick else DECODE_CHUNKS:
        for B in (1, 8):
            log(f"decode B={B} history={tokens(C * S)}")
            gen = generator(B * C)
            ops = {"retrieve": retrieval_case(bench, B, 1, C, gen, True),
                   "aggregate": decode_aggregate(bench, B, C, gen),
                   **static_decode_ops(bench, B, C, gen, pinned=B == 1)}
            for op, r in ops.items():
                rows.append([op, str(B), tokens(C * S), fmt(r["ours"][0]), fmt(r["reference"][0]),
                             ratio(r["reference"][0], r["ours"][0]), fmt(r["ours"][1]), fmt(r["reference"][1])])
    header = ["op", "B", "history tokens", "ours ms", "reference ms", "speed-up", "ours peak GB", "reference peak GB"]
    return (f"## Decoding (1 query token per sequence, HQ=16, H=1, {dtype_name(DTYPE)})\n\n"
            "retrieve, aggregate: hsa_retrieve and hsa_aggregate with L = 1; retrieve_decode, aggregate_decode: the "
            "static decoder's fixed-shape ops over the whole buffer (Triton, against their PyTorch path).\n\n"
            + table(header, rows))


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
