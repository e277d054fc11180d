"""Packed documents and padding: which tokens belong together, and a per-document view for the chunk memory.

The local mixers take `doc_ids` [B, L] (tokens interact only within a run of equal ids). The chunk memory and
retrieval run on a per-document view: every document becomes its own row, starting at position 0, so that
chunks never cross a document boundary and a token only ever retrieves chunks of its own document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DocLayout:
    """Where each document of a [B, L] batch lives.

    doc_ids: [B, L] int64 for the mixers (-1 on padding), or None when every row is one whole document.
    rows: [N, Lmax] flat indices into the B*L tokens of each document's tokens in order (-1 past its end),
    or None for the trivial layout, where the per-document view is the batch itself.
    """

    batch: int
    length: int
    doc_ids: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    @property
    def trivial(self) -> bool:
        return self.rows is None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [N, Lmax, ...], one document a row, zeros past each document's end."""
        if self.rows is None:
            return x
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        out = flat[self.rows.clamp(min=0)]
        mask = (self.rows >= 0).view(*self.rows.shape, *([1] * (x.dim() - 2)))
        return out * mask.to(out.dtype) if out.is_floating_point() else torch.where(mask, out, -1)

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """[N, Lmax, ...] -> [B, L, ...]; padding tokens get zeros (or -1 for integer tensors)."""
        if self.rows is None:
            return y
        keep = self.rows >= 0
        fill = 0 if y.is_floating_point() else -1
        out = y.new_full((self.batch * self.length, *y.shape[2:]), fill)
        out = out.index_copy(0, self.rows[keep], y[keep])
        return out.view(self.batch, self.length, *y.shape[2:])


def _ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
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


def build_layout(
    shape: tuple[int, int],
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> DocLayout:
    """The layout of a [B, L] batch from optional padding mask (1 = token, 0 = padding), per-token document
    ids (documents are runs of equal ids) or cu_seqlens (offsets of the documents in the flattened batch)."""
    batch, length = shape
    if doc_ids is not None and cu_seqlens is not None:
        raise ValueError("give documents either as doc_ids or as cu_seqlens, not both")
    for name, t in (("attention_mask", attention_mask), ("doc_ids", doc_ids)):
        if t is not None and tuple(t.shape) != (batch, length):
            raise ValueError(f"{name} must have the shape of input_ids {(batch, length)}, got {tuple(t.shape)}")
    if doc_ids is not None and (doc_ids.is_floating_point() or doc_ids.dtype == torch.bool):
        raise TypeError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    if cu_seqlens is not None:
        doc_ids = _ids_from_cu_seqlens(cu_seqlens.to(device), batch, length)
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(device) != 0
        if bool(valid.all()):
            valid = None
    if doc_ids is None and valid is None:
        return DocLayout(batch, length)

    ids = torch.zeros(batch, length, dtype=torch.long, device=device) if doc_ids is None else doc_ids.to(device).long()
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    changed = torch.ones_like(valid)
    changed[:, 1:] = (ids[:, 1:] != ids[:, :-1]) | ~valid[:, :-1]
    start = valid & changed
    run = torch.cumsum(start.flatten(), 0).view(batch, length) - 1  # document number of every valid token
    mixer_ids = torch.where(valid, run, -1)
    if not bool(valid.any()):
        raise ValueError("attention_mask masks every token of the batch: nothing to run")
    flat = torch.arange(batch * length, device=device).view(batch, length)
    doc = run[valid]
    first = torch.full((int(doc.max()) + 1,), batch * length, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, doc, flat[valid], reduce="amin")
    pos = flat[valid] - first[doc]
    counts = torch.bincount(doc)
    rows = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=device)
    rows[doc, pos] = flat[valid]
    return DocLayout(batch, length, mixer_ids, rows)
