"""An inference cache sharded across the ranks of a context-parallel group: prefill a long prompt in slices,
then decode with every rank reading only its own part of the chunk memory.

`with context_parallel(group): model(ids_slice, cache=cache)` with a fresh `model.new_cache(B)` on every rank,
rank r giving its slice [B, Lr] of the prompt (Lr equal on all ranks, a multiple of chunk_size), runs the
sharded full forward (ramba.parallel.model) and fills the caches: one round of ramba.parallel.prefill, whose
`prefill_sharded` takes a prompt too long for one forward in many rounds. Afterwards:
- each rank's chunk store (a ShardedStore, ramba.parallel.store) holds the landmarks and memory keys/values of
  the chunks it encoded only (here: rank r those of its slice); chunks completed while decoding go to the last
  rank's store;
- every rank holds the mixer states (SWA keys of the last W-1 positions, Mamba2 conv inputs and SSM state) a
  one-process cache holds after the whole prompt: the last rank computes them, then broadcasts them;
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

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .group import ContextParallel, paused
from .model import fingerprint, require_chunk_slices
from .prefill import prefill_round

if TYPE_CHECKING:
    from ..cache import HSACache
    from ..model import HSAHybrid


def check_cache_inputs(cp: ContextParallel, cache: HSACache, chunk_size: int, input_ids: torch.Tensor,
                       attention_mask: bool, labels: bool) -> None:
    """Raise ValueError, on every rank, for a call with a cache that the sharded cache does not take."""
    started = cache.started
    sharded = cache.context_parallel is not None
    mine = torch.tensor([input_ids.shape[1], attention_mask, labels, started, sharded, fingerprint(input_ids)])
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


def forward_cached(model: HSAHybrid, input_ids: torch.Tensor, cache: HSACache,
                   cp: ContextParallel) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The sharded prefill into a fresh cache, or the next tokens [B, L] (the same on every rank) from a sharded
    one: the mixers run as on one process, HSA reads the ShardedStores collectively."""
    if not cache.started:  # one round: every rank's slice at once
        return prefill_round(model, input_ids, cache, 0, cp)
    with paused():
        return model._forward_cached(input_ids, None, cache, input_ids.shape[1])
