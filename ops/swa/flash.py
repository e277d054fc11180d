"""Sliding-window attention through flash-attn (CUDA, fp16/bf16); packed documents go through varlen."""

from __future__ import annotations

import torch


def doc_cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (int32 [N + 1]) and the longest document.

    doc_ids: [B, L]; a document is a run of equal ids within one row.
    """
    batch, length = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    bounds = torch.cat((starts.flatten().nonzero().flatten(),
                        torch.tensor([batch * length], device=doc_ids.device)))
    return bounds.to(torch.int32), int(bounds.diff().max())


def swa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `swa_reference`: q [B, L, HQ, D], k, v [B, L, H, D] -> o [B, L, HQ, D]."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("the 'flash' sliding-window attention backend needs the package 'flash_attn': "
                          "pip install flash-attn, or use backend 'flex' or 'torch'") from err
    batch, length, q_heads, head_dim = q.shape
    if length == 0:
        return torch.empty_like(q)
    window_size = (window - 1, 0)
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    cu_seqlens, max_seqlen = doc_cu_seqlens(doc_ids)
    kv_heads = k.shape[2]
    out = flash_attn_varlen_func(
        q.reshape(batch * length, q_heads, head_dim),
        k.reshape(batch * length, kv_heads, head_dim),
        v.reshape(batch * length, kv_heads, head_dim),
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True, window_size=window_size)
    return out.reshape(batch, length, q_heads, head_dim)
