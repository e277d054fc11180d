"""Mamba2 ops on CUDA: mamba_ssm's Triton SSD kernels and the causal_conv1d package.

Same signatures and results as `naive.ssd_scan` / `naive.causal_conv1d_ref`. Both packages are imported
lazily, so the library imports without them; the conv falls back to the reference where
causal_conv1d is missing or cannot take the shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .naive import causal_conv1d_ref


def _require_cuda(op: str, *tensors: Tensor) -> None:
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"}:
        raise RuntimeError(f"{op} runs on CUDA tensors only, got tensors on {sorted(devices)}")


def ssd_scan_cuda(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                  D: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """`naive.ssd_scan` through `mamba_chunk_scan_combined`; x: [b, l, h, p], dt: [b, l, h] (after
    softplus), A: [h], B, C: [b, l, g, n], D: [h], seq_idx: int32 [b, l] document index -> y [b, l, h, p]
    in x's dtype."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as err:
        raise ImportError("the CUDA SSD scan needs the package 'mamba_ssm' (pip install 'ramba[cuda]')") from err
    _require_cuda("ssd_scan_cuda", x, dt, A, B, C)
    if x.shape[1] == 0:
        return x.clone()
    y = mamba_chunk_scan_combined(x, dt, A.float(), B, C, chunk_size, D=D, seq_idx=seq_idx)
    return y.to(x.dtype)


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                       seq_start: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """`naive.causal_conv1d_ref` through `causal_conv1d_fn`; x: [b, l, c], weight: [c, k], bias: [c] -> [b, l, c];
    documents as seq_start bool [b, l] (for the reference) and seq_idx int32 [b, l] (for the kernel).

    Uses the reference where causal_conv1d is not installed or its kernel cannot take the shape
    (it needs 2 <= k <= 4 and c % 8 == 0 for the channel-last layout that `seq_idx` requires).
    """
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return causal_conv1d_ref(x, weight, bias, seq_start)
    _require_cuda("causal_conv1d_cuda", x, weight)
    c, k = weight.shape
    if not (2 <= k <= 4 and c % 8 == 0 and x.shape[1] > 0):
        return causal_conv1d_ref(x, weight, bias, seq_start)
    if bias is not None:
        bias = bias.to(weight.dtype)
    out = causal_conv1d_fn(x.contiguous().transpose(1, 2), weight, bias, seq_idx=seq_idx)
    return out.transpose(1, 2)
