"""Sliding-window attention of one decoded token per row against a fixed-size buffer of its window's keys."""

from __future__ import annotations

import math

import torch


def swa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """One query per row against the M keys of a buffer (its own key among them), in any order.

    q [B, HQ, D]; k, v [B, M, H, D]; key_valid bool [B, M] (False: an empty slot or padding, never seen; at
    least the query's own key must be valid) -> o [B, HQ, D] in q's dtype, computed in float32 (float64 stays
    float64). Query head h reads kv head h // (HQ // H). Fixed-shape work, no device sync.
    """
    B, HQ, D = q.shape
    H = k.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).view(B, H, HQ // H, D)
    logits = torch.einsum("bhgd,bmhd->bhgm", qg, k.to(dtype)) / math.sqrt(D)
    logits = logits.masked_fill(~key_valid[:, None, None], float("-inf"))
    out = torch.einsum("bhgm,bmhd->bhgd", torch.softmax(logits, dim=-1), v.to(dtype))
    return out.reshape(B, HQ, D).to(q.dtype)
