"""The PyTorch Mamba2 ops through `torch.compile`: Mamba2's path on CUDA when mamba_ssm is not installed.

Same signatures and results as `naive.ssd_scan_ref`, `naive.causal_conv1d_ref` and `gated_rms_norm_ref`: inductor
fuses their elementwise work (decays, masks, dtype casts, conv taps) into a few kernels. Each function is
compiled on its first call; shapes that change from call to call (segments of different lengths) make
torch compile one graph with dynamic sizes.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from .naive import causal_conv1d_ref, gated_rms_norm_ref, ssd_scan_ref


@functools.cache
def _compiled(fn: Callable[..., object]) -> Callable[..., object]:
    return torch.compile(fn)


def ssd_scan_compiled(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                      D: Tensor | None = None, seq_start: Tensor | None = None, initial_state: Tensor | None = None,
                      return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """`naive.ssd_scan_ref`, compiled (shapes and checks there)."""
    return _compiled(ssd_scan_ref)(x, dt, A, B, C, chunk_size, D, seq_start, initial_state=initial_state,
                               return_final_state=return_final_state)


def causal_conv1d_compiled(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                           seq_start: Tensor | None = None) -> Tensor:
    """`naive.causal_conv1d_ref`, compiled: x [b, l, c], weight [c, k], bias [c] -> [b, l, c]."""
    return _compiled(causal_conv1d_ref)(x, weight, bias, seq_start)


def gated_rms_norm_compiled(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """`naive.gated_rms_norm`, compiled: y, z [..., dim], weight [dim] -> y's dtype."""
    return _compiled(gated_rms_norm_ref)(y, z, weight, group_size, eps)
