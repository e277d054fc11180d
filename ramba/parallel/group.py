"""Which context-parallel group the model runs under: `with context_parallel(group): model(ids_slice, ...)`.

Kept apart from the collectives (ramba.parallel.context) so that the layers can ask for it without importing
them: a layer whose forward sees a group runs its context-parallel form.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch.distributed as dist


@dataclass(frozen=True)
class ContextParallel:
    """A process group whose ranks each hold a contiguous slice of every sequence (None: the world)."""

    group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)


_ACTIVE: ContextVar[ContextParallel | None] = ContextVar("ramba_context_parallel", default=None)


@contextmanager
def context_parallel(group: dist.ProcessGroup | None = None) -> Iterator[ContextParallel]:
    """Run the model's forward (and its backward) inside this block with each rank of `group` (default: the
    world) holding a slice of every sequence: rank r gives input_ids [B, L/P], positions r*L/P .. (r+1)*L/P - 1.
    Needs torch.distributed initialised; the backward must be called inside the block or after it, on every
    rank, as the collectives pair up across ranks."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel needs torch.distributed initialised (torchrun / accelerate launch, "
                           "or dist.init_process_group) before the model runs")
    token = _ACTIVE.set(ContextParallel(group))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


@contextmanager
def paused() -> Iterator[None]:
    """Run the code inside as on one process (no group active): the decoding of a sharded cache, whose mixers
    every rank runs alike (ramba.parallel.cache)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> ContextParallel | None:
    """The context-parallel group the current forward runs under, or None (one process holds the sequence)."""
    return _ACTIVE.get()


@dataclass(frozen=True)
class Mesh:
    """The world split into context-parallel groups of `cp_size` consecutive ranks, beside data parallelism:
    this rank's group (None when cp_size is 1), and its data-parallel rank and size (one per group)."""

    group: dist.ProcessGroup | None
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int

    def context(self) -> AbstractContextManager:
        """`context_parallel(group)` for a forward pass of this rank's slices (nothing when cp_size is 1)."""
        return nullcontext() if self.cp_size == 1 else context_parallel(self.group)


def split_world(cp_size: int) -> Mesh:
    """Collective on the world (every rank builds every group): ranks k*cp_size .. (k+1)*cp_size - 1 hold the
    slices of the same sequences. Without torch.distributed: one process, no group."""
    if not dist.is_available() or not dist.is_initialized():
        if cp_size != 1:
            raise ValueError(f"train.context_parallel={cp_size} needs {cp_size} processes or a multiple: launch "
                             f"with torchrun / accelerate launch --num_processes {cp_size}")
        return Mesh(None, 0, 1, 0, 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"train.context_parallel={cp_size} must divide the number of processes ({world})")
    if cp_size == 1:
        return Mesh(None, 0, 1, rank, world)
    groups = [dist.new_group(list(range(k * cp_size, (k + 1) * cp_size))) for k in range(world // cp_size)]
    return Mesh(groups[rank // cp_size], rank % cp_size, cp_size, rank // cp_size, world // cp_size)
