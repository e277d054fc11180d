"""Packed documents and padding: which tokens belong together, and a per-document view for the chunk memory.

`build_layout` is the one place that works this out, once per forward pass. The local mixers take its
`docs` (a `ramba.ops.DocIndex`: document ids, starts, mamba_ssm's `seq_idx` and flash-attn's `cu_seqlens`, each
derived once and shared by every layer). The chunk memory and retrieval run on a per-document view: every
document becomes its own row, starting at position 0, so that chunks never cross a document boundary and a
token only ever retrieves chunks of its own document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ramba.ops.utils import DocIndex, ids_from_cu_seqlens, starts_from_ids


@dataclass
class DocLayout:
    """Where each document of a [B, L] batch lives.

    docs: the documents for the mixers (ids [B, L] int64, -1 on padding), or None when every row is one
    whole document. rows: [N, Lmax] flat indices into the B*L tokens of each document's tokens in order (-1
    past its end), or None for the trivial layout, where the per-document view is the batch itself.
    """

    batch: int
    length: int
    docs: DocIndex | None = None
    rows: torch.Tensor | None = None

    @property
    def doc_ids(self) -> torch.Tensor | None:
        """The mixers' document ids [B, L] (-1 on padding), or None."""
        return None if self.docs is None else self.docs.ids

    @property
    def trivial(self) -> bool:
        return self.rows is None

    def retrieval_positions(self, positions: torch.Tensor | None) -> torch.Tensor | None:
        """The positions retrieval takes for the per-document rows: the given ones (None: 0 .. in each row)."""
        return positions

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
        doc_ids = ids_from_cu_seqlens(cu_seqlens.to(device), batch, length)
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(device) != 0
        if bool(valid.all()):
            valid = None
    if doc_ids is None and valid is None:
        return DocLayout(batch, length)

    ids = torch.zeros(batch, length, dtype=torch.long, device=device) if doc_ids is None else doc_ids.to(device).long()
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    changed = starts_from_ids(ids)
    changed[:, 1:] |= ~valid[:, :-1]
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
    return DocLayout(batch, length, DocIndex(mixer_ids), rows)
