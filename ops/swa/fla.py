"""Sliding-window attention through flash-linear-attention's Triton `parallel_attn` (package fla-core).

fla's `window_size=W` lets the query at t see the keys t-W+1 .. t, which is exactly ramba's window (a key j is
visible iff 0 <= t - j < W); packed documents go through its varlen form (`cu_seqlens` over one flattened
row). Float32 dots may run in tf32 on the GPU. Head dims up to 256.
"""

from __future__ import annotations

import torch

from ..utils.index import DocIndex


def swa_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
            docs: DocIndex | None = None) -> torch.Tensor:
    """Same contract as `swa_reference`: q [B, L, HQ, D], k, v [B, L, H, D] (HQ % H == 0, query head i reads
    kv head i // (HQ // H)), window >= 1 -> o [B, L, HQ, D] in q's dtype; differentiable. `docs` gives the
    packed documents (tokens of different documents never interact)."""
    try:
        from fla.ops.attn import parallel_attn
    except ImportError as err:
        raise ImportError("the 'fla' sliding-window attention backend needs the package 'fla' "
                          "(flash-linear-attention): pip install fla-core, or use backend 'flash', 'flex' "
                          "or 'torch'") from err
    batch, length, q_heads, head_dim = q.shape
    if head_dim > 256:
        raise ValueError(f"the 'fla' sliding-window attention takes head dims up to 256, got {head_dim}")
    if batch * length == 0:
        return torch.empty_like(q)
    scale = head_dim ** -0.5
    # a longer window sees the same keys; the clip (to a power of two: fla compiles one kernel per window)
    # also keeps the kernel's index arithmetic far from overflow
    window = min(window, 1 << (length - 1).bit_length())
    if docs is None:
        return parallel_attn(q, k, v, scale=scale, window_size=window)
    kv_heads = k.shape[2]
    out = parallel_attn(q.reshape(1, batch * length, q_heads, head_dim),
                        k.reshape(1, batch * length, kv_heads, head_dim),
                        v.reshape(1, batch * length, kv_heads, v.shape[3]),
                        scale=scale, window_size=window, cu_seqlens=docs.cu_seqlens.long())
    return out.reshape(batch, length, q_heads, v.shape[3])
