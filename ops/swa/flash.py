"""Sliding-window attention through flash-attn (CUDA, fp16/bf16): version 4 (`flash_attn.cute`), 3
(`flash_attn_interface`) or 2 (`flash_attn`), whichever imports (see `ops.backends`). Packed documents go
through the varlen call with int32 `cu_seqlens`."""

from __future__ import annotations

import torch

from ..backends import load
from ..utils.index import DocIndex


def swa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              docs: DocIndex | None = None) -> torch.Tensor:
    """q [B, L, HQ, D], k, v [B, M, H, D] -> o [B, L, HQ, D]: query i (key position M - L + i) sees keys j with
    0 <= (M - L + i) - j < window. M = L is the full form (as `swa_reference`), M > L a segment after M - L
    cached keys, all of them real (no padding). `docs` (full form only): the documents, whose `cu_seqlens`
    go to the varlen call."""
    flash = load("swa", "flash")
    batch, length, q_heads, head_dim = q.shape
    if length == 0:
        return torch.empty_like(q)
    options = {"causal": True, "window_size": (window - 1, 0), "softmax_scale": head_dim ** -0.5}
    if docs is None:
        out = flash.flash_attn_func(q, k, v, **options)
    else:
        cu_seqlens = docs.cu_seqlens.to(torch.int32)
        kv_heads = k.shape[2]
        out = flash.flash_attn_varlen_func(
            q.reshape(batch * length, q_heads, head_dim), k.reshape(batch * length, kv_heads, head_dim),
            v.reshape(batch * length, kv_heads, head_dim), cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
            max_seqlen_q=docs.max_seqlen, max_seqlen_k=docs.max_seqlen, **options)
    if isinstance(out, tuple):  # flash-attn 3 and 4 return (out, lse)
        out = out[0]
    return out.reshape(batch, length, q_heads, head_dim)
