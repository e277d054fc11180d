"""Packed documents of a [B, L] batch in every form the ops consume, computed in one place.

A document is a run of equal ids within one row. The local mixers need the ids themselves (mask-based SWA),
the positions where documents start (the PyTorch SSD scan and causal conv), mamba_ssm's `seq_idx`, or
flash-attn's cumulative lengths over the flattened batch (`cu_seqlens`). `DocIndex` derives each form on
first use and keeps it, so that every layer of one forward pass shares them.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor


def starts_from_ids(doc_ids: Tensor) -> Tensor:
    """doc_ids [B, L] -> bool [B, L]: True at position 0 and wherever the id differs from the previous one."""
    starts = torch.ones(doc_ids.shape, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def seq_idx_from_starts(seq_start: Tensor | None) -> Tensor | None:
    """bool [B, L] document starts -> contiguous int32 [B, L] document index, as mamba_ssm's `seq_idx`."""
    if seq_start is None:
        return None
    return torch.cumsum(seq_start.to(torch.int32), dim=1, dtype=torch.int32).contiguous()


def cu_seqlens_from_starts(starts: Tensor) -> tuple[Tensor, int]:
    """Cumulative document lengths over the flattened batch (int32 [N + 1]) and the longest document.

    starts: bool [B, L] with every row's position 0 set (each row starts a document)."""
    batch, length = starts.shape
    bounds = torch.cat((starts.flatten().nonzero().flatten(),
                        torch.tensor([batch * length], device=starts.device)))
    return bounds.to(torch.int32), int(bounds.diff().max())


def ids_from_cu_seqlens(cu_seqlens: Tensor, batch: int, length: int) -> Tensor:
    """Document offsets into the flattened batch (int [N + 1]) -> document number of every token, int64 [B, L].

    Raises ValueError unless the offsets rise strictly from 0 to B*L and every row starts a document."""
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [num_docs + 1] of document offsets into the "
                         f"flattened batch, got shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}")
    cu = cu_seqlens.long()
    total = batch * length
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must increase strictly from 0 to B*L = {total}, got {cu.tolist()}")
    row_starts = torch.arange(0, total, length, device=cu.device)
    if not bool(torch.isin(row_starts, cu).all()):
        raise ValueError("cu_seqlens has a document that crosses from one batch row into the next; "
                         "every row must start a document")
    flat = torch.arange(total, device=cu.device)
    return (torch.searchsorted(cu, flat, right=True) - 1).view(batch, length)


class DocIndex:
    """The documents of a [B, L] batch: `ids` [B, L] (integers; a document is a run of equal ids in a row),
    and, derived on first use and then kept, `starts`, `offsets`, `seq_idx`, `cu_seqlens` and `max_seqlen`."""

    def __init__(self, ids: Tensor):
        if ids.dim() != 2:
            raise ValueError(f"doc_ids must be 2-D [B, L], got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor, got {ids.dtype}")
        self.ids = ids

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    @cached_property
    def starts(self) -> Tensor:
        """bool [B, L]: True where a document starts (always at position 0)."""
        return starts_from_ids(self.ids)

    @cached_property
    def offsets(self) -> Tensor:
        """int64 [B, L]: each token's position in its document (0 at every start)."""
        index = torch.arange(self.ids.shape[1], device=self.ids.device)
        return index - torch.where(self.starts, index, 0).cummax(dim=1).values

    @cached_property
    def seq_idx(self) -> Tensor:
        """int32 [B, L]: mamba_ssm's document index of every token."""
        return seq_idx_from_starts(self.starts)

    @cached_property
    def _cu(self) -> tuple[Tensor, int]:
        return cu_seqlens_from_starts(self.starts)

    @property
    def cu_seqlens(self) -> Tensor:
        """int32 [N + 1]: where each document starts in the flattened batch, then B*L."""
        return self._cu[0]

    @property
    def max_seqlen(self) -> int:
        """The longest document's length."""
        return self._cu[1]


def as_doc_index(docs: DocIndex | Tensor | None) -> DocIndex | None:
    """A DocIndex from per-token document ids [B, L] (or one already built, or None)."""
    if docs is None or isinstance(docs, DocIndex):
        return docs
    if not isinstance(docs, Tensor):
        raise TypeError(f"documents must be given as an integer tensor of ids [B, L] or a DocIndex, "
                        f"got {type(docs).__name__}")
    return DocIndex(docs)
