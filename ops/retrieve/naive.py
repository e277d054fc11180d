"""Reference chunk retrieval: landmark scores, visibility mask and top-k in plain PyTorch."""

from __future__ import annotations

import math

import torch


def visible_chunks(positions: torch.Tensor, chunk_size: int, num_chunks: int, window: int | None) -> torch.Tensor:
    """How many chunks (0, 1, ..., n-1) each position sees; positions: [B, L] -> [B, L] int64.

    Chunk c is visible to position p iff (c+1)*S <= p, and with a window W also iff (c+1)*S <= p - W + S.
    """
    limit = positions if window is None else positions - window + chunk_size
    return torch.div(limit, chunk_size, rounding_mode="floor").clamp(0, num_chunks)


def divide_by_sqrt_dim(scores: torch.Tensor, dr: int) -> torch.Tensor:
    """scores / sqrt(dr), a correctly rounded division on every device (like the kernel's). Dividing a CUDA
    tensor by a Python number multiplies by its reciprocal instead, which can differ in the last bit."""
    return scores / torch.full((), math.sqrt(dr), dtype=scores.dtype, device=scores.device)


def retrieve_reference(
    qr: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    chunk_size: int,
    positions: torch.Tensor,
    window: int | None = None,
    gumbel: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k visible chunks for every query.

    qr [B, L, Hr, dr], landmarks [B, C, Hr, dr], positions [B, L] -> indices [B, L, Hr, K] (int64, -1 for an
    empty slot), scores [B, L, Hr, K] (qr . lmk / sqrt(dr) of the selected chunks, -inf for empty slots).
    Selection keeps the K highest scores, ties going to the more recent chunk; the selected slots are then
    ordered by chunk index, most recent first. `gumbel` > 0 adds Gumbel(0, gumbel) noise to the scores used
    for selection only; the returned scores are noise-free.
    """
    B, L, Hr, dr = qr.shape
    C = landmarks.shape[1]
    dtype = torch.promote_types(qr.dtype, torch.float32)
    scores = divide_by_sqrt_dim(torch.einsum("blhd,bchd->blhc", qr.to(dtype), landmarks.to(dtype)), dr)
    chunk = torch.arange(C, device=qr.device)
    visible = chunk < visible_chunks(positions, chunk_size, C, window)[:, :, None, None]  # [B, L, 1, C]
    ranked = scores.detach()
    if gumbel > 0:
        uniform = torch.rand_like(ranked).clamp_(1e-20, 1.0)
        ranked = ranked - gumbel * torch.log(-torch.log(uniform))
    ranked = ranked.masked_fill(~visible, float("-inf"))
    # stable sort of the reversed chunk axis: equal scores keep the more recent chunk first
    order = torch.sort(ranked.flip(-1), dim=-1, descending=True, stable=True).indices[..., :topk]
    picked = C - 1 - order
    picked_visible = torch.gather(visible.expand(B, L, Hr, C), -1, picked)
    indices = torch.where(picked_visible, picked, -1)
    if indices.shape[-1] < topk:  # fewer chunks than slots
        indices = torch.nn.functional.pad(indices, (0, topk - indices.shape[-1]), value=-1)
    # most recent first, empty slots (-1) last
    indices = torch.sort(indices, dim=-1, descending=True).values
    # one spare column keeps the gather valid when there is no chunk at all
    gathered = torch.gather(torch.nn.functional.pad(scores, (0, 1)), -1, indices.clamp(min=0))
    selected_scores = gathered.masked_fill(indices < 0, float("-inf"))
    return indices, selected_scores
