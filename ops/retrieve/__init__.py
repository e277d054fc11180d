"""hsa_retrieve: which chunks each token reads, with their landmark scores."""

from __future__ import annotations

import torch

from ..backends import pick

from .decode import retrieve_decode
from .naive import chunk_scores, retrieve_reference, visible_chunks

__all__ = ["chunk_scores", "hsa_retrieve", "retrieve_decode", "retrieve_reference", "visible_chunks"]


def _check(qr: torch.Tensor, landmarks: torch.Tensor, topk: int, chunk_size: int,
           positions: torch.Tensor | None, window: int | None) -> None:
    if qr.dim() != 4 or landmarks.dim() != 4:
        raise ValueError(f"hsa_retrieve: qr must be [B, L, Hr, dr] and landmarks [B, C, Hr, dr], "
                         f"got {tuple(qr.shape)} and {tuple(landmarks.shape)}")
    if qr.shape[0] != landmarks.shape[0] or qr.shape[2:] != landmarks.shape[2:]:
        raise ValueError(f"hsa_retrieve: qr {tuple(qr.shape)} and landmarks {tuple(landmarks.shape)} must agree "
                         f"on batch, heads and dim")
    if not qr.is_floating_point() or not landmarks.is_floating_point():
        raise TypeError(f"hsa_retrieve: qr and landmarks must be floating point, got {qr.dtype}, {landmarks.dtype}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"hsa_retrieve: topk must be a positive integer, got {topk!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"hsa_retrieve: chunk_size must be a positive integer, got {chunk_size!r}")
    if window is not None and (not isinstance(window, int) or window < chunk_size):
        raise ValueError(f"hsa_retrieve: window must be an integer >= chunk_size ({chunk_size}), got {window!r}")
    if positions is not None:
        if positions.shape != qr.shape[:2]:
            raise ValueError(f"hsa_retrieve: positions must be [B, L] = {tuple(qr.shape[:2])}, "
                             f"got {tuple(positions.shape)}")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"hsa_retrieve: positions must be an integer tensor, got {positions.dtype}")


def hsa_retrieve(
    qr: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    chunk_size: int,
    positions: torch.Tensor | None = None,
    window: int | None = None,
    backend: str = "auto",
    *,
    gumbel: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select, for every query, the `topk` visible chunks with the highest landmark scores.

    qr: [B, L, Hr, dr]; landmarks: [B, C, Hr, dr]; positions: [B, L] absolute token positions
    (default arange(L)). Chunk c is visible to position p iff (c+1)*chunk_size <= p, and with `window`
    also iff (c+1)*chunk_size <= p - window + chunk_size.
    Returns indices [B, L, Hr, K] (int64, -1 for empty slots; most recent chunk first, empty slots last)
    and scores [B, L, Hr, K] (qr . lmk / sqrt(dr), float32 or wider, -inf for empty slots), differentiable w.r.t.
    qr and landmarks. `gumbel` > 0 perturbs the selection (not the returned scores) with Gumbel noise.
    A landmark a token cannot see never reaches its indices, scores or gradients, whatever it holds (NaN, inf).
    """
    _check(qr, landmarks, topk, chunk_size, positions, window)
    if positions is None:
        positions = torch.arange(qr.shape[1], device=qr.device).expand(qr.shape[0], -1)
    if pick("ops", backend, qr.device) == "triton":
        from . import fused

        reason = fused.unsupported(qr, landmarks, topk, gumbel)
        if reason is None:
            return fused.retrieve_triton(qr, landmarks, topk, chunk_size, positions, window, gumbel)
        if backend == "triton":
            raise ValueError(f"hsa_retrieve: the triton backend cannot run these inputs: {reason}")
    return retrieve_reference(qr, landmarks, topk, chunk_size, positions.long(), window, gumbel)
