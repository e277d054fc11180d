"""Helpers shared by the ops: packed-document index math."""

from .index import DocIndex, as_doc_index, cu_seqlens_from_starts, ids_from_cu_seqlens, seq_idx_from_starts, \
    starts_from_ids

__all__ = ["DocIndex", "as_doc_index", "cu_seqlens_from_starts", "ids_from_cu_seqlens", "seq_idx_from_starts",
           "starts_from_ids"]
