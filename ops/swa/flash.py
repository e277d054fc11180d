"""Sliding-window attention through flash-attn (CUDA, fp16/bf16); packed documents go through varlen."""

from __future__ import annotations

import torch

from ..utils.index import DocIndex


def swa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              docs: DocIndex | None = None) -> torch.Tensor:
    """Same contract as `swa_reference`: q [B, L, HQ, D], k, v [B, L, H, D] -> o [B, L, HQ, D]; the documents'
    `cu_seqlens` come from `docs`."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("the 'flash' sliding-window attention backend needs the package 'flash_attn': "
                          "pip install flash-attn, or use backend 'flex' or 'torch'") from err
    batch, length, q_heads, head_dim = q.shape
    if length == 0:
        return torch.empty_like(q)
    window_size = (window - 1, 0)
    if docs is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    cu_seqlens, max_seqlen = docs.cu_seqlens, docs.max_seqlen
    kv_heads = k.shape[2]
    out = flash_attn_varlen_func(
        q.reshape(batch * length, q_heads, head_dim),
        k.reshape(batch * length, kv_heads, head_dim),
        v.reshape(batch * length, kv_heads, head_dim),
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=window_size)
    return out.reshape(batch, length, q_heads, head_dim)
