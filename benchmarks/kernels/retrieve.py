"""HSA retrieval: the timed section (4K queries against 64 to 1M chunks) and the check against float64 scores."""

from __future__ import annotations

import math

import torch

from benchmarks.kernels.harness import (DEVICE, DTYPE, TOL, Bench, Cell, K, S, dtype_name, fmt, generator, inference,
                                        log, ratio, rel_err, table, tokens)
from ramba.ops import hsa_retrieve
from ramba.ops.retrieve import visible_chunks

DR = 128  # retrieval head dim


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
