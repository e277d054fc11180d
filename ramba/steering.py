"""Steering the retrieval, for diagnostics: make every HSA block read given chunks, to tell a selection failure
(the model answers once it reads the right chunk) from a reading failure (it does not, even then)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .layers.hsa import HSA
from .model import HSAHybrid


@contextmanager
def forced_retrieval(model: HSAHybrid, chunks: Sequence[int]) -> Iterator[None]:
    """Inside the block, every HSA block of `model` reads exactly `chunks` (chunk ids of each sequence's
    memory, equally weighted) at every position where at least one of them is complete, instead of its own
    top-k selection; elsewhere its own selection stands (`ramba.layers.hsa.force_selection`). At most
    `config.topk` chunks."""
    ids = sorted({int(c) for c in chunks}, reverse=True)
    if not ids or ids[-1] < 0 or len(ids) > model.config.topk:
        raise ValueError(f"forced_retrieval: give 1 to topk={model.config.topk} chunk ids >= 0, got {list(chunks)}")
    blocks = [m for m in model.modules() if isinstance(m, HSA)]
    if not blocks:
        raise ValueError("forced_retrieval: the model has no HSA blocks (use_hsa is off)")
    forced = torch.tensor(ids, dtype=torch.long)
    for block in blocks:
        block.forced = forced
    try:
        yield
    finally:
        for block in blocks:
            block.forced = None
