"""Inference cache: mixer states, the chunk not yet complete, and the chunk memory (optionally offloaded).

A cache lets `model(input_ids, cache=cache)` continue where the last call stopped, so that a long input runs
as a sequence of segments of any size and decoding runs one token at a time (DESIGN.md section 4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import HSAHybridConfig
from .layers.chunk_encoder import ChunkMemory

MAX_POSITION = 2**31 - 1  # token positions are int32 in the kernels


@dataclass
class SWAState:
    """Keys (after RoPE) and values of the last W-1 positions: k, v [B, W-1, H, D]; valid bool [B, W-1]."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor


@dataclass
class Mamba2State:
    """The last d_conv-1 conv inputs [B, d_conv-1, conv_dim] and the SSM state [B, heads, head_dim, d_state]."""

    conv: torch.Tensor
    ssm: torch.Tensor


def new_mixer_state(config: HSAHybridConfig, layer: int, batch: int, device: torch.device,
                    dtype: torch.dtype) -> SWAState | Mamba2State:
    """The empty state of block `layer`'s mixer."""
    if config.mixers[layer] == "swa":
        shape = (batch, config.window - 1, config.num_kv_heads, config.head_dim)
        return SWAState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                        torch.zeros(batch, config.window - 1, dtype=torch.bool, device=device))
    conv_dim = config.d_inner + 2 * config.n_groups * config.d_state
    heads = config.d_inner // config.mamba_head_dim
    state_dtype = torch.promote_types(dtype, torch.float32)
    return Mamba2State(torch.zeros(batch, config.d_conv - 1, conv_dim, device=device, dtype=dtype),
                       torch.zeros(batch, heads, config.mamba_head_dim, config.d_state, device=device,
                                   dtype=state_dtype))


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of a device (host memory for CPU tensors), or None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ChunkStore:
    """Landmarks [B, cap, Hr, dr] and memory keys/values [B, cap*S, H, D] of every complete chunk, per row.

    Buffers grow by doubling. With offload=True the keys/values live in pinned CPU memory and only the chunks
    a segment selected are copied to the device; the landmarks always stay on the device.
    """

    def __init__(self, config: HSAHybridConfig, batch: int, device: torch.device, dtype: torch.dtype,
                 offload: bool):
        self.config, self.device, self.dtype, self.offload = config, device, dtype, offload
        self.kv_device = torch.device("cpu") if offload else device
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.landmarks = torch.zeros(batch, 0, config.num_retrieval_heads, config.retrieval_dim, device=device,
                                     dtype=dtype)
        self.k = self._kv_buffer(0)
        self.v = self._kv_buffer(0)

    @property
    def capacity(self) -> int:
        return self.landmarks.shape[1]

    def _kv_buffer(self, chunks: int) -> torch.Tensor:
        cfg = self.config
        shape = (self.count.shape[0], chunks * cfg.chunk_size, cfg.num_kv_heads, cfg.head_dim)
        pin = self.offload and torch.cuda.is_available()
        return torch.zeros(shape, device=self.kv_device, dtype=self.dtype, pin_memory=pin)

    def _grow(self, cap: int) -> None:
        """Move everything into buffers of `cap` chunks per row, or raise MemoryError when they cannot fit."""
        cfg = self.config
        kv_bytes = 2 * self.count.shape[0] * cap * cfg.chunk_size * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        free = _available_bytes(self.kv_device)
        if free is not None and kv_bytes > free:
            hint = "use a smaller batch or a machine with more memory" if self.offload else \
                "create the cache with offload=True to keep the memory keys/values in CPU memory"
            raise MemoryError(f"the chunk memory needs {kv_bytes / 2**30:.1f} GiB of {self.kv_device.type} memory for "
                              f"{cap * cfg.chunk_size:,} tokens per row, but only {free / 2**30:.1f} GiB are free: {hint}")
        landmarks = torch.zeros(self.landmarks.shape[0], cap, *self.landmarks.shape[2:], device=self.device,
                                dtype=self.dtype)
        landmarks[:, :self.capacity] = self.landmarks
        k, v = self._kv_buffer(cap), self._kv_buffer(cap)
        k[:, :self.k.shape[1]] = self.k
        v[:, :self.v.shape[1]] = self.v
        self.landmarks, self.k, self.v = landmarks, k, v

    def reserve(self, chunks: int) -> None:
        """Allocate room for `chunks` chunks per row now (no doubling later up to there), or raise MemoryError."""
        if chunks > self.capacity:
            self._grow(chunks)

    def append(self, memory: ChunkMemory, new: torch.Tensor) -> None:
        """Append the first new[b] chunks of memory (landmarks [B, Q, Hr, dr], k, v [B, Q*S, H, D]) to row b."""
        q = memory.landmarks.shape[1]
        if q == 0:
            return
        needed = int((self.count + new).max())
        if needed > self.capacity:
            self._grow(max(needed, 2 * self.capacity, 16))
        S = self.config.chunk_size
        slot = torch.arange(q, device=self.device)
        keep = slot[None] < new[:, None]                                        # [B, Q]
        rows = torch.arange(new.shape[0], device=self.device)[:, None].expand(-1, q)[keep]
        target = (self.count[:, None] + slot[None]).expand(new.shape[0], -1)[keep]
        self.landmarks[rows, target] = memory.landmarks[keep].to(self.dtype)
        k_chunks = memory.k.view(new.shape[0], q, S, *memory.k.shape[2:])[keep].to(self.kv_device, self.dtype)
        v_chunks = memory.v.view(new.shape[0], q, S, *memory.v.shape[2:])[keep].to(self.kv_device, self.dtype)
        rows_kv, target_kv = rows.to(self.kv_device), target.to(self.kv_device)
        self.k.view(self.k.shape[0], -1, S, *self.k.shape[2:])[rows_kv, target_kv] = k_chunks
        self.v.view(self.v.shape[0], -1, S, *self.v.shape[2:])[rows_kv, target_kv] = v_chunks
        self.count += new

    def retrieval_landmarks(self) -> torch.Tensor:
        """Landmarks of the chunks so far, [B, max count, Hr, dr]; chunks past a row's count are never visible."""
        return self.landmarks[:, :int(self.count.max())]

    def _gather(self, kv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Chunks `rows` (row * capacity + chunk) of the CPU buffer kv [B, cap*S, H, D] -> [n, S*H*D] on the device.

        One index_select of whole chunks, written straight into pinned memory when the device is a GPU, so that
        nothing is copied twice on the way."""
        chunks = kv.view(-1, self.config.chunk_size * kv.shape[2] * kv.shape[3])
        if self.device.type != "cuda":
            return torch.index_select(chunks, 0, rows).to(self.device)
        out = torch.empty(rows.numel(), chunks.shape[1], dtype=kv.dtype, pin_memory=True)
        torch.index_select(chunks, 0, rows, out=out)
        return out.to(self.device, non_blocking=True)

    def for_aggregate(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Memory k, v and indices [B, L, H, K] ready for hsa_aggregate on the device.

        Offloaded: only the chunks that `indices` select are copied, and the indices renumbered to them."""
        S = self.config.chunk_size
        if not self.offload:
            chunks = int(self.count.max())
            return self.k[:, :chunks * S], self.v[:, :chunks * S], indices
        B = indices.shape[0]
        picked = [torch.unique(row[row >= 0]) for row in indices.reshape(B, -1)]  # sorted chunk ids per row
        width = max(p.numel() for p in picked)
        if width == 0:  # nothing selected (e.g. no complete chunk yet)
            return self.k[:, :0].to(self.device), self.v[:, :0].to(self.device), indices
        table = torch.zeros(B, width, dtype=torch.long, device=indices.device)
        for b, p in enumerate(picked):
            table[b, :p.numel()] = p
        flat = (torch.arange(B)[:, None] * self.capacity + table.cpu()).reshape(-1)  # row * capacity + chunk
        k, v = (self._gather(kv, flat).view(B, width * S, *kv.shape[2:]) for kv in (self.k, self.v))
        renumbered = torch.stack([torch.searchsorted(p, row.reshape(-1).clamp(min=0)).view(row.shape)
                                  for p, row in zip(picked, indices)])
        return k, v, torch.where(indices >= 0, renumbered, -1)


class HSACache:
    """Everything a model needs to continue from where it stopped; make one with `model.new_cache(batch_size)`."""

    def __init__(self, config: HSAHybridConfig, owner: object, batch_size: int, device: torch.device,
                 dtype: torch.dtype, offload: bool = False, max_tokens: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or not 0 <= max_tokens <= MAX_POSITION):
            raise ValueError(f"max_tokens must be an integer in [0, {MAX_POSITION:,}] or None, got {max_tokens!r}")
        self.config, self.owner, self.batch_size, self.offload = config, owner, batch_size, offload
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens seen per row
        self.states = [new_mixer_state(config, i, batch_size, device, dtype) for i in range(config.n_layers)]
        self.pending = torch.zeros(batch_size, config.chunk_size, config.d_model, device=device, dtype=dtype)
        self.pending_len = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.store = ChunkStore(config, batch_size, device, dtype, offload)
        if max_tokens:
            self.store.reserve(-(-max_tokens // config.chunk_size))
        # the exact shortcut for all-SWA upper stacks keeps the lower-stack outputs of the upper receptive field:
        # hidden states [B, R, d], whether each is a real token [B, R], and their positions [B, R]
        self.context: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.upper_stale = False

    @property
    def started(self) -> bool:
        return bool((self.lengths > 0).any())

    def check(self, owner: object, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Raise a clear error when this cache cannot continue with `input_ids` [B, L] on model `owner`."""
        if owner is not self.owner:
            raise ValueError("this cache belongs to another model: make one with model.new_cache(batch_size)")
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
