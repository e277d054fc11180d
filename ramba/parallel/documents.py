"""Packed documents under context parallelism: each rank's slice of the documents, and their chunk memory.

A document may span several ranks. Every token's document is named by its key, the global position of the
document's first token: unique within a row and the same on every rank holding part of the document. From
the keys alone each rank knows where its documents start, each token's position in its document, and which of
the positions before its slice still belong to its first document (what the local mixers' halos need).

The chunk memory stays per document, as on one process: chunk c of a document covers its tokens
[c*S, (c+1)*S). The rank holding a chunk's last token encodes it, reading the S-1 hidden states before its
slice from the previous rank when the chunk starts there; every rank's chunks are all-gathered with their
(key, c) tags, and each local piece of a document gets the memory of its whole document, in chunk order.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor, nn

from ramba.ops import DocIndex
from ramba.ops.utils import starts_from_ids

from ..documents import DocLayout, build_layout
from ..memory import ChunkMemory
from .context import all_gather_autograd, halo_exchange
from .group import ContextParallel
from .model import IGNORE_INDEX


class SliceDocs(DocIndex):
    """This rank's slice of a batch's documents. ids: the keys [B, Lr] (global position of each token's
    document start); starts bool [B, Lr]: True where a document starts in this slice (False at position 0
    when the first document continues from the previous rank); offsets [B, Lr]: position in the document."""

    def __init__(self, keys: Tensor, starts: Tensor, positions: Tensor):
        super().__init__(keys)
        self.positions = positions
        self.__dict__["starts"] = starts
        self.__dict__["offsets"] = positions[None] - keys

    def with_halo(self, width: int) -> Tensor:
        """Document ids [B, width + Lr] of the `width` positions before the slice, then the slice: the slice's
        first document where it reaches back there, -1 before (another document, whose outputs the caller
        drops)."""
        first = self.ids[:, :1]
        before = self.positions[0] - width + torch.arange(width, device=first.device)
        reaches = ~self.starts[:, :1] & (before[None] >= first)
        return torch.cat([torch.where(reaches, first, -1), self.ids], dim=1)


class ShardedDocLayout(DocLayout):
    """The per-document view of one rank's slice: a row per local piece of a document (`DocLayout.rows`),
    its queries at their positions in the whole document."""

    docs: SliceDocs

    def retrieval_positions(self, positions: Tensor | None) -> Tensor:
        return self._piece_offsets

    @cached_property
    def _piece_offsets(self) -> Tensor:
        """[N, Lmax]: the per-document view's positions in their documents (0 past a piece's end); every HSA
        layer and the memory read them."""
        return self.unpack(self.docs.offsets).clamp(min=0)


def padding_as_documents(attention_mask: Tensor | None, doc_ids: Tensor | None,
                         labels: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Padding (attention_mask 0) kept apart as on one process: doc_ids [B, Lr] become 2 * id on tokens and -1
    on padding (a run of padding is a document of its own and splits the one it interrupts), padding
    positions' labels are ignored, and valid bool [B, Lr] marks the tokens. Every rank must pass a mask, or
    none (the ids must be renamed alike on all ranks, also where a slice has no padding); without one, doc_ids
    and labels come back unchanged."""
    if attention_mask is None:
        return doc_ids, labels, None
    valid = attention_mask != 0
    base = torch.zeros_like(valid, dtype=torch.long) if doc_ids is None else doc_ids.long()
    if labels is not None:
        labels = labels.masked_fill(~valid.to(labels.device), IGNORE_INDEX)
    return torch.where(valid, 2 * base, -1), labels, valid


def shard_documents(doc_ids: Tensor, cp: ContextParallel, valid: Tensor | None = None) -> ShardedDocLayout:
    """doc_ids [B, Lr] (this rank's slice of the batch's ids; runs of equal ids are documents, also across
    the slice boundaries) -> the layout of the slice; valid bool [B, Lr]: the tokens that are not padding (the
    per-document view, hence retrieval, skips padding, as on one process). Collective: one small all-gather of
    [B, 3] integers."""
    batch, length = doc_ids.shape
    device = doc_ids.device
    positions = torch.arange(cp.rank * length, (cp.rank + 1) * length, device=device)
    ids = doc_ids.long()
    starts = starts_from_ids(ids)
    inner = torch.where(starts, positions, -1)
    inner[:, 0] = -1                                                   # the last start after position 0, or -1
    ends = all_gather_autograd(torch.stack([ids[:, 0], ids[:, -1], inner.max(dim=1).values], dim=1),
                               cp.group)                               # [P, B, 3]: first id, last id, last start
    carry = torch.full((batch,), -1, dtype=torch.long, device=device)  # the key of the previous rank's last token
    for rank in range(cp.rank - 1, -1, -1):
        opens = ends[rank, :, 0] != ends[rank - 1, :, 1] if rank > 0 else torch.ones_like(carry, dtype=torch.bool)
        last = torch.where(ends[rank, :, 2] >= 0, ends[rank, :, 2], torch.where(opens, rank * length, -1))
        carry = torch.where(carry >= 0, carry, last)
    if cp.rank > 0:
        starts[:, 0] = ids[:, 0] != ends[cp.rank - 1, :, 1]
    local_keys = torch.where(starts, positions, -1).cummax(dim=1).values
    keys = torch.where(local_keys >= 0, local_keys, carry[:, None])
    docs = SliceDocs(keys, starts, positions)
    if valid is not None and not bool(valid.any()):  # a slice of padding only: no piece of a document
        return ShardedDocLayout(batch, length, docs, torch.full((0, 1), -1, dtype=torch.long, device=device))
    # the rows of the local pieces, as one process lays out documents (a piece starts each slice's row)
    return ShardedDocLayout(batch, length, docs, build_layout((batch, length), device, valid, keys).rows)


def sharded_doc_memory(encoder: nn.Module, h: Tensor, layout: ShardedDocLayout, cp: ContextParallel) -> ChunkMemory:
    """h [B, Lr, d]: the normalised lower output of this rank's slice -> the chunk memory of each local piece of
    a document [N, C, ...] (chunk c of its whole document at slot c, zeros where no chunk is complete yet),
    C the most chunks any local query can see (at least 1)."""
    S = encoder.chunk_size
    batch, length, _ = h.shape
    docs = layout.docs
    ext, _ = halo_exchange(h, S - 1, cp.group)                                         # [B, S-1+Lr, d]
    owned = (docs.offsets + 1) % S == 0                                                # a chunk ends here
    per_row = length // S                                                              # at most, per row
    order = torch.sort(owned.long(), dim=1, descending=True, stable=True).indices[:, :per_row]
    ok = owned.gather(1, order)                                                        # [B, Cr]
    token = order[:, :, None] + torch.arange(S, device=h.device)                      # in ext: t-S+1 .. t
    chunks = ext.gather(1, token.reshape(batch, -1, 1).expand(-1, -1, ext.shape[-1]))  # [B, Cr*S, d]
    mem = encoder(chunks.reshape(batch * per_row, S, -1))                              # one chunk a row
    tags = torch.stack([torch.where(ok, docs.ids.gather(1, order), -1),
                        docs.offsets.gather(1, order) // S], dim=-1)                   # [B, Cr, 2]: key, c
    landmarks = all_gather_autograd(mem.landmarks.reshape(batch, per_row, *mem.landmarks.shape[2:]), cp.group)
    k = all_gather_autograd(mem.k.reshape(batch, per_row, S, *mem.k.shape[2:]), cp.group)
    v = all_gather_autograd(mem.v.reshape(batch, per_row, S, *mem.v.shape[2:]), cp.group)
    tags = all_gather_autograd(tags, cp.group)                                        # [P, B, Cr, 2]

    rows = layout.rows
    piece_row = rows[:, 0] // length                                                   # [N]
    piece_key = docs.ids.flatten()[rows[:, 0]]
    seen = layout.retrieval_positions(None)
    chunks_seen = max(1, int(seen.max()) // S if seen.numel() else 0)
    slot_row = torch.arange(batch, device=h.device)[None, :, None].expand_as(tags[..., 0]).flatten()
    slot_key, slot_chunk = tags[..., 0].flatten(), tags[..., 1].flatten()
    match = ((piece_row[:, None] == slot_row[None]) & (piece_key[:, None] == slot_key[None])
             & (slot_chunk[None] < chunks_seen))                                       # [N, P*B*Cr]
    piece, slot = match.nonzero(as_tuple=True)
    index = torch.full((rows.shape[0], chunks_seen), -1, dtype=torch.long, device=h.device)
    index[piece, slot_chunk[slot]] = slot
    present = (index >= 0).to(h.dtype)

    def select(t: Tensor) -> Tensor:
        flat = t.reshape(-1, *t.shape[3:])[index.clamp(min=0)]                         # [N, C, ...]
        return flat * present.view(*present.shape, *([1] * (flat.dim() - 2)))

    k_sel, v_sel = select(k), select(v)                                                # [N, C, S, H, D]
    return ChunkMemory(landmarks=select(landmarks), k=k_sel.flatten(1, 2), v=v_sel.flatten(1, 2))
