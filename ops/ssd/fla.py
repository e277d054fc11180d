"""Mamba2's depthwise causal conv through flash-linear-attention's Triton `causal_conv1d` (package fla-core).

Packed documents go through fla's varlen form (`cu_seqlens` over one flattened row). The cached form prepends
the k-1 cached inputs [b, k-1, c] to x rather than passing fla's own state ([N, c, k], oldest first), whose
backward (fla's compute_dh0_kernel) fails in Triton's interpreter, so that CI can test it on a CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..utils.index import DocIndex
from .naive import check_conv_inputs, conv_with_history


def causal_conv1d_fla(x: Tensor, weight: Tensor, bias: Tensor | None = None, docs: DocIndex | None = None, *,
                      initial_state: Tensor | None = None,
                      return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv over time, no activation: x [b, l, c], weight [c, k], bias [c] -> [b, l, c].

    Same contract as `causal_conv1d_ref` and the cached form of `ops.ssd.causal_conv1d`: out_t = bias +
    sum_j weight[:, k-1-j] * x_{t-j}; with `docs` the taps stop at the first token of each document (varlen
    over the flattened batch). Cached form: initial_state [b, k-1, c] holds the k-1 inputs before x; with
    return_final_state, also returns the last min(k-1, inputs seen) inputs [b, <=k-1, c] (initial_state's
    rows included). Documents with the cached form raise ValueError, as in `ops.ssd.causal_conv1d`.
    Accumulates in float32 (float64 inputs too) and returns x's dtype; differentiable in every input.
    """
    try:
        from fla.modules.causal_conv1d import causal_conv1d as fla_causal_conv1d
    except ImportError as err:
        raise ImportError("the 'fla' causal conv backend needs the package 'fla' (flash-linear-attention): "
                          "pip install fla-core, or use backend 'cuda', 'compile' or 'torch'") from err
    check_conv_inputs(x, weight, bias, None if docs is None else docs.starts)
    b, l, c = x.shape
    k = weight.shape[1]
    keep = k - 1
    if (initial_state is not None or return_final_state) and docs is not None:
        raise ValueError("the cached form of causal_conv1d takes no documents: run one per row")
    if initial_state is not None and initial_state.shape != (b, keep, c):
        raise ValueError(f"causal_conv1d: initial_state must be [b, k-1, c] = {(b, keep, c)}, "
                         f"got {tuple(initial_state.shape)}")
    if docs is not None:
        if b * l == 0:
            return x.new_zeros(b, l, c)
        out, _ = fla_causal_conv1d(x.reshape(1, b * l, c), weight, bias, cu_seqlens=docs.cu_seqlens.long())
        return out.reshape(b, l, c)
    # the cached form runs on the inputs before x and x together, as the reference does: fla's own conv state
    # would save this copy of x, but its initial-state backward cannot run in Triton's interpreter (CI)
    def conv(history: Tensor) -> Tensor:
        return fla_causal_conv1d(history, weight, bias)[0] if history.shape[0] * history.shape[1] else \
            torch.zeros_like(history)

    return conv_with_history(conv, x, k, initial_state, return_final_state)
