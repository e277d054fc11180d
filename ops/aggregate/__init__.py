"""hsa_aggregate: attention inside the selected chunks, mixed by the retrieval weights."""

from __future__ import annotations

import math

import torch

from ..backends import pick

from .decode import aggregate_decode, host_kv_unsupported
from .naive import aggregate_dense, aggregate_reference

__all__ = ["aggregate_decode", "aggregate_dense", "aggregate_reference", "hsa_aggregate", "host_kv_unsupported"]

# with a memory of at most this many times the K*S selected tokens, the dense formulation is the faster one
DENSE_RATIO = 4
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
           chunk_size: int, check_indices: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"hsa_aggregate: q, k, v must be 4-D ([B, L, HQ, D], [B, Lk, H, D]), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, L, HQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"hsa_aggregate: k and v must both be [B={B}, Lk, H, D={D}], got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    H = k.shape[2]
    if H == 0 or HQ % H:
        raise ValueError(f"hsa_aggregate: query heads ({HQ}) must be a multiple of kv heads ({H})")
    if not isinstance(chunk_size, int) or chunk_size < 1 or k.shape[1] % chunk_size:
        raise ValueError(f"hsa_aggregate: the memory length ({k.shape[1]}) must be a multiple of chunk_size "
                         f"({chunk_size})")
    if indices.dim() != 4 or indices.shape[:3] != (B, L, H) or weights.shape != indices.shape:
        raise ValueError(f"hsa_aggregate: indices and weights must both be [B, L, H, K] = [{B}, {L}, {H}, K], got "
                         f"{tuple(indices.shape)} and {tuple(weights.shape)}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"hsa_aggregate: indices must be a signed integer tensor (int64, int32, int16 or int8: -1 "
                        f"marks an empty slot), got {indices.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v), ("weights", weights)):
        if not t.is_floating_point():
            raise TypeError(f"hsa_aggregate: {name} must be floating point, got {t.dtype}")
    if not check_indices or not indices.numel():
        return
    num_chunks = k.shape[1] // chunk_size
    low, high = torch.stack(torch.aminmax(indices)).tolist()  # the one device sync of the op
    if low < -1 or high >= num_chunks:
        raise IndexError(f"hsa_aggregate: indices must lie in [-1, {num_chunks}) (the memory holds {num_chunks} "
                         f"chunks), got values in [{low}, {high}]")


def hsa_aggregate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
    scale: float | None = None,
    softmax_off_by_one: bool = False,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Attend to the selected chunks and mix the per-chunk outputs with the retrieval weights.

    q: [B, L, HQ, D]; k, v: [B, Lk, H, D] with Lk a multiple of chunk_size; indices, weights: [B, L, H, K]
    (query head h reads kv head h // (HQ // H)). Returns o [B, L, HQ, D] in q's dtype:
    o[t, h] = sum_i weights[t, i] * softmax_j(q[t, h] . k[c_i*S + j] * scale) v[c_i*S + j], the softmax over
    the S tokens of chunk c_i (plus 1 in the denominator with `softmax_off_by_one`); slots with index -1
    contribute nothing. Memory a token does not select never reaches its output or gradients, whatever it holds
    (NaN, inf); a selected chunk that holds a NaN makes the output NaN. scale defaults to 1/sqrt(D).
    Differentiable w.r.t. q, k, v and weights. indices: int64, int32, int16 or int8.
    backend: "auto" (the Triton kernels for CUDA inputs they support, else PyTorch), "triton" or "torch".
    check_indices: raise IndexError for an index outside [-1, C) before any kernel runs. The check waits for
    the device (one sync); pass False for indices from hsa_retrieve. Unchecked, every backend treats such an
    index as an empty slot: nothing reads outside k and v.
    """
    _check(q, k, v, indices, weights, chunk_size, check_indices)
    if indices.dtype in (torch.int16, torch.int8):  # the kernels and torch's scatter take 32 or 64 bits
        indices = indices.long()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if pick("ops", backend, q.device) == "triton":
        from . import fused

        err = fused.unsupported(q, k, v, indices, weights, chunk_size)
        if err is None:
            return fused.aggregate_triton(q, k, v, indices, weights, chunk_size, scale, softmax_off_by_one)
        if backend == "triton":
            raise err
    dense = 0 < k.shape[1] <= DENSE_RATIO * indices.shape[-1] * chunk_size
    impl = aggregate_dense if dense else aggregate_reference
    return impl(q, k, v, indices, weights, chunk_size, scale, softmax_off_by_one)
