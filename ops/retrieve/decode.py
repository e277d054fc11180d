"""Retrieval for one decoded token per row over a fixed-capacity landmark buffer, in fixed-shape tensor work.

The same selection as the reference (naive.py): the K highest scores among the visible chunks, ties going to
the more recent chunk, the slots ordered most recent first, -1 in empty slots. It scores every slot of the
buffer and masks the slots not yet filled and the chunks the token cannot see, so that its shapes never depend
on the data: a decoding step built on it can be captured in a CUDA graph. On the GPU the fused Triton kernel
(fused.py) selects instead: one launch that reads the landmarks once, where the PyTorch path makes a float32
copy of the whole buffer and several passes over it at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import pick
from .naive import divide_by_sqrt_dim, visible_chunks


def retrieve_decode(qr: torch.Tensor, landmarks: torch.Tensor, count: torch.Tensor, positions: torch.Tensor,
                    topk: int, chunk_size: int, window: int | None = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k visible chunks for one query per row.

    qr [B, Hr, dr]; landmarks [B, C, Hr, dr], a buffer whose first count[b] slots hold row b's chunks (the rest
    may hold anything); count, positions [B] int64. Chunk c is visible to position p iff c < count and
    (c+1)*S <= p (with `window` also (c+1)*S <= p - window + S). Returns indices [B, Hr, K] (int64, -1 for an
    empty slot; most recent chunk first) and scores [B, Hr, K] (qr . lmk / sqrt(dr) in float32 or wider,
    -inf for empty slots). No gradients, no device sync. backend: "auto" (the Triton kernel for CUDA inputs it
    takes, else PyTorch), "triton" or "torch".
    """
    if pick("ops", backend, qr.device) == "triton":
        from . import fused

        reason = fused.unsupported(qr[:, None], landmarks, topk)
        if reason is None and landmarks.shape[1]:
            # slots from count on are hidden by lowering the position: (c+1)*S <= min(p, count*S + W - S) - W + S
            # holds iff both c < count and the window's own condition do (W - S = 0 without a window)
            shift = 0 if window is None else window - chunk_size
            limited = torch.minimum(positions, count * chunk_size + shift)[:, None]
            indices, scores = fused.retrieve_triton(qr[:, None], landmarks, topk, chunk_size, limited, window)
            return indices[:, 0], scores[:, 0]
        if backend == "triton" and reason is not None:
            raise ValueError(f"retrieve_decode: the triton backend cannot run these inputs: {reason}")
    B, Hr, dr = qr.shape
    C = landmarks.shape[1]
    dtype = torch.promote_types(qr.dtype, torch.float32)
    scores = divide_by_sqrt_dim(torch.einsum("bhd,bchd->bhc", qr.to(dtype), landmarks.to(dtype)), dr)
    chunk = torch.arange(C, device=qr.device)
    seen = torch.minimum(visible_chunks(positions[:, None], chunk_size, C, window)[:, 0], count)
    visible = (chunk < seen[:, None])[:, None]                                      # [B, 1, C]
    ranked = scores.masked_fill(~visible, float("-inf"))
    k = min(topk, C)
    # the k-th highest score; every chunk above it is kept, and of the chunks equal to it the most recent
    kth = ranked.topk(k, dim=-1).values[..., -1:]
    above = ranked > kth
    tied = (ranked == kth) & visible
    tied_from_here = tied.flip(-1).cumsum(-1).flip(-1)                            # tied chunks at or after c
    keep = visible & (above | (tied & (tied_from_here <= k - above.sum(-1, keepdim=True))))
    indices = torch.where(keep, chunk, -1).topk(k, dim=-1).values                 # most recent first, -1 last
    indices = F.pad(indices, (0, topk - k), value=-1)
    selected = torch.gather(F.pad(scores, (0, 1)), -1, indices.clamp(min=0))
    return indices, selected.masked_fill(indices < 0, float("-inf"))
