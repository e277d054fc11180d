"""Mamba2's ops: the SSD scan, the depthwise causal conv and the gated RMSNorm, in a full and a cached form.

Each entry picks a backend for its kind (`ops.backends`: "ssd", "conv", "norm") and logs it once: "torch" (the
references in naive.py), "compile" (the same functions through `torch.compile`, compiled.py) or "cuda" (the
real kernels, cuda.py: mamba_ssm's Triton SSD scan, state update and gated norm; the causal-conv1d CUDA conv,
or fla-core's Triton conv (fla.py) where causal-conv1d is absent). "auto" takes, on CUDA, the first of
`FAST[kind]` that works here, per op. The cached forms (an initial state in, the final state out, as an
inference cache continues a sequence) run on the same backend; float64 inputs, which the kernels do not take,
run the compiled reference under "auto".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import load, pick
from ..utils.index import DocIndex, seq_idx_from_starts
from .compiled import causal_conv1d_compiled, gated_rms_norm_compiled, ssd_scan_compiled
from .cuda import causal_conv1d_cuda, gated_rms_norm_cuda, ssd_scan_cuda, ssd_step_cuda
from .fla import causal_conv1d_fla
from .naive import (causal_conv1d_ref, causal_conv1d_step, check_conv_inputs, check_scan_inputs, conv_with_history,
                    gated_rms_norm_ref, ssd_scan_ref, ssd_step)

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_step", "gated_rms_norm", "gated_rms_norm_ref",
           "ssd_scan", "ssd_scan_ref", "ssd_step"]


def _starts(seq_start: Tensor | DocIndex | None) -> tuple[Tensor | None, Tensor | None]:
    """(bool [b, l] document starts, int32 [b, l] mamba_ssm seq_idx) of the documents, or (None, None)."""
    if seq_start is None:
        return None, None
    if isinstance(seq_start, DocIndex):
        return seq_start.starts, seq_start.seq_idx
    return seq_start, seq_idx_from_starts(seq_start)


def _choose(kind: str, backend: str, x: Tensor) -> str:
    """`pick`, but "auto" leaves float64 (which the kernels do not take) to the compiled reference."""
    choice = pick(kind, backend, x.device)
    if choice == "cuda" and x.dtype == torch.float64:
        if backend != "auto":
            raise ValueError(f"the 'cuda' {kind} backend does not take float64: use 'compile' or 'torch'")
        return "compile"
    return choice


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
             seq_start: Tensor | DocIndex | None = None, *, initial_state: Tensor | None = None,
             return_final_state: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Mamba2's SSD scan; returns y [b, l, h, p] in x's dtype (and the final state [b, h, p, n]).

    x: [b, l, h, p]; dt: [b, l, h] positive steps (after softplus); A: [h] negative; B, C: [b, l, g, n] (head i
    reads group i // (h // g)); D: [h] skip; seq_start: bool [b, l], True where a document starts (the state
    restarts from zero there), or a DocIndex. Cached form: initial_state [b, h, p, n] (the state before the
    first token) and/or return_final_state; one token with an initial state runs the recurrence (`ssd_step`,
    or mamba_ssm's state update). backend: "auto", "torch", "compile" or "cuda".
    """
    starts, seq_idx = _starts(seq_start)
    check_scan_inputs(x, dt, A, B, C, D, starts)
    choice = _choose("ssd", backend, x)
    if x.shape[1] == 1 and starts is None and initial_state is not None:
        step = ssd_step_cuda if choice == "cuda" else ssd_step
        y, state = step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, initial_state)
        return (y[:, None], state) if return_final_state else y[:, None]
    if choice == "cuda":
        return ssd_scan_cuda(x, dt, A, B, C, chunk_size, D, seq_idx, initial_state=initial_state,
                             return_final_state=return_final_state)
    scan = ssd_scan_compiled if choice == "compile" and x.shape[1] > 1 else ssd_scan_ref
    return scan(x, dt, A, B, C, chunk_size, D, starts, initial_state=initial_state,
                return_final_state=return_final_state)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, seq_start: Tensor | DocIndex | None = None,
                  *, initial_state: Tensor | None = None, return_final_state: bool = False,
                  backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv over time, no activation: x [b, l, c], weight [c, k], bias [c] -> [b, l, c].

    seq_start: bool [b, l] or a DocIndex: taps stop at the first token of each document. Cached form:
    initial_state [b, k-1, c] holds the k-1 inputs before x (zeros: none); with return_final_state, also
    returns the last k-1 inputs [b, k-1, c] for the next call (fewer when fewer were seen). No documents in
    the cached form. backend: "auto", "torch", "compile" or "cuda" (causal-conv1d, else fla-core).
    """
    docs = seq_start if isinstance(seq_start, DocIndex) else None
    starts, seq_idx = _starts(seq_start)
    check_conv_inputs(x, weight, bias, starts)
    cached = initial_state is not None or return_final_state
    if cached and starts is not None:
        raise ValueError("the cached form of causal_conv1d takes no documents: run one per row")
    choice = _choose("conv", backend, x)
    if choice == "cuda":
        if load("conv", "cuda").__name__.startswith("fla"):
            if starts is not None and docs is None:
                docs = DocIndex(starts.long().cumsum(dim=1))
            return causal_conv1d_fla(x, weight, bias, docs, initial_state=initial_state,
                                     return_final_state=return_final_state)
        return causal_conv1d_cuda(x, weight, bias, starts, seq_idx, initial_state=initial_state,
                                  return_final_state=return_final_state)
    if not cached:
        return (causal_conv1d_compiled if choice == "compile" else causal_conv1d_ref)(x, weight, bias, starts)
    conv = causal_conv1d_compiled if choice == "compile" and x.shape[1] > 1 else causal_conv1d_ref
    return conv_with_history(lambda h: conv(h, weight, bias), x, weight.shape[1], initial_state, return_final_state)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float,
                   backend: str = "auto") -> Tensor:
    """Mamba2's output norm, `rmsnorm(y * silu(z)) * weight` over groups of `group_size` channels, in float32
    (float64 for float64 inputs); y, z: [..., dim], weight: [dim] -> y's dtype. backend: "auto", "torch",
    "compile" or "cuda" (mamba_ssm's Triton norm)."""
    choice = _choose("norm", backend, y)
    norm = {"torch": gated_rms_norm_ref, "compile": gated_rms_norm_compiled, "cuda": gated_rms_norm_cuda}[choice]
    return norm(y, z, weight, group_size, eps)
