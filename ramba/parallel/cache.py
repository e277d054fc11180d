"""An inference cache sharded across the ranks of a context-parallel group: prefill a long prompt in slices,
then decode with every rank reading only its own part of the chunk memory.

`with context_parallel(group): model(ids_slice, cache=cache)` with a fresh `model.new_cache(B)` on every rank,
rank r giving its slice [B, Lr] of the prompt (Lr equal on all ranks, a multiple of chunk_size), runs the
sharded full forward (ramba.parallel.model) and fills the caches. Afterwards:
- rank r's chunk store holds the landmarks and memory keys/values of its own chunks only, global chunks
  r*Cr .. (r+1)*Cr - 1 (Cr = Lr / chunk_size); chunks completed while decoding go to the last rank's store;
- every rank holds the mixer states (SWA keys of the last W-1 positions, Mamba2 conv inputs and SSM state) a
  one-process cache holds after the whole prompt: the last rank computes them, then broadcasts them once;
- there is no pending partial chunk (the prompt is whole chunks).
Leave new_cache's max_tokens unset here: it would reserve the whole memory on every rank before the prefill
replaces that store with the rank's own, which grows as needed.

Later calls under the same group give every rank the same tokens [B, L] (one when decoding). Every rank runs
the mixers alike (mirrored, no traffic); at each HSA layer each rank scores the query against its own
landmarks and proposes its local top-k (score, global chunk index), one all-gather picks the global top-k with
one process's rule (highest score, ties to the more recent chunk) and weights, each rank attends inside the
selected chunks it owns with those weights, and one all-reduce sums the partial outputs. Per decoded token and
HSA layer each rank receives (P-1) x B x Hr x K x 16 bytes of (score, index) pairs (float64) and all-reduces
B x num_heads x head_dim values (the attention output before o_proj); each call also all-gathers 6 numbers
per rank to check the inputs. Every rank returns the same logits (after the prefill, rank r those of its
slice: the next token comes from the last rank's, broadcast).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ramba.ops import hsa_retrieve

from ..config import HSAHybridConfig
from ..documents import DocLayout
from ..memory import ChunkMemory, ChunkStore
from .context import TRAFFIC, _bytes, _peer, all_gather_autograd
from .group import ContextParallel, paused
from .model import gather_memory, global_positions, require_chunk_slices

if TYPE_CHECKING:
    from ..cache import HSACache
    from ..model import HSAHybrid


class ShardedStore(ChunkStore):
    """A ChunkStore holding the global chunks offset .. offset + count - 1 of each row, one rank's part of a
    sharded cache's memory; HSA reads it through `retrieve`, `for_aggregate` and `combine`."""

    def __init__(self, config: HSAHybridConfig, batch: int, device: torch.device, dtype: torch.dtype, offload: bool,
                 cp: ContextParallel, offset: int):
        super().__init__(config, batch, device, dtype, offload)
        self.group, self.offset = cp.group, offset
        self.last = cp.rank + 1 == cp.size

    def append(self, memory: ChunkMemory, new: torch.Tensor) -> None:
        """Chunks completed after the prefill: the last rank keeps them, the others drop them."""
        if self.last:
            super().append(memory, new)

    def retrieve(self, qr: torch.Tensor, topk: int, chunk_size: int, positions: torch.Tensor | None,
                 window: int | None, backend: str, gumbel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """hsa_retrieve over every rank's chunks (collective): qr [B, L, Hr, dr], positions [B, L] global ->
        indices [B, L, Hr, K] (global, most recent first, -1 last), scores [B, L, Hr, K] (-inf when empty)."""
        if gumbel:
            raise ValueError("a sharded cache selects chunks without Gumbel noise: call model.eval() to decode")
        S = chunk_size
        local, scores = hsa_retrieve(qr, self.retrieval_landmarks(), topk, S, positions - self.offset * S,
                                     window, backend)
        mine = torch.where(local >= 0, local + self.offset, -1)
        pairs = torch.stack([scores.double(), mine.double()], dim=-1)      # exact: indices < 2**53
        parts = all_gather_autograd(pairs, self.group)                      # [P, B, L, Hr, K, 2]
        parts = parts.movedim(0, -2).flatten(-3, -2)                        # [B, L, Hr, P*K, 2]
        indices, candidates = parts[..., 1].long(), parts[..., 0]
        by_recency = torch.sort(indices, dim=-1, descending=True, stable=True).indices
        ranked = torch.gather(candidates, -1, by_recency)                  # equal scores: the more recent first
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :topk]
        best = torch.gather(by_recency, -1, order)                          # places in the candidates
        picked = torch.sort(torch.gather(indices, -1, best), dim=-1, descending=True)  # most recent first, -1 last
        picked_scores = torch.gather(torch.gather(candidates, -1, best), -1, picked.indices)
        return picked.values, picked_scores.masked_fill(picked.values < 0, float("-inf")).to(scores.dtype)

    def for_aggregate(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global chunk indices [B, L, H, K] -> this rank's k, v and the indices of the chunks it holds (-1 for
        the others', which its partial output leaves out)."""
        local = indices - self.offset
        held = (indices >= 0) & (local < self.count.view(-1, *[1] * (indices.dim() - 1)))
        return super().for_aggregate(torch.where(held, local, -1))

    def combine(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of the partial outputs [B, L, ...] (one all-reduce)."""
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=self.group)
        size = dist.get_world_size(self.group)
        TRAFFIC["all_reduce"] += 2 * (size - 1) * _bytes(total) // size
        return total


def shard_store(cache: HSACache, memory: ChunkMemory, cp: ContextParallel) -> None:
    """Give `cache` a ShardedStore holding this rank's chunks of the prompt: memory landmarks [B, Cr, Hr, dr],
    k, v [B, Cr*S, H, D]."""
    chunks = memory.landmarks.shape[1]
    store = ShardedStore(cache.config, cache.batch_size, cache.device, cache.dtype, cache.offload, cp,
                         cp.rank * chunks)
    ChunkStore.append(store, memory, torch.full((cache.batch_size,), chunks, device=cache.device))
    cache.store = store


def share_states(cache: HSACache, cp: ContextParallel) -> None:
    """Broadcast the last rank's mixer states to every rank (they all decode alike)."""
    source = _peer(cp.group, cp.size - 1)
    for state in cache.states:
        for field in dataclasses.fields(state):
            value = getattr(state, field.name)
            if isinstance(value, torch.Tensor):
                value = value.contiguous()
                dist.broadcast(value, source, group=cp.group)
                setattr(state, field.name, value)


def check_cache_inputs(cp: ContextParallel, cache: HSACache, chunk_size: int, input_ids: torch.Tensor,
                       attention_mask: bool, labels: bool) -> None:
    """Raise ValueError, on every rank, for a call with a cache that the sharded cache does not take."""
    started = cache.started
    sharded = cache.context_parallel is not None
    ids = input_ids.long()
    fingerprint = int((ids * torch.arange(1, ids.numel() + 1, device=ids.device).view_as(ids)).sum())
    mine = torch.tensor([input_ids.shape[1], attention_mask, labels, started, sharded, fingerprint])
    parts = [torch.empty_like(mine) for _ in range(cp.size)]
    dist.all_gather(parts, mine, group=cp.group)
    everyone = [part.tolist() for part in parts]
    lengths = [row[0] for row in everyone]
    if any(row[1] for row in everyone):
        raise ValueError("a sharded cache takes no attention_mask: give every row the same number of tokens (rows "
                         "of different lengths, padding, are not supported under context parallelism with a cache)")
    if any(row[2] for row in everyone):
        raise ValueError("labels are not supported with a cache under context parallelism: compute the loss of a "
                         "prompt with the full forward (no cache)")
    if any(row[3] and not row[4] for row in everyone):
        raise ValueError("this cache was filled outside context parallelism: a sharded cache starts empty "
                         "(model.new_cache) and its prompt is prefilled under context_parallel")
    if len({(row[3], row[4]) for row in everyone}) != 1:
        raise ValueError("the ranks' caches disagree (some empty, some prefilled): give every rank a fresh cache for "
                         "the prompt and continue all of them together")
    if not started:
        require_chunk_slices(lengths, chunk_size, "a sharded prefill needs prompt", "prompt")
        return
    if cache.context_parallel.group is not cp.group:
        raise ValueError("this cache is sharded over another process group: continue it under the group that "
                         "prefilled it")
    if len({(row[0], row[5]) for row in everyone}) != 1:
        raise ValueError(f"after a sharded prefill every rank gives the same next tokens, got {lengths} tokens "
                         "(or different ids) on the ranks: broadcast the chosen tokens before the next step")


def prefill(model: HSAHybrid, input_ids: torch.Tensor, cache: HSACache,
            cp: ContextParallel) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's slice [B, Lr] of the prompt through the sharded full forward, filling a fresh cache (what each
    rank then holds: the module docstring). Returns the final hidden states [B, Lr, d] and the retrievals."""
    cache.check(model, input_ids, None, model.embed.weight)
    B, L = input_ids.shape
    positions = global_positions(cp, L, input_ids.device).expand(B, L)
    n_lower = model.config.n_lower_layers
    x = model.embed(input_ids.long())
    for i, block in enumerate(model.lower):  # a mixer under a group with a fresh state fills it (global positions)
        x = block(x, None, cache.states[i], positions)
    memory = None
    if model.encoder is not None:
        local = model.encoder(model.memory_norm(x))
        shard_store(cache, local, cp)
        memory = gather_memory(local, cp)
    x, retrieval = model._run_upper(x, memory, DocLayout(B, L), None, cache.states[n_lower:], positions, None)
    share_states(cache, cp)
    cache.lengths += L * cp.size
    cache.context_parallel = cp
    return x, retrieval


def forward_cached(model: HSAHybrid, input_ids: torch.Tensor, cache: HSACache,
                   cp: ContextParallel) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The sharded prefill into a fresh cache, or the next tokens [B, L] (the same on every rank) from a sharded
    one: the mixers run as on one process, HSA reads the ShardedStores collectively."""
    if not cache.started:
        return prefill(model, input_ids, cache, cp)
    with paused():
        return model._forward_cached(input_ids, None, cache, input_ids.shape[1])
