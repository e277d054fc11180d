"""Sliding-window attention through torch's flex_attention (compiled on CUDA, eager on CPU)."""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention)


_last_mask: tuple[tuple, torch.Tensor | None, BlockMask] | None = None


def swa_block_mask(window: int, length: int, device: torch.device,
                   doc_ids: torch.Tensor | None = None) -> BlockMask:
    """Block mask for causal attention within `window` and, with doc_ids [B, L], within one document.

    The last mask is reused while the arguments are the same and doc_ids is the same tensor object (not
    modified in place meanwhile), so the SWA layers of one forward pass build it once."""
    global _last_mask
    key = (window, length, device)
    if _last_mask is not None and _last_mask[0] == key and _last_mask[1] is doc_ids:
        return _last_mask[2]
    _last_mask = (key, doc_ids, _build_block_mask(window, length, device, doc_ids))
    return _last_mask[2]


def _build_block_mask(window: int, length: int, device: torch.device, doc_ids: torch.Tensor | None) -> BlockMask:
    """A new block mask (see swa_block_mask)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        visible = (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        if doc_ids is None:
            return visible
        return visible & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    batch = None if doc_ids is None else doc_ids.shape[0]
    return create_block_mask(mask_mod, batch, None, length, length, device=device,
                             _compile=device.type == "cuda")


def swa_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
             doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `swa_reference`: q [B, L, HQ, D], k, v [B, L, H, D] -> o [B, L, HQ, D].

    On CPU flex_attention runs eagerly (forward only: torch has no CPU flex backward).
    """
    length = q.shape[1]
    if length == 0:
        return torch.empty_like(q)
    block_mask = swa_block_mask(window, length, q.device, doc_ids)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if q.device.type == "cuda":
        out = _compiled_flex_attention()(qt, kt, vt, block_mask=block_mask, enable_gqa=True)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(qt, kt, vt, block_mask=block_mask, enable_gqa=True)
    return out.transpose(1, 2)
