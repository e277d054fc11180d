"""Reference sliding-window attention: banded SDPA, one query block at a time, O(L * W) memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_block_size(window: int) -> int:
    """Query block length of the reference: the window, kept between 64 and 512."""
    return max(64, min(window, 512))


def swa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                  doc_ids: torch.Tensor | None = None, block_size: int | None = None) -> torch.Tensor:
    """Causal sliding-window attention; key j is visible to query t iff 0 <= t - j < window, same document.

    q: [B, L, HQ, D]; k, v: [B, L, H, D] with HQ % H == 0 (query head i reads kv head i // (HQ // H));
    doc_ids: optional integer [B, L]. Returns o: [B, L, HQ, D] in q's dtype; differentiable.
    Each block of `block_size` queries attends to keys block_start - window + 1 .. block_end - 1.
    """
    batch, length, q_heads, _ = q.shape
    if length == 0:
        return torch.empty_like(q)
    group = q_heads // k.shape[2]
    block = block_size or default_block_size(window)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    pos = torch.arange(length, device=q.device)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        k_start = max(0, start - window + 1)
        dist = pos[start:end, None] - pos[None, k_start:end]
        mask = (dist >= 0) & (dist < window)
        if doc_ids is not None:
            same = doc_ids[:, start:end, None] == doc_ids[:, None, k_start:end]
            mask = (mask & same)[:, None]
        k_blk = kt[:, :, k_start:end].repeat_interleave(group, dim=1)
        v_blk = vt[:, :, k_start:end].repeat_interleave(group, dim=1)
        outs.append(F.scaled_dot_product_attention(qt[:, :, start:end], k_blk, v_blk, attn_mask=mask))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


def swa_cached_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, key_valid: torch.Tensor,
                         block_size: int | None = None) -> torch.Tensor:
    """Sliding-window attention of the last L of M positions, for segment-wise inference with a cache.

    q: [B, L, HQ, D] are the queries of key positions M-L .. M-1; k, v: [B, M, H, D] (cached keys first);
    key_valid: bool [B, M], False for empty cache slots and padding. Query i sees key j iff
    0 <= (M - L + i) - j < window and (key_valid[j] or j is the query's own position). Returns [B, L, HQ, D].
    """
    batch, length, q_heads, _ = q.shape
    total = k.shape[1]
    if length == 0:
        return torch.empty_like(q)
    group = q_heads // k.shape[2]
    block = block_size or default_block_size(window)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    offset = total - length
    pos = torch.arange(total, device=q.device)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        k_start = max(0, offset + start - window + 1)
        dist = pos[offset + start:offset + end, None] - pos[None, k_start:offset + end]
        band = (dist >= 0) & (dist < window)
        mask = band & (key_valid[:, None, k_start:offset + end] | (dist == 0))
        k_blk = kt[:, :, k_start:offset + end].repeat_interleave(group, dim=1)
        v_blk = vt[:, :, k_start:offset + end].repeat_interleave(group, dim=1)
        outs.append(F.scaled_dot_product_attention(qt[:, :, start:end], k_blk, v_blk, attn_mask=mask[:, None]))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
