"""Mamba2's ops on CUDA: mamba_ssm's Triton SSD scan, state update and gated RMSNorm, and the causal-conv1d
CUDA kernels. Same signatures and results as the references in naive.py; the modules come from
`ops.backends.load` (mamba_ssm without running its `__init__` where that needs a missing extension).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..backends import load
from .naive import causal_conv1d_ref, conv_with_history


def _require_cuda(op: str, *tensors: Tensor) -> None:
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"}:
        raise RuntimeError(f"{op} runs on CUDA tensors only, got tensors on {sorted(devices)}")


def ssd_scan_cuda(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                  D: Tensor | None = None, seq_idx: Tensor | None = None, *, initial_state: Tensor | None = None,
                  return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """`naive.ssd_scan_ref` through `mamba_chunk_scan_combined`; x: [b, l, h, p], dt: [b, l, h] (after
    softplus), A: [h], B, C: [b, l, g, n], D: [h], seq_idx: int32 [b, l] document index, initial_state
    [b, h, p, n] -> y [b, l, h, p] in x's dtype (and the final state [b, h, p, n] in float32)."""
    ssd = load("ssd", "cuda")
    _require_cuda("ssd_scan_cuda", x, dt, A, B, C)
    b, l, h, p = x.shape
    if l == 0:
        state = (initial_state if initial_state is not None
                 else x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32))
        return (x.clone(), state.float().clone()) if return_final_state else x.clone()
    out = ssd.mamba_chunk_scan_combined(
        x, dt, A.float(), B, C, chunk_size, D=D, seq_idx=seq_idx,
        initial_states=None if initial_state is None else initial_state.float(),
        return_final_states=return_final_state)
    if return_final_state:
        return out[0].to(x.dtype), out[1].float()
    return out.to(x.dtype)


def ssd_step_cuda(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  state: Tensor) -> tuple[Tensor, Tensor]:
    """`naive.ssd_step` through mamba_ssm's `selective_state_update`: x [b, h, p], dt [b, h] (after softplus),
    A [h], B, C [b, g, n], D [h], state [b, h, p, n] (float32) -> (y [b, h, p] in x's dtype, the new state).
    The state passed in is left as it was."""
    load("ssd", "cuda")  # makes mamba_ssm's Triton modules importable
    update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
    _require_cuda("ssd_step_cuda", x, dt, state)
    b, h, p = x.shape
    n = state.shape[-1]
    new_state = state.clone()
    # stride-0 views over p (and n) take its one-value-per-head kernel; it needs a dt_bias then (zero here)
    dt_bias = dt.new_zeros(h)[:, None].expand(h, p)
    y = update(new_state, x, dt[:, :, None].expand(b, h, p), A.float()[:, None, None].expand(h, p, n),
               B, C, None if D is None else D[:, None].expand(h, p), dt_bias=dt_bias)
    return y.to(x.dtype), new_state


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_start: Tensor | None = None,
                       seq_idx: Tensor | None = None, *, initial_state: Tensor | None = None,
                       return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """`naive.causal_conv1d_ref` through the causal-conv1d kernels; x: [b, l, c], weight: [c, k], bias: [c] ->
    [b, l, c]; documents as seq_start bool [b, l] and seq_idx int32 [b, l]; cached form: initial_state
    [b, k-1, c], and with return_final_state also the last k-1 inputs [b, k-1, c].

    Shapes the kernels cannot take (they need 2 <= k <= 4 and c % 8 == 0 for the channel-last layout that
    documents and states require) run the reference instead."""
    conv = load("conv", "cuda")
    c, k = weight.shape
    b, l, _ = x.shape
    short = return_final_state and initial_state is None and l < k - 1  # the reference keeps fewer than k-1
    if not (2 <= k <= 4 and c % 8 == 0 and l > 0) or short:  # the reference
        if initial_state is None and not return_final_state:
            return causal_conv1d_ref(x, weight, bias, seq_start)
        return conv_with_history(lambda h: causal_conv1d_ref(h, weight, bias), x, k, initial_state,
                                 return_final_state)
    _require_cuda("causal_conv1d_cuda", x, weight)
    if bias is not None:
        bias = bias.to(weight.dtype)
    states = None
    if initial_state is not None:  # [b, k-1, c] -> a channel-last [b, c, k-1] view
        states = initial_state.to(x.dtype).contiguous().transpose(1, 2)
    out = conv.causal_conv1d_fn(x.contiguous().transpose(1, 2), weight, bias, seq_idx=seq_idx,
                                initial_states=states, return_final_states=return_final_state)
    if return_final_state:
        return out[0].transpose(1, 2), out[1].transpose(1, 2)
    return out.transpose(1, 2)


def gated_rms_norm_cuda(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """`naive.gated_rms_norm_ref` through mamba_ssm's Triton `rmsnorm_fn` (gate before the norm):
    y, z [..., dim], weight [dim] -> y's dtype."""
    norm = load("norm", "cuda")
    _require_cuda("gated_rms_norm_cuda", y, z, weight)
    return norm.rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False).to(y.dtype)
