"""Causal sliding-window attention with GQA and packed documents, in a full and a cached form.

One entry, `sliding_window_attention`: the full form runs on the reference (naive.py), flex attention
(flex.py), flash-attn (flash.py) or fla-core (fla.py); the cached form (a segment against the keys kept by an
inference cache) runs on flash-attn when no key is padding, else as one batched SDPA call (blocked.py),
checked against the loop in naive.py. `swa_decode` (decode.py) is the fixed-shape form of one decoded token
against a buffer of its window's keys, for ramba.decoding.
"""

from __future__ import annotations

import torch

from ..backends import FAST, pick, unusable
from ..utils.index import DocIndex, as_doc_index
from .blocked import swa_cached_blocked
from .decode import swa_decode
from .fla import swa_fla
from .flash import swa_flash
from .flex import swa_flex
from .naive import swa_cached_reference, swa_reference

__all__ = ["check_inputs", "sliding_window_attention", "swa_cached_blocked", "swa_cached_reference", "swa_decode",
           "swa_fla", "swa_flash", "swa_flex", "swa_reference"]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                 docs: DocIndex | None = None, key_valid: torch.Tensor | None = None) -> None:
    """Raise ValueError unless q [B, L, HQ, D], k, v [B, M, H, D] with M >= L, key_valid bool [B, M],
    HQ % H == 0, window >= 1 and the documents [B, L] (full form only)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, L, heads, head_dim], got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or k.shape[1] < q.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must agree on B and head_dim, with at least "
                         "as many keys as queries (as many in the full form)")
    if key_valid is not None and (key_valid.shape != k.shape[:2] or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be bool [B, M] = {tuple(k.shape[:2])}, got {tuple(key_valid.shape)} "
                         f"{key_valid.dtype}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if docs is not None and docs.shape != q.shape[:2]:
        raise ValueError(f"doc_ids must have shape [B, L] = {tuple(q.shape[:2])}, got {tuple(docs.shape)}")
    if docs is not None and (key_valid is not None or k.shape[1] != q.shape[1]):
        raise ValueError("the cached form of sliding_window_attention takes no documents: run one per row")


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             doc_ids: DocIndex | torch.Tensor | None = None, backend: str = "auto", *,
                             key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over the last `window` keys (a key j is visible to the query at t iff 0 <= t - j < window).

    Full form: q [B, L, HQ, D], k, v [B, L, H, D] -> o [B, L, HQ, D]; query head h reads kv head h // (HQ // H);
    doc_ids: integer [B, L] (a document is a run of equal ids: tokens of different documents never interact)
    or a `DocIndex`. backend: "auto" (on CUDA: flash-attn, else flex attention; the reference elsewhere),
    "torch", "flash", "flex" or "fla" (see `ops.backends`); "auto" logs its choice once. flash-attn takes
    float16 and bfloat16 only: "auto" passes other dtypes to the next backend.
    Cached form (k, v longer than q, or key_valid given): k, v [B, M, H, D] hold the cached keys first, then
    the L keys of q's own positions M-L .. M-1; key_valid bool [B, M] is False for empty cache slots and
    padding, which no query sees (a query always sees its own key); None means every key is real. No
    documents in this form. It runs on flash-attn when that is the backend and every key is real, else as
    one batched SDPA call (blocked.py).
    """
    docs = as_doc_index(doc_ids)
    check_inputs(q, k, v, window, docs, key_valid)
    # a longer window sees the same keys, without the cost; rounded up to a power of two so that kernels that
    # compile per window (fla) meet few distinct ones
    window = min(window, 1 << (max(1, k.shape[1]) - 1).bit_length())
    choice = pick("swa", backend, q.device)
    if choice == "flash" and q.dtype not in (torch.float16, torch.bfloat16):
        if backend != "auto":
            raise ValueError(f"the 'flash' backend takes float16 or bfloat16, got {q.dtype}: cast q, k, v, or use "
                             "backend 'flex' or 'torch'")
        choice = next((name for name in FAST["swa"][1:] if unusable("swa", name) is None), "torch")
    if key_valid is not None or k.shape[1] != q.shape[1]:
        if choice == "flash" and (key_valid is None or bool(key_valid.all())):
            return swa_flash(q, k, v, window)
        if key_valid is None:
            key_valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        return swa_cached_blocked(q, k, v, window, key_valid)
    if choice == "flash":
        return swa_flash(q, k, v, window, docs)
    if choice == "fla":
        return swa_fla(q, k, v, window, docs)
    ids = None if docs is None else docs.ids
    return (swa_flex if choice == "flex" else swa_reference)(q, k, v, window, ids)
