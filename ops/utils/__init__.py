"""Helpers shared by the ops: packed-document index math; chunk writes into a memory buffer."""

from .index import DocIndex, as_doc_index, cu_seqlens_from_starts, ids_from_cu_seqlens, seq_idx_from_starts, \
    starts_from_ids
from .store import write_chunks, write_chunks_reference

__all__ = ["DocIndex", "as_doc_index", "cu_seqlens_from_starts", "ids_from_cu_seqlens", "seq_idx_from_starts",
           "starts_from_ids", "write_chunks", "write_chunks_reference"]
