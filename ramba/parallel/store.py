"""One rank's part of a chunk memory sharded across the ranks of a context-parallel group.

Each rank keeps the landmarks and memory keys/values of the chunks it encoded (in a sharded prefill: the chunks
of its own pieces of the prompt), in increasing order of their global index, and `ids`, those global indices.
Retrieval scores queries against the rank's own landmarks only: `local_topk` gives each query's top-k among
them, as global (index, score) pairs, and `merge_topk` picks the global top-k from every rank's proposals with
one process's rule (highest score, ties to the more recent chunk). Aggregation reads only the chunks a rank
holds (`partial_aggregate`): the sum over ranks of these partial outputs is one process's output, since HSA
mixes its chunks' attention outputs with fixed weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ramba.ops import hsa_aggregate, hsa_retrieve
from ramba.ops.retrieve import visible_chunks

from ..config import HSAHybridConfig
from ..memory import ChunkMemory, ChunkStore
from .context import TRAFFIC, _bytes, all_gather_autograd
from .group import ContextParallel


def merge_topk(indices: torch.Tensor, scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of candidate chunks indices, scores [..., M] (global indices, -1 / -inf for empty candidates;
    no index twice) -> indices [..., K] (most recent first, -1 last), scores [..., K] (-inf when empty): the
    highest scores, ties going to the more recent chunk, as hsa_retrieve over all the chunks selects."""
    by_recency = torch.sort(indices, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(scores, -1, by_recency)                         # equal scores: the more recent first
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :topk]
    best = torch.gather(by_recency, -1, order)                            # places in the candidates
    picked = torch.sort(torch.gather(indices, -1, best), dim=-1, descending=True)  # most recent first, -1 last
    picked_scores = torch.gather(torch.gather(scores, -1, best), -1, picked.indices)
    return picked.values, picked_scores.masked_fill(picked.values < 0, float("-inf"))


class ShardedStore(ChunkStore):
    """A ChunkStore holding some of the chunks of a memory sharded across `cp`'s ranks: local slot i of every row
    holds global chunk ids[i]; `total` chunks exist over all ranks. Every row holds the same chunks (a sharded
    cache's rows advance together)."""

    def __init__(self, config: HSAHybridConfig, batch: int, device: torch.device, dtype: torch.dtype, offload: bool,
                 cp: ContextParallel):
        super().__init__(config, batch, device, dtype, offload)
        self.group = cp.group
        self.last = cp.rank + 1 == cp.size
        self.ids = torch.zeros(0, dtype=torch.long, device=device)
        self.total = 0

    def own(self, memory: ChunkMemory, first: int) -> None:
        """Keep the chunks global first .. first + Q - 1 of memory (landmarks [B, Q, Hr, dr], k, v [B, Q*S, H, D]),
        encoded on this rank; every rank then counts the `total` the same way through `grow`."""
        q = memory.landmarks.shape[1]
        super().append(memory, torch.full((self.count.shape[0],), q, device=self.device))
        self.ids = torch.cat([self.ids, torch.arange(first, first + q, device=self.device)])

    def grow(self, chunks: int) -> None:
        """`chunks` more chunks now exist over all ranks."""
        self.total += chunks

    def append(self, memory: ChunkMemory, new: torch.Tensor) -> None:
        """Chunks completed while decoding (the same on every rank): the last rank keeps them."""
        count = int(new.max()) if new.numel() else 0
        if self.last and count:
            self.own(memory, self.total)
        self.grow(count)

    def local_topk(self, qr: torch.Tensor, topk: int, chunk_size: int, positions: torch.Tensor,
                   window: int | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """hsa_retrieve of qr [B, L, Hr, dr] at global positions [B, L] over this rank's chunks: global indices
        [B, L, Hr, K] (-1 for empty slots) and scores (-inf there)."""
        held = int(self.count.max())
        if held == 0:
            shape = (*qr.shape[:3], topk)
            return (torch.full(shape, -1, dtype=torch.long, device=qr.device),
                    torch.full(shape, float("-inf"), dtype=torch.promote_types(qr.dtype, torch.float32),
                               device=qr.device))
        ids = self.ids[:held]
        # the visible chunks are a prefix of the global ones, so of the held ones too: place each query where
        # it sees as many held chunks, in the local numbering
        seen = torch.searchsorted(ids, visible_chunks(positions, chunk_size, self.total, window).contiguous())
        local_positions = seen * chunk_size + (0 if window is None else window - chunk_size)
        local, scores = hsa_retrieve(qr, self.landmarks[:, :held], topk, chunk_size, local_positions, window, backend)
        return torch.where(local >= 0, ids[local.clamp(min=0)], -1), scores

    def retrieve(self, qr: torch.Tensor, topk: int, chunk_size: int, positions: torch.Tensor | None,
                 window: int | None, backend: str, gumbel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """hsa_retrieve over every rank's chunks, for queries qr [B, L, Hr, dr] that every rank holds (decoding;
        collective): each rank proposes its local top-k, one all-gather of (score, index) pairs, the global top-k.
        -> indices [B, L, Hr, K] (global, most recent first, -1 last), scores [B, L, Hr, K]."""
        if gumbel:
            raise ValueError("a sharded cache selects chunks without Gumbel noise: call model.eval() to decode")
        mine, scores = self.local_topk(qr, topk, chunk_size, positions, window, backend)
        pairs = torch.stack([scores.double(), mine.double()], dim=-1)      # exact: indices < 2**53
        parts = all_gather_autograd(pairs, self.group)                      # [P, B, L, Hr, K, 2]
        parts = parts.movedim(0, -2).flatten(-3, -2)                        # [B, L, Hr, P*K, 2]
        indices, picked = merge_topk(parts[..., 1].long(), parts[..., 0], topk)
        return indices, picked.to(scores.dtype)

    def partial_aggregate(self, q: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                          softmax_off_by_one: bool, backend: str) -> torch.Tensor:
        """hsa_aggregate of q [B, L, HQ, D] over the chunks of global indices [B, L, H, K] that this rank holds
        (the others' slots count as empty) -> this rank's part [B, L, HQ, D] of the output."""
        held = int(self.count.max())
        if held == 0:
            return torch.zeros_like(q)
        ids = self.ids[:held]
        local = torch.searchsorted(ids, indices.clamp(min=0).contiguous()).clamp(max=held - 1)
        mine = (indices >= 0) & (ids[local] == indices)
        k, v, local = self.for_aggregate(torch.where(mine, local, -1))
        return hsa_aggregate(q, k, v, local, weights, chunk_size, softmax_off_by_one=softmax_off_by_one,
                             backend=backend, check_indices=False)

    def aggregate(self, q: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                  softmax_off_by_one: bool, backend: str) -> torch.Tensor:
        """For queries that every rank holds (decoding; collective): the partial outputs summed by one
        all-reduce."""
        total = self.partial_aggregate(q, indices, weights, chunk_size, softmax_off_by_one, backend).contiguous()
        dist.all_reduce(total, group=self.group)
        size = dist.get_world_size(self.group)
        TRAFFIC["all_reduce"] += 2 * (size - 1) * _bytes(total) // size
        return total
