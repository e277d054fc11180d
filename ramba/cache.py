"""Inference cache: mixer states, the chunk not yet complete, and the chunk memory (optionally offloaded).

A cache lets `model(input_ids, cache=cache)` continue where the last call stopped, so that a long input runs
as a sequence of segments of any size and decoding runs one token at a time (DESIGN.md section 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import HSAHybridConfig
from .memory import ChunkStore
from .parallel.group import ContextParallel

MAX_POSITION = 2**31 - 1  # token positions are int32 in the kernels


class HSACache:
    """Everything a model needs to continue from where it stopped; make one with `model.new_cache(batch_size)`."""

    def __init__(self, config: HSAHybridConfig, owner: object, states: list[Any], batch_size: int,
                 device: torch.device, dtype: torch.dtype, offload: bool = False, max_tokens: int | None = None):
        """states: one inference state per block, as each block's mixer allocated it."""
        if max_tokens is not None and (not isinstance(max_tokens, int) or not 0 <= max_tokens <= MAX_POSITION):
            raise ValueError(f"max_tokens must be an integer in [0, {MAX_POSITION:,}] or None, got {max_tokens!r}")
        self.config, self.owner, self.batch_size, self.offload = config, owner, batch_size, offload
        self.device, self.dtype = device, dtype
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens seen per row
        self.states = states
        self.pending = torch.zeros(batch_size, config.chunk_size, config.d_model, device=device, dtype=dtype)
        self.pending_len = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.store = ChunkStore(config, batch_size, device, dtype, offload)
        if max_tokens:
            self.store.reserve(-(-max_tokens // config.chunk_size))
        # the exact shortcut for all-SWA upper stacks keeps the lower-stack outputs of the upper receptive field:
        # hidden states [B, R, d], whether each is a real token [B, R], and their positions [B, R]
        self.context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.upper_stale = False
        # the group this cache is sharded over, set by a prefill under context parallelism (ramba.parallel.cache)
        self.context_parallel: ContextParallel | None = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] (int, any order, repeats allowed) of every row-wise tensor, in place: the cache
        then continues those rows, as beam search needs after each step (row b' takes row index[b'])."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() == 0:
            raise ValueError("select_rows needs at least one row index")
        if int(index.min()) < 0 or int(index.max()) >= self.batch_size:
            raise ValueError(f"select_rows: row indices must lie in [0, {self.batch_size}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        self.lengths, self.pending, self.pending_len = (_rows(t, index) for t in
                                                        (self.lengths, self.pending, self.pending_len))
        self.states = [_rows(state, index) for state in self.states]
        self.context = _rows(self.context, index)
        store = self.store
        store.count, store.landmarks = _rows(store.count, index), _rows(store.landmarks, index)
        store.k, store.v = _rows(store.k, index), _rows(store.v, index)
        if store.offload and store.k.device.type == "cpu" and torch.cuda.is_available():
            store.k, store.v = store.k.pin_memory(), store.v.pin_memory()
        self.batch_size = index.numel()

    @property
    def started(self) -> bool:
        return bool((self.lengths > 0).any())

    def check(self, owner: object, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              weights: torch.Tensor) -> None:
        """Raise a clear error when this cache cannot continue with `input_ids` [B, L] on model `owner`, whose
        weights are now of `weights`' dtype and device."""
        if owner is not self.owner:
            raise ValueError("this cache belongs to another model: make one with model.new_cache(batch_size)")
        if weights.dtype != self.dtype or weights.device != self.device:
            raise ValueError(f"this cache was made for a model in {self.dtype} on {self.device}, but the model is now "
                             f"in {weights.dtype} on {weights.device} (moved or cast after new_cache): make a new "
                             "cache with model.new_cache(batch_size)")
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"the cache was made for batch size {self.batch_size}, got input_ids of batch size "
                             f"{input_ids.shape[0]}: make a new cache with model.new_cache({input_ids.shape[0]})")
        if attention_mask is not None and self.started:
            raise ValueError("attention_mask (padding) is only allowed in the first call with a cache; later "
                             "segments must be all tokens")
        if int(self.lengths.max()) + input_ids.shape[1] > MAX_POSITION:
            raise ValueError(f"positions beyond {MAX_POSITION:,} tokens are not supported")

    def extend_context(self, x: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                       keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept context followed by this segment's lower-stack outputs x [B, L, d] (with valid and positions
        [B, L]); remembers the last `keep` positions of it for the next call."""
        new = (x, valid, positions)
        if self.context is None:
            self.context = tuple(t[:, :0] for t in new)
        joined = tuple(torch.cat([old, t], dim=1) for old, t in zip(self.context, new))
        start = max(0, joined[0].shape[1] - keep)
        self.context = tuple(t[:, start:] for t in joined)
        return joined

    def update_pending(self, h: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new normalised lower-stack states h [B, L, d] (valid: bool [B, L]) to the incomplete chunk.

        Returns the completed chunks [B, Q*S, d] and how many each row completed [B]; keeps the rest pending."""
        S = self.config.chunk_size
        B = h.shape[0]
        slots = torch.arange(S, device=h.device)
        combined = torch.cat([self.pending, h.to(self.pending.dtype)], dim=1)
        combined_valid = torch.cat([slots[None] < self.pending_len[:, None], valid], dim=1)
        order = torch.sort((~combined_valid).to(torch.int8), dim=1, stable=True).indices  # valid tokens first
        compact = torch.gather(combined, 1, order[..., None].expand_as(combined))
        total = combined_valid.sum(1)
        completed = torch.div(total, S, rounding_mode="floor")
        q = int(completed.max())
        rest = completed[:, None] * S + slots[None]                                     # [B, S]
        self.pending = torch.gather(compact, 1, rest.clamp(max=compact.shape[1] - 1)[..., None].expand(B, S, h.shape[2]))
        self.pending_len = total - completed * S
        return compact[:, :q * S], completed


def _rows(value: Any, index: torch.Tensor) -> Any:
    """`value` with rows `index` of each tensor in it (a tensor, a tuple, a mixer state dataclass, updated in
    place, or None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device))
    if isinstance(value, tuple):
        return tuple(_rows(v, index) for v in value)
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            setattr(value, f.name, _rows(getattr(value, f.name), index))
        return value
    raise TypeError(f"cannot select rows of a {type(value).__name__} in the cache")
