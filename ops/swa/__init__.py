"""Causal sliding-window attention with GQA and packed documents: reference, flex and flash backends."""

from __future__ import annotations

import torch

from .blocked import swa_cached_blocked
from .flash import swa_flash
from .flex import swa_flex
from .naive import swa_cached_reference, swa_reference

BACKENDS = {"torch": swa_reference, "flex": swa_flex, "flash": swa_flash}

__all__ = ["BACKENDS", "check_inputs", "sliding_window_attention", "swa_cached_blocked", "swa_cached_reference",
           "swa_flash", "swa_flex", "swa_reference"]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                 doc_ids: torch.Tensor | None = None) -> None:
    """Raise ValueError unless q [B, L, HQ, D], k, v [B, L, H, D], HQ % H == 0, window >= 1, doc_ids [B, L]."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, L, heads, head_dim], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must agree on B, L and head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if doc_ids is not None:
        if doc_ids.shape != q.shape[:2]:
            raise ValueError(f"doc_ids must have shape [B, L] = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")
        if doc_ids.is_floating_point() or doc_ids.is_complex():
            raise ValueError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             doc_ids: torch.Tensor | None = None, backend: str = "torch") -> torch.Tensor:
    """Causal sliding-window attention, q [B, L, HQ, D], k, v [B, L, H, D] -> o [B, L, HQ, D].

    backend: "torch" (reference, any device), "flex" (torch flex_attention) or "flash" (flash-attn, CUDA).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    check_inputs(q, k, v, window, doc_ids)
    return BACKENDS[backend](q, k, v, window, doc_ids)
