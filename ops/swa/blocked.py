"""Sliding-window attention of a segment against its cached keys in one batched call: every query block and
the key band it can see become one row of a single SDPA call, instead of one call per block.

Same semantics as `swa_cached_reference` (naive.py), which loops over the blocks in Python: that loop costs
a dozen small kernel launches per block and dominated long prefills on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import default_block_size


def swa_cached_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, key_valid: torch.Tensor,
                       block_size: int | None = None) -> torch.Tensor:
    """Sliding-window attention of the last L of M positions, for segment-wise inference with a cache.

    q: [B, L, HQ, D] are the queries of key positions M-L .. M-1; k, v: [B, M, H, D] (cached keys first);
    key_valid: bool [B, M], False for empty cache slots and padding. Query i sees key j iff
    0 <= (M - L + i) - j < window and (key_valid[j] or j is the query's own position). Returns [B, L, HQ, D].

    Query block n (block_size queries) sees the band of block_size + window - 1 keys ending at its last
    query; the keys are padded by window - 1 on the left so that every band has that length.
    """
    batch, length, q_heads, dim = q.shape
    total, kv_heads = k.shape[1], k.shape[2]
    if length == 0:
        return torch.empty_like(q)
    block = block_size or default_block_size(window)
    blocks = -(-length // block)
    span = block + window - 1
    offset = total - length
    right = blocks * block - length  # padded queries at the end; their outputs are dropped

    def bands(x: torch.Tensor) -> torch.Tensor:  # [B, M, ...] -> [B, blocks, span, ...] (a copy)
        pad = [0, 0] * (x.dim() - 2) + [window - 1, right]
        padded = F.pad(x, pad)[:, offset:offset + blocks * block + window - 1]
        return padded.unfold(1, span, block).movedim(-1, 2)

    keys, values = bands(k), bands(v)                                          # [B, n, span, H, D]
    visible = bands(key_valid)                                                 # [B, n, span]
    rows = torch.arange(block, device=q.device)[:, None]
    slot = torch.arange(span, device=q.device)[None]
    band = (slot >= rows) & (slot < rows + window)                             # [block, span]
    own = slot == rows + window - 1                                            # the query's own key
    mask = band & (visible[:, :, None] | own)                                  # [B, n, block, span]
    queries = F.pad(q, [0, 0, 0, 0, 0, right]).view(batch, blocks, block, q_heads, dim)
    group = q_heads // kv_heads
    out = F.scaled_dot_product_attention(
        queries.flatten(0, 1).transpose(1, 2),                                 # [B*n, HQ, block, D]
        keys.flatten(0, 1).transpose(1, 2).repeat_interleave(group, dim=1),    # [B*n, HQ, span, D]
        values.flatten(0, 1).transpose(1, 2).repeat_interleave(group, dim=1),
        attn_mask=mask.flatten(0, 1)[:, None])
    return out.transpose(1, 2).reshape(batch, blocks * block, q_heads, dim)[:, :length].to(q.dtype)
