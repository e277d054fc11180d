"""The model under context parallelism: what HSAHybrid's forward does differently when a group is active.

Each rank holds input_ids [B, Lr], the slice r*Lr .. (r+1)*Lr - 1 of every row, with the same Lr on every
rank and Lr a multiple of chunk_size (no chunk spans two ranks). Then:
- positions are global (RoPE, retrieval's causality);
- the local mixers exchange what crosses the slice boundary (ramba.parallel.context);
- the chunk encoder runs on the rank's own chunks; the landmarks and memory keys/values of all ranks are
  all-gathered, so every query scores every earlier chunk and reads the selected ones wherever they were
  encoded. Packed documents (doc_ids) may continue across ranks: ramba.parallel.documents. Per layer that moves (P-1)/P of the memory K/V of the sequence to each rank: 2 * num_kv_heads *
  head_dim values per token, plus one landmark per chunk; the backward all-reduces their gradients;
- with a cache (ramba.parallel.cache), the prompt's slices fill a cache sharded across the ranks, and decoding
  reads each rank's part of the chunk memory;
- the next-token loss crosses slices too: a rank's last position predicts the next rank's first label, and
  `out.loss` is the mean over all ranks' targets (its gradient is this rank's share of it).
After backward, sum the parameters' gradients over the group (`all_reduce_gradients`), as each rank's
backward holds the part of every gradient that flowed through its slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..memory import ChunkMemory
from .context import _exchange, all_gather_autograd
from .group import ContextParallel, context_parallel

IGNORE_INDEX = -100


def check_inputs(cp: ContextParallel, chunk_size: int, input_ids: torch.Tensor, cu_seqlens: bool,
                 logits_to_keep: int | None, checkpointing: bool) -> None:
    """Raise ValueError, on every rank, for what the context-parallel forward does not take (the checks of a
    call with a cache follow in ramba.parallel.cache.check_cache_inputs)."""
    if cu_seqlens:
        raise ValueError("context parallelism takes packed documents as doc_ids (this rank's slice of them), not "
                         "cu_seqlens (offsets into the whole flattened batch)")
    if logits_to_keep is not None:
        raise ValueError("logits_to_keep is not supported under context parallelism: every rank computes the "
                         "logits of its own slice")
    if checkpointing:
        raise ValueError("activation checkpointing recomputes blocks outside the context-parallel forward: turn "
                         "gradient_checkpointing off under context parallelism (its slices already cut memory)")


def check_lengths(cp: ContextParallel, chunk_size: int, input_ids: torch.Tensor) -> None:
    """Raise ValueError, on every rank, unless every rank's slice has the same length, a multiple of chunk_size."""
    lengths = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    everyone = [torch.empty_like(lengths) for _ in range(cp.size)]
    dist.all_gather(everyone, lengths, group=cp.group)
    require_chunk_slices([int(n) for n in everyone], chunk_size, "context parallelism needs", "sequence")


def require_chunk_slices(lengths: list[int], chunk_size: int, needs: str, whole: str) -> None:
    """Raise ValueError unless the ranks' slice lengths (all of them, in rank order) are equal and a multiple of
    chunk_size; `needs` begins the message ("context parallelism needs"), `whole` names what was sliced."""
    if len(set(lengths)) != 1 or lengths[0] % chunk_size:
        raise ValueError(f"{needs} slices of equal length, each a multiple of chunk_size ({chunk_size}), got slice "
                         f"lengths {lengths}: pad or cut the {whole} to a multiple of {chunk_size * len(lengths)} "
                         f"tokens (chunk_size x ranks) and give rank r its r-th slice")


def fingerprint(ids: torch.Tensor) -> int:
    """A number that differs between token tensors with different ids or order (position-weighted sum of the
    ids), for the ranks to check that they were given the same tokens."""
    ids = ids.long()
    return int((ids * torch.arange(1, ids.numel() + 1, device=ids.device).view_as(ids)).sum())


def global_positions(cp: ContextParallel, length: int, device: torch.device) -> torch.Tensor:
    """[Lr] positions of this rank's slice in the whole sequence."""
    return torch.arange(cp.rank * length, (cp.rank + 1) * length, device=device)


def gather_memory(memory: ChunkMemory, cp: ContextParallel) -> ChunkMemory:
    """Every rank's chunks, in sequence order: landmarks [B, P*Cr, Hr, dr], k, v [B, P*Cr*S, H, D]."""
    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = all_gather_autograd(t, cp.group)                      # [P, B, n, ...]
        return parts.transpose(0, 1).reshape(t.shape[0], -1, *t.shape[2:])

    return ChunkMemory(landmarks=gather(memory.landmarks), k=gather(memory.k), v=gather(memory.v))


def next_token_targets(labels: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """labels [B, Lr] -> targets [B, Lr]: position t's target labels[t+1], the next rank's first label for
    the last position, IGNORE_INDEX for the last position of the sequence."""
    first = labels[:, :1].contiguous()
    after = torch.full_like(first, IGNORE_INDEX)
    last = cp.rank + 1 == cp.size
    _exchange(cp.group, first if cp.rank > 0 else None, cp.rank - 1, None if last else after, cp.rank + 1)
    return torch.cat([labels[:, 1:], after], dim=1).long()


def global_mean_loss(logits: torch.Tensor, targets: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """Mean cross entropy over every rank's targets: the value is the whole sequence's loss, the gradient this
    rank's share of it (its summed loss over the global count of targets)."""
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    local = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    totals = torch.stack([local.detach(), (targets != IGNORE_INDEX).sum().to(local.dtype)])
    dist.all_reduce(totals, group=cp.group)
    count = totals[1].clamp(min=1)
    return local / count + (totals[0] - local.detach()) / count


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over the context-parallel group (after backward, before the optimizer
    step), one all-reduce per gradient dtype and device. Parameters without a gradient on every rank take part
    with zeros."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets.setdefault((param.grad.dtype, param.grad.device), []).append(param.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(summed.view_as(grad))


def loss_and_gradients(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       group: dist.ProcessGroup | None = None, **forward_kwargs) -> torch.Tensor:
    """One forward and backward of this rank's slice under context parallelism, then the gradients summed
    over the group: afterwards every rank holds the one-process gradients of the whole sequence's mean loss,
    ready for the optimizer. input_ids, labels: [B, Lr], this rank's slice. Returns the (detached) loss of
    the whole sequence; `forward_kwargs` go to the model (e.g. nothing, or return_retrieval)."""
    with context_parallel(group):
        loss = model(input_ids, labels=labels, **forward_kwargs).loss
        loss.backward()
    all_reduce_gradients(model, group)
    return loss.detach()
