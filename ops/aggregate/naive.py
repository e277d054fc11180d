"""Reference chunk aggregation: gather the selected chunks, attend inside each, mix the slots by weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aggregate_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
    scale: float,
    softmax_off_by_one: bool = False,
) -> torch.Tensor:
    """o[t, h] = sum_i w[t, h//G, i] * softmax_j(q[t, h] . k[c_i*S + j] * scale) v[c_i*S + j].

    q [B, L, HQ, D]; k, v [B, C*S, H, D]; indices, weights [B, L, H, K] -> o [B, L, HQ, D] in q's dtype.
    Slots with index -1 (or any index outside [0, C)) contribute nothing, and memory a token does not select
    never reaches its output or gradients, whatever it holds. Computed in float32 (float64 inputs stay float64).
    Memory is O(selected slots * S * D): this is the ground truth, not the fast path.
    """
    B, L, HQ, D = q.shape
    H, S = k.shape[2], chunk_size
    G = HQ // H
    C = k.shape[1] // S
    dtype = torch.promote_types(q.dtype, torch.float32)
    # one row per selected (token, kv head, slot): empty slots cost nothing, and a chunk no token selects is
    # never read
    b, t, h, slot = ((indices >= 0) & (indices < C)).nonzero(as_tuple=True)
    c = indices[b, t, h, slot]
    kc = k.to(dtype).view(B, C, S, H, D)[b, c, :, h]                           # [n, S, D]
    vc = v.to(dtype).view(B, C, S, H, D)[b, c, :, h]
    qg = q.to(dtype).view(B, L, H, G, D)[b, t, h]                              # [n, G, D]
    logits = qg @ kc.transpose(-1, -2) * scale                                 # [n, G, S]
    if softmax_off_by_one:
        # exp(x_j) / (1 + sum exp(x)): a zero logit joins the softmax and is dropped
        probs = torch.softmax(F.pad(logits, (0, 1)), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    per_slot = probs @ vc * weights.to(dtype)[b, t, h, slot][:, None, None]    # [n, G, D]
    out = q.new_zeros(B * L * H, G, D, dtype=dtype).index_add(0, (b * L + t) * H + h, per_slot)
    return out.view(B, L, HQ, D).to(q.dtype)


def aggregate_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
    scale: float,
    softmax_off_by_one: bool = False,
) -> torch.Tensor:
    """The same function as aggregate_reference, through scores against every memory token.

    Per-chunk softmax over [B, H, G, L, C, S] scores, each chunk's probabilities scaled by its weight (0 when
    not selected), then one matmul with v. O(B * HQ * L * Lk) memory: faster on CPUs while the memory Lk is
    short next to K * S, quadratic beyond. Every token meets every chunk in these matmuls, so a chunk holding
    NaN or inf takes part as zeros and the tokens that select it get NaN outputs: memory a token does not
    select never reaches its output or gradients.
    """
    B, L, HQ, D = q.shape
    H, S = k.shape[2], chunk_size
    G = HQ // H
    C = k.shape[1] // S
    dtype = torch.promote_types(q.dtype, torch.float32)
    valid = (indices >= 0) & (indices < C)
    slot = torch.where(valid, indices, C)  # column C collects empty slots
    dense_w = torch.zeros(B, L, H, C + 1, dtype=dtype, device=q.device)
    dense_w = dense_w.scatter_add(-1, slot, torch.where(valid, weights.to(dtype), 0.0))
    k, v = k.to(dtype), v.to(dtype)
    finite = torch.isfinite(k) & torch.isfinite(v)  # [B, Lk, H, D]
    k, v = torch.where(finite, k, 0.0), torch.where(finite, v, 0.0)
    bad = ~finite.view(B, C, S, H, D).all(-1).all(2)  # [B, C, H]: the chunk holds a NaN or inf
    bad = F.pad(bad.transpose(1, 2), (0, 1))[:, None].expand(B, L, H, C + 1)  # [B, L, H, C + 1]
    reads_bad = torch.gather(bad, -1, slot).any(-1)  # [B, L, H]
    qh = q.to(dtype).view(B, L, H, G, D).permute(0, 2, 3, 1, 4)  # [B, H, G, L, D]
    kh = k.permute(0, 2, 1, 3)[:, :, None]  # [B, H, 1, Lk, D]
    logits = (qh @ kh.transpose(-1, -2) * scale).view(B, H, G, L, C, S)
    if softmax_off_by_one:
        probs = torch.softmax(F.pad(logits, (0, 1)), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    probs = probs * dense_w[..., :C].permute(0, 2, 1, 3)[:, :, None, :, :, None]
    out = probs.reshape(B, H, G, L, C * S) @ v.permute(0, 2, 1, 3)[:, :, None]  # [B, H, G, L, D]
    out = out.permute(0, 3, 1, 2, 4)  # [B, L, H, G, D]
    out = torch.where(reads_bad[..., None, None], float("nan"), out)
    return out.reshape(B, L, HQ, D).to(q.dtype)
