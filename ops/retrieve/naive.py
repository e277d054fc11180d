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


def chunk_scores(qr: torch.Tensor, landmarks: torch.Tensor, chunk_size: int, positions: torch.Tensor,
                 window: int | None = None) -> torch.Tensor:
    """The landmark score of every chunk for every query, differentiable: qr [B, L, Hr, dr], landmarks
    [B, C, Hr, dr], positions [B, L] -> [B, L, Hr, C] (qr . lmk / sqrt(dr), float32 or wider), -inf for the
    chunks a position cannot see (the visibility of retrieve_reference). For losses over all chunks, not only
    the selected ones (ramba.training.retrieval); its memory grows with L x C."""
    B, L, Hr, dr = qr.shape
    C = landmarks.shape[1]
    dtype = torch.promote_types(qr.dtype, torch.float32)
    scores = divide_by_sqrt_dim(torch.einsum("blhd,bchd->blhc", qr.to(dtype), landmarks.to(dtype)), dr)
    visible = torch.arange(C, device=qr.device) < visible_chunks(positions, chunk_size, C, window)[:, :, None, None]
    return scores.masked_fill(~visible, float("-inf"))


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
    with torch.no_grad():
        scores = divide_by_sqrt_dim(torch.einsum("blhd,bchd->blhc", qr.to(dtype), landmarks.to(dtype)), dr)
    chunk = torch.arange(C, device=qr.device)
    visible = chunk < visible_chunks(positions, chunk_size, C, window)[:, :, None, None]  # [B, L, 1, C]
    ranked = scores
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
    if torch.is_grad_enabled() and (qr.requires_grad or landmarks.requires_grad):
        # gradients through the selected chunks only: a landmark a token cannot see never reaches its gradient
        selected_scores = SelectedScores.apply(qr, landmarks, indices, selected_scores)
    return indices, selected_scores


def _gather(landmarks: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """landmarks [B, C, Hr, dr], indices [B, L, Hr, K] (C >= 1) -> [B, L, Hr, K, dr] in dtype, zeros for the
    empty slots (indices < 0)."""
    B, _, Hr, _ = landmarks.shape
    batch = torch.arange(B, device=indices.device).view(B, 1, 1, 1)
    head = torch.arange(Hr, device=indices.device).view(1, 1, Hr, 1)
    picked = landmarks[batch, indices.clamp(min=0), head].to(dtype)
    return picked.masked_fill((indices < 0)[..., None], 0.0)


class SelectedScores(torch.autograd.Function):
    """qr [B, L, Hr, dr] . landmarks[b, indices, h] / sqrt(dr) -> [B, L, Hr, K] (float32, float64 inputs stay
    float64), -inf where indices < 0; `scores`, when given, are these already (from the selection) and only
    the backward is needed.

    With few chunks (C <= K * dr) dense matmuls over all chunks are faster and take no more memory than the
    gathered [B, L, Hr, K, dr] landmarks; otherwise the landmarks are gathered and gradients index-added.
    Either way a landmark that a token did not select never reaches its gradient: the dense matmul takes
    non-finite landmarks as zeros and gives NaN gradients to the tokens that selected them.
    """

    @staticmethod
    def forward(ctx, qr: torch.Tensor, landmarks: torch.Tensor, indices: torch.Tensor,
                scores: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(qr, landmarks, indices)
        C, dr = landmarks.shape[1], landmarks.shape[3]
        dtype = torch.promote_types(qr.dtype, torch.float32)
        if scores is not None:  # already computed by the selection
            return scores
        if C == 0:
            return torch.full(indices.shape, float("-inf"), dtype=dtype, device=qr.device)
        if C <= indices.shape[-1] * dr:
            every = torch.einsum("blhd,bchd->blhc", qr.to(dtype), landmarks.to(dtype))
            scores = torch.gather(every, -1, indices.clamp(min=0))
        else:
            scores = torch.einsum("blhd,blhkd->blhk", qr.to(dtype), _gather(landmarks, indices, dtype))
        return divide_by_sqrt_dim(scores, dr).masked_fill(indices < 0, float("-inf"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        qr, landmarks, indices = ctx.saved_tensors
        B, C, Hr, dr = landmarks.shape
        if C == 0:
            return torch.zeros_like(qr), torch.zeros_like(landmarks), None, None
        dtype = torch.promote_types(qr.dtype, torch.float32)
        grad = grad.to(dtype).masked_fill(indices < 0, 0.0) / math.sqrt(dr)
        want_qr, want_lmk = ctx.needs_input_grad[:2]
        grad_qr = grad_lmk = None
        if C <= indices.shape[-1] * dr:
            every = torch.zeros(*indices.shape[:-1], C, dtype=dtype, device=qr.device)
            every.scatter_add_(-1, indices.clamp(min=0), grad)
            if want_qr:
                lmk = landmarks.to(dtype)
                finite = torch.isfinite(lmk).all(-1, keepdim=True)  # [B, C, Hr, 1]
                grad_qr = torch.einsum("blhc,bchd->blhd", every, torch.where(finite, lmk, 0.0))
                batch = torch.arange(B, device=qr.device).view(B, 1, 1, 1)
                head = torch.arange(Hr, device=qr.device).view(1, 1, Hr, 1)
                reads_bad = (~finite[..., 0][batch, indices.clamp(min=0), head] & (indices >= 0)).any(-1)
                grad_qr = torch.where(reads_bad[..., None], float("nan"), grad_qr).to(qr.dtype)
            if want_lmk:
                grad_lmk = torch.einsum("blhc,blhd->bchd", every, qr.to(dtype)).to(landmarks.dtype)
            return grad_qr, grad_lmk, None, None
        if want_qr:
            grad_qr = torch.einsum("blhk,blhkd->blhd", grad, _gather(landmarks, indices, dtype)).to(qr.dtype)
        if want_lmk:
            batch = torch.arange(B, device=qr.device).view(B, 1, 1, 1)
            head = torch.arange(Hr, device=qr.device).view(1, 1, Hr, 1)
            rows = (batch * C + indices.clamp(min=0)) * Hr + head  # row of landmarks.view(-1, dr)
            contrib = grad[..., None] * qr.to(dtype)[..., None, :]  # [B, L, Hr, K, dr]
            grad_lmk = torch.zeros(B * C * Hr, dr, dtype=dtype, device=qr.device)
            grad_lmk.index_add_(0, rows.reshape(-1), contrib.reshape(-1, dr))
            grad_lmk = grad_lmk.view(B, C, Hr, dr).to(landmarks.dtype)
        return grad_qr, grad_lmk, None, None
