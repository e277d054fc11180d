"""Chunk aggregation for one decoded token per row: gather the K selected chunks from the memory buffer and
attend inside each, in fixed-shape tensor work (a decoding step built on it can be captured in a CUDA graph).

The same function as aggregate_reference (naive.py) for L = 1, without its copy of the whole memory: only
the selected chunks are read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aggregate_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     weights: torch.Tensor, chunk_size: int, scale: float,
                     softmax_off_by_one: bool = False) -> torch.Tensor:
    """o[h] = sum_i w[h//G, i] * softmax_j(q[h] . k[c_i*S + j] * scale) v[c_i*S + j] for one query per row.

    q [B, HQ, D]; k, v [B, C*S, H, D]; indices, weights [B, H, K] (-1: an empty slot, which contributes
    nothing and reads nothing) -> o [B, HQ, D] in q's dtype, computed in float32 (float64 stays float64).
    With softmax_off_by_one the softmax denominator gets 1 added. No gradients needed, no device sync.
    """
    B, HQ, D = q.shape
    H, K, S = k.shape[2], indices.shape[-1], chunk_size
    C = k.shape[1] // S
    dtype = torch.promote_types(q.dtype, torch.float32)
    valid = (indices >= 0) & (indices < C)                                          # [B, H, K]
    batch = torch.arange(B, device=q.device)[:, None, None]
    head = torch.arange(H, device=q.device)[None, :, None]
    chunk = torch.where(valid, indices, 0)
    empty = ~valid[..., None, None]
    # [B, H, K, S, D]: the advanced indices (batch, chunk, head) come first, the chunk's S tokens after
    kc = k.view(B, C, S, H, D)[batch, chunk, :, head].to(dtype).masked_fill(empty, 0)
    vc = v.view(B, C, S, H, D)[batch, chunk, :, head].to(dtype).masked_fill(empty, 0)
    qg = q.to(dtype).view(B, H, HQ // H, D)
    logits = torch.einsum("bhgd,bhksd->bhgks", qg, kc) * scale
    if softmax_off_by_one:
        probs = torch.softmax(F.pad(logits, (0, 1)), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    per_slot = torch.einsum("bhgks,bhksd->bhgkd", probs, vc)
    w = torch.where(valid, weights.to(dtype), torch.zeros((), dtype=dtype, device=q.device))
    return torch.einsum("bhgkd,bhk->bhgd", per_slot, w).reshape(B, HQ, D).to(q.dtype)
