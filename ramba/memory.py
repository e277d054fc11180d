"""The chunk memory that HSA reads: one small interface, two implementations.

`ChunkMemory` is what the chunk encoder returns for a whole input (full forward pass); `ChunkStore` is an
inference cache's growing memory of every chunk completed so far, optionally offloaded to CPU memory. HSA
only calls the methods of `Memory` on either (or on a memory sharded across ranks, which retrieves and
aggregates collectively: ramba.parallel.store's ShardedStore, one rank's part of a sharded cache, and
ramba.parallel.prefill's RoundMemory, what a round of a segment-wise sharded prefill reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ramba.ops import hsa_aggregate, hsa_retrieve

from .config import HSAHybridConfig


class Memory(Protocol):
    """What HSA reads: which chunks to select (by their landmarks) and the keys/values of those chunks."""

    def retrieve(self, qr: torch.Tensor, topk: int, chunk_size: int, positions: torch.Tensor | None,
                 window: int | None, backend: str, gumbel: float) -> tuple[torch.Tensor, torch.Tensor]:
        """hsa_retrieve of queries qr [N, L, Hr, dr] over this memory: indices, scores [N, L, Hr, K]."""

    def aggregate(self, q: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                  softmax_off_by_one: bool, backend: str) -> torch.Tensor:
        """hsa_aggregate of queries q [N, L, HQ, D] inside the selected chunks indices [N, L, H, K] (from
        `retrieve`, -1 for empty slots) mixed by weights [N, L, H, K] -> [N, L, HQ, D]."""


class LocalMemory:
    """retrieve and aggregate of a memory held whole by this process (ChunkMemory, ChunkStore): its
    `retrieval_landmarks` [N, C, Hr, dr] are scored, and `for_aggregate` gives its k, v [N, C'*S, H, D] with the
    indices renumbered into them."""

    def retrieve(self, qr: torch.Tensor, topk: int, chunk_size: int, positions: torch.Tensor | None,
                 window: int | None, backend: str, gumbel: float) -> tuple[torch.Tensor, torch.Tensor]:
        return hsa_retrieve(qr, self.retrieval_landmarks(), topk, chunk_size, positions=positions, window=window,
                            backend=backend, gumbel=gumbel)

    def aggregate(self, q: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, chunk_size: int,
                  softmax_off_by_one: bool, backend: str) -> torch.Tensor:
        k, v, indices = self.for_aggregate(indices)
        return hsa_aggregate(q, k, v, indices, weights, chunk_size,  # indices from hsa_retrieve: no sync
                             softmax_off_by_one=softmax_off_by_one, backend=backend, check_indices=False)


@dataclass
class ChunkMemory(LocalMemory):
    """landmarks [N, C, Hr, dr]; k, v [N, C*S, H, D] (one row per document of the DocLayout)."""

    landmarks: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def retrieval_landmarks(self) -> torch.Tensor:
        return self.landmarks

    def for_aggregate(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v and indices for hsa_aggregate (the offloaded ChunkStore renumbers; this does not)."""
        return self.k, self.v, indices


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


class ChunkStore(LocalMemory):
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
