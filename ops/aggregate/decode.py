"""Chunk aggregation for one decoded token per row: gather the K selected chunks from the memory buffer and
attend inside each, in fixed-shape tensor work (a decoding step built on it can be captured in a CUDA graph).

The same function as aggregate_reference (naive.py) for L = 1, without its copy of the whole memory: only
the selected chunks are read. On the GPU it runs fused.py's forward kernel (one launch), which also reads a
memory kept in pinned CPU memory in place: an offloaded cache decodes without copying chunks per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import pick, unusable


def host_kv_unsupported(head_dim: int, chunk_size: int, dtype: torch.dtype) -> str | None:
    """Why aggregate_decode on the GPU cannot read keys/values of this shape from pinned CPU memory, or None."""
    why = unusable("ops", "triton")
    if why is not None:
        return f"triton {why}"
    from . import fused

    err = fused.shape_unsupported(head_dim, chunk_size, dtype)
    return None if err is None else str(err)


def aggregate_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     weights: torch.Tensor, chunk_size: int, scale: float,
                     softmax_off_by_one: bool = False, backend: str = "auto") -> torch.Tensor:
    """o[h] = sum_i w[h//G, i] * softmax_j(q[h] . k[c_i*S + j] * scale) v[c_i*S + j] for one query per row.

    q [B, HQ, D]; k, v [B, C*S, H, D]; indices, weights [B, H, K] (-1: an empty slot, which contributes
    nothing and reads nothing) -> o [B, HQ, D] in q's dtype, computed in float32 (float64 stays float64).
    With softmax_off_by_one the softmax denominator gets 1 added. No gradients needed, no device sync.
    k and v may lie in pinned CPU memory while q is on the GPU (an offloaded memory): the Triton kernel reads
    the selected chunks from there. backend: "auto" (Triton for CUDA queries of the shapes it takes, else
    PyTorch), "triton" or "torch".
    """
    if not indices.shape[-1] or not k.shape[1]:  # no slot or no chunk: nothing to attend to
        return torch.zeros_like(q)
    host_kv = q.device.type == "cuda" and k.device.type == "cpu"
    if pick("ops", backend, q.device) == "triton":
        from . import fused

        q1, idx, w = q[:, None], indices[:, None].contiguous(), weights[:, None].to(torch.float32).contiguous()
        err = fused.unsupported(q1, k, v, idx, w, chunk_size, host_kv=True)
        if err is None:
            q1, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q1, k, v))
            return fused.run_forward(q1, k, v, idx, w, chunk_size, float(scale), bool(softmax_off_by_one))[0][:, 0]
        if backend == "triton" or host_kv:
            raise err
    if host_kv:
        raise RuntimeError("aggregate_decode: k and v in CPU memory with q on the GPU take the Triton backend "
                           "(the PyTorch one cannot read them there): pass backend='auto' or 'triton'")
    B, HQ, D = q.shape
    H, S = k.shape[2], chunk_size
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
