"""Which context-parallel group the model runs under: `with context_parallel(group): model(ids_slice, ...)`.

Kept apart from the collectives (ramba.parallel.context) so that the layers can ask for it without importing
them: a layer whose forward sees a group runs its context-parallel form.
"""

from __future__ import annotations

from contextlib import contextmanager
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


def active() -> ContextParallel | None:
    """The context-parallel group the current forward runs under, or None (one process holds the sequence)."""
    return _ACTIVE.get()
