"""Greedy generation from a prompt sharded across a context-parallel group (the sharded cache of
ramba.parallel.cache): each rank gives its slice of the prompt and gets the same continuation back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .context import _peer, all_gather_autograd
from .group import context_parallel
from .prefill import prefill_sharded

if TYPE_CHECKING:
    from ..model import HSAHybrid


@torch.no_grad()
def generate_sharded(model: HSAHybrid, input_ids: torch.Tensor, max_new_tokens: int, stop_tokens: Iterable[int] = (),
                     pad_token_id: int = 0, offload: bool = False, group: dist.ProcessGroup | None = None,
                     segment_length: int | None = None) -> torch.Tensor:
    """The greedy continuation [B, T] (T <= max_new_tokens, the same on every rank) of a prompt whose slice
    input_ids [B, Lr] this rank holds (rank r: positions r*Lr .. (r+1)*Lr - 1; Lr equal on all ranks and a
    multiple of chunk_size). Collective: call it on every rank of `group` (default: the world). A row stops
    after one of stop_tokens; its later positions get pad_token_id. As `ramba.generation.generate` with
    do_sample=False on the whole prompt, with each rank keeping only its own chunks of the memory.
    segment_length: prefill in rounds of that many tokens a rank (`prefill_sharded`, for a prompt too long for
    one forward; the slices are all-gathered first, a few bytes a token) instead of all slices at once."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be this rank's slice [batch, length >= 1], got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    model.eval()
    device = input_ids.device
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    new: list[torch.Tensor] = []
    with context_parallel(group) as cp:
        cache = model.new_cache(input_ids.shape[0], offload=offload)
        if segment_length is None:
            logits = model(input_ids, cache=cache).logits[:, -1]
        else:
            prompt = all_gather_autograd(input_ids.contiguous(), cp.group)        # [P, B, Lr]
            prompt = prompt.transpose(0, 1).reshape(input_ids.shape[0], -1)
            logits = prefill_sharded(model, prompt, cache, segment_length, cp.group)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = logits.argmax(-1).masked_fill(done, pad_token_id)
            dist.broadcast(token, _peer(cp.group, cp.size - 1), group=cp.group)  # the last rank's: the prompt's end
            new.append(token)
            done |= torch.isin(token, stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model(token[:, None], cache=cache).logits[:, -1]
    return torch.stack(new, dim=1) if new else input_ids.new_zeros(input_ids.shape[0], 0)
