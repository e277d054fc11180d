"""Prefilling a sharded cache round by round, so that a prompt of any length fits: `prefill_sharded`.

A round runs P consecutive pieces of the prompt, one a rank (rank r the r-th), through the context-parallel
forward (ramba.parallel.model) continuing from the cache: every rank holds the same mixer states of the prompt
before the round (broadcast from the last rank after each round), rank 0 continues from them and the others get
their halos and prefix states from the rank before, as in training. The chunk memory stays where it was encoded:
each rank keeps the chunks of its own pieces (a ShardedStore; ranks take turns, so each holds about 1/P of
them). Chunks of the round itself are all-gathered and read locally, as in training; the queries of a round
read the chunks of earlier rounds by dispatch:
- retrieval: the round's retrieval queries are all-gathered; each rank proposes its top-k among its own
  chunks for every query, and one all-to-all of (score, index) pairs brings every query's proposals to the
  rank that holds the query, which picks the global top-k with one process's rule (ramba.parallel.store);
- aggregation: the round's queries and their selected chunks and weights are all-gathered; each rank
  attends inside the selected chunks it holds, and one all-to-all brings the partial outputs back to the
  rank that holds the query, which sums them.
Per token of the prompt and HSA layer a rank receives, in the round's dtype (P-1)/P of: the retrieval query
(Hr x dr values), K x Hr (score, index) pairs (16 bytes each), the query (HQ x D), the selected chunks and
weights (K x H x 16 bytes), the partial output (HQ x D); and the round's chunk memory (2 x H x D values a
token, plus the landmarks) as in training. Peak memory per rank is then that of one piece's forward plus 1/P
of the chunk memory. When every upper block is SWA, the upper stack's receptive field R is finite and the rounds
skip it: only the prompt's last R + 1 positions go through it at the end, on every rank (exact, as the
one-process cache's shortcut).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ramba.ops import hsa_aggregate, hsa_retrieve

from ..documents import DocLayout
from ..memory import ChunkMemory
from .context import TRAFFIC, _bytes, _peer, all_gather_autograd
from .group import ContextParallel, context_parallel, paused
from .model import fingerprint, gather_memory
from .store import ShardedStore, merge_topk

if TYPE_CHECKING:
    from ..cache import HSACache
    from ..model import HSAHybrid


def _gather_rows(t: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """Every rank's t [B, G, ...] side by side: [B, P*G, ...], rank r's at r*G .. (r+1)*G - 1."""
    parts = all_gather_autograd(t.contiguous(), cp.group)                  # [P, B, G, ...]
    return parts.transpose(0, 1).reshape(t.shape[0], -1, *t.shape[2:])


def _return_rows(t: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """t [B, P*G, ...] computed for every rank's queries -> [P, B, G, ...], part s from rank s, for this rank's
    queries (one all-to-all)."""
    B, size = t.shape[0], cp.size
    send = t.reshape(B, size, -1, *t.shape[2:]).transpose(0, 1).contiguous()  # [P, B, G, ...]: part s to rank s
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=cp.group)
    TRAFFIC["all_to_all"] += (size - 1) * _bytes(send) // size
    return received


class RoundMemory:
    """What the queries of one round read (ramba.parallel.prefill): the round's chunks `current` (all-gathered:
    global chunks first .. first + Q - 1, landmarks [B, Q, Hr, dr], k, v [B, Q*S, H, D]) on every rank, and the
    chunks of earlier rounds in the ranks' ShardedStores (`store`, this rank's). Collective, on every rank."""

    def __init__(self, store: ShardedStore, current: ChunkMemory, first: int, cp: ContextParallel):
        self.store, self.current, self.first, self.cp = store, current, first, cp

    def retrieve(self, qr: torch.Tensor, topk: int, chunk_size: int, positions: torch.Tensor | None,
                 window: int | None, backend: str, gumbel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """qr [B, G, Hr, dr] at global positions [B, G] -> indices, scores [B, G, Hr, K] over all chunks."""
        if gumbel:
            raise ValueError("a sharded prefill selects chunks without Gumbel noise: call model.eval() first")
        S = chunk_size
        new, scores = hsa_retrieve(qr, self.current.landmarks, topk, S, positions - self.first * S, window, backend)
        new = torch.where(new >= 0, new + self.first, -1)
        if self.first == 0:  # the first round: no earlier chunks
            return new, scores
        everyone = _gather_rows(qr, self.cp), _gather_rows(positions, self.cp)
        theirs, their_scores = self.store.local_topk(everyone[0], topk, S, everyone[1], window, backend)
        pairs = _return_rows(torch.stack([their_scores.double(), theirs.double()], dim=-1), self.cp)
        pairs = torch.cat([pairs.movedim(0, -2).flatten(-3, -2),                       # [B, G, Hr, P*K, 2]
                           torch.stack([scores.double(), new.double()], dim=-1)], dim=-2)
        indices, picked = merge_topk(pairs[..., 1].long(), pairs[..., 0], topk)
        return indices, picked.to(scores.dtype)

    def aggregate(self, q: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                  softmax_off_by_one: bool, backend: str) -> torch.Tensor:
        """q [B, G, HQ, D], global indices and weights [B, G, H, K] -> [B, G, HQ, D]."""
        options = dict(softmax_off_by_one=softmax_off_by_one, backend=backend, check_indices=False)
        new = torch.where(indices >= self.first, indices - self.first, -1)
        out = hsa_aggregate(q, self.current.k, self.current.v, new, weights, chunk_size, **options)
        if self.first == 0:
            return out
        old = torch.where(indices < self.first, indices, -1)
        everyone = [_gather_rows(t, self.cp) for t in (q, old, weights)]
        partial = self.store.partial_aggregate(*everyone, chunk_size, softmax_off_by_one, backend)
        return out + _return_rows(partial, self.cp).sum(dim=0)


def share_states(cache: HSACache, cp: ContextParallel) -> None:
    """Broadcast the last rank's mixer states to every rank (the next round and decoding start from them)."""
    source = _peer(cp.group, cp.size - 1)
    for state in cache.states:
        for name, value in vars(state).items():
            if isinstance(value, torch.Tensor):
                value = value.contiguous()
                dist.broadcast(value, source, group=cp.group)
                setattr(state, name, value)


def prefill_round(model: HSAHybrid, piece: torch.Tensor, cache: HSACache, start: int, cp: ContextParallel,
                  upper: bool = True) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One round: this rank's piece [B, G] of the prompt, global positions start + r*G .. start + (r+1)*G - 1
    (G equal on every rank, a multiple of chunk_size, at least window - 1 and d_conv - 1), continuing `cache`.
    Returns the final hidden states [B, G, d] and the retrievals of the piece; with upper=False (an all-SWA upper
    stack, rebuilt afterwards by `finish_upper`) the upper stack is skipped: the lower stack's outputs and no
    retrievals."""
    cache.check(model, piece, None, model.embed.weight)
    B, G = piece.shape
    S = model.config.chunk_size
    positions = (start + cp.rank * G + torch.arange(G, device=piece.device)).expand(B, G)
    n_lower = model.config.n_lower_layers
    x = model.embed(piece.long())
    for i, block in enumerate(model.lower):
        x = block(x, None, cache.states[i], positions)
    local = None
    if model.encoder is not None:
        if not isinstance(cache.store, ShardedStore):
            cache.store = ShardedStore(cache.config, B, cache.device, cache.dtype, cache.offload, cp)
        local = model.encoder(model.memory_norm(x))
    retrieval = []
    if upper:
        memory = None if local is None else RoundMemory(cache.store, gather_memory(local, cp), start // S, cp)
        x, retrieval = model._run_upper(x, memory, DocLayout(B, G), None, cache.states[n_lower:], positions, None)
    if local is not None:
        cache.store.own(local, start // S + cp.rank * (G // S))
        cache.store.grow(cp.size * (G // S))
    share_states(cache, cp)
    cache.lengths += G * cp.size
    cache.context_parallel = cp
    return x, retrieval


def last_positions(x: torch.Tensor, tail: torch.Tensor | None, keep: int, cp: ContextParallel) -> torch.Tensor:
    """The last `keep` positions [B, keep', d] of the sequence so far: `tail` (those before this round), then
    every rank's x [B, G, d] of this round in rank order (an all-gather of each rank's last min(keep, G))."""
    recent = _gather_rows(x[:, max(0, x.shape[1] - keep):], cp)
    joined = recent if tail is None else torch.cat([tail, recent], dim=1)
    return joined[:, max(0, joined.shape[1] - keep):]


def finish_upper(model: HSAHybrid, cache: HSACache, context: torch.Tensor, length: int) -> torch.Tensor:
    """An all-SWA upper stack skipped in the rounds, run as the one-process cache runs it (`_forward_cached`): on
    the lower-stack outputs `context` [B, n, d] of the prompt's last n <= R + 1 positions (R its receptive field,
    the same on every rank), from fresh states, reading the sharded memory collectively. Sets the cache's upper
    states and kept context; returns the final hidden state [B, d] of the prompt's last position."""
    B, n, _ = context.shape
    R = model.upper_receptive_field
    positions = (length - n + torch.arange(n, device=context.device)).expand(B, n)
    valid = torch.ones(B, n, dtype=torch.bool, device=context.device)
    fresh = model.allocate_inference_cache(B, cache.device, cache.dtype, upper_only=True)
    with paused():  # every rank holds the same positions: the store's collective decoding form
        x, _ = model._run_upper(context, cache.store, DocLayout(B, n), None, fresh, positions, valid)
    cache.states[model.config.n_lower_layers:] = fresh
    cache.context = tuple(t[:, max(0, n - R):] for t in (context, valid, positions))
    cache.upper_stale = False
    return x[:, -1]


def rounds(length: int, size: int, segment: int, least: int) -> list[tuple[int, int]]:
    """(start, piece length) of each round over a prompt of `length` tokens, P = size pieces of `segment`
    tokens a round; the last round takes what is left, and a remainder shorter than `least` a piece joins the
    round before it."""
    bounds = list(range(0, length, size * segment))
    pieces = [min(segment, (length - begin) // size) for begin in bounds]
    if len(pieces) > 1 and pieces[-1] < least:
        rest = pieces.pop()
        pieces[-1] += rest
        bounds.pop()
    return list(zip(bounds, pieces))


@torch.no_grad()
def prefill_sharded(model: HSAHybrid, input_ids: torch.Tensor, cache: HSACache, segment_length: int = 65536,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Prefill the whole prompt input_ids [B, L] (the same on every rank; it may stay in CPU memory) into a
    fresh cache sharded across the ranks of `group` (default: the world), in rounds of one piece of
    segment_length tokens a rank (module docstring). Collective. Returns the logits [B, vocab] of the prompt's
    last position, the same on every rank; then decode with `model(next_tokens, cache=cache)` under
    `context_parallel(group)` (ramba.parallel.cache). L must be a multiple of chunk_size x ranks and
    segment_length a multiple of chunk_size covering the sliding window."""
    config = model.config
    S = config.chunk_size
    least = max(S, config.window - 1, config.d_conv - 1)
    with context_parallel(group) as cp:
        if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length % S \
                or segment_length < least:
            raise ValueError(f"segment_length must be a multiple of chunk_size ({S}) and at least {least} tokens (the "
                             f"sliding window's and the conv's reach), got {segment_length!r}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[1] % (S * cp.size):
            raise ValueError(f"prefill_sharded needs the whole prompt [batch, length] with length a multiple of "
                             f"{S * cp.size} (chunk_size x ranks), got shape {tuple(input_ids.shape)}: pad or cut it")
        mine = torch.tensor([*input_ids.shape, fingerprint(input_ids), cache.started, model.training],
                            device=cache.device)
        everyone = all_gather_autograd(mine, cp.group)
        if len({tuple(row.tolist()) for row in everyone}) != 1:
            raise ValueError("prefill_sharded: give every rank the same whole prompt, a fresh cache each "
                             "(model.new_cache) and the model in eval mode, on every rank")
        if cache.started:
            raise ValueError("prefill_sharded needs a fresh cache (model.new_cache): this one was already filled")
        if model.training:
            raise ValueError("prefill_sharded selects chunks without Gumbel noise: call model.eval() first")
        L = input_ids.shape[1]
        if L // cp.size < least:
            raise ValueError(f"a prompt of {L} tokens gives each of {cp.size} ranks fewer than {least} tokens (the "
                             "sliding window's and the conv's reach): use fewer ranks")
        upper = not model.upper_all_swa  # else only the prompt's last R + 1 positions need the upper stack
        tail = None
        for start, piece in rounds(L, cp.size, segment_length, least):
            begin = start + cp.rank * piece
            x, _ = prefill_round(model, input_ids[:, begin:begin + piece].to(cache.device), cache, start, cp, upper)
            if not upper:
                tail = last_positions(x, tail, model.upper_receptive_field + 1, cp)
        if upper:
            last = x[:, -1].contiguous()
            dist.broadcast(last, _peer(cp.group, cp.size - 1), group=cp.group)
        else:
            last = finish_upper(model, cache, tail, L)
    return model.lm_head(model.norm(last))
