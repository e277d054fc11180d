"""An auxiliary retrieval loss: teach the HSA blocks which chunks to read where the answer's chunk is known.

On synthetic tasks (pass keys, keyed needles) the chunks that hold the asked fact are known, so the positions
that predict the answer can be told to put their retrieval weight there: the loss is minus the log of the
weight that the selected chunks holding the fact get, averaged over HSA blocks, retrieval heads and those
positions. It trains the retrieval queries and landmarks directly, instead of leaving the model to find the
memory through the answer's loss alone (a recurrent mixer can answer short prompts from its state instead).

That loss sees only the selected chunks: where the fact's chunk is not among a position's top-k, it is at its
floor and gives no gradient. The loss over all chunks (`all_chunks_loss`, train.retrieval_loss_over=all) is
minus the log of the share that the fact's chunks get in a softmax over every chunk the position can see, so
a chunk that was not selected is still pulled up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..data.tasks.prompt import Sample
from ..layers.hsa import HSA
from ..tokenizer import Tokenizer

FLOOR = 1e-6  # the weight at which a position's loss stops growing (the fact's chunk not selected at all)


def asked_spans(sample: Sample, tokenizer: Tokenizer) -> list[tuple[int, int]]:
    """The token spans [start, end) of the inserted facts whose text holds one of the sample's references: the
    needles that answer, not the distractors."""
    ids = sample.prompt_ids.tolist()
    return [(start, end) for start, end in zip(sample.insert_offsets, sample.insert_ends)
            if end > start and any(ref in tokenizer.decode(ids[start:end]) for ref in sample.references)]


def asked_chunks(sample: Sample, tokenizer: Tokenizer, chunk_size: int) -> list[int]:
    """The chunks (of chunk_size tokens, from the prompt's start) that hold part of an asked fact."""
    return sorted({c for start, end in asked_spans(sample, tokenizer)
                   for c in range(start // chunk_size, (end - 1) // chunk_size + 1)})


def span_targets(spans: torch.Tensor, predicting: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The chunks each position should read: spans [B, F, 2] long (the asked facts' [start, end) token spans of
    each row, -1 for none), predicting bool [B, L] (the positions that predict an answer token) -> bool
    [B, L, C], C = ceil(L / chunk_size): True at predicting positions for every chunk that overlaps a span."""
    B, L = predicting.shape
    C = -(-L // chunk_size)
    starts = (torch.arange(C, device=spans.device) * chunk_size)[None, None]      # [1, 1, C]
    begin, end = spans[..., :1], spans[..., 1:]                                   # [B, F, 1]
    overlaps = ((begin >= 0) & (begin < starts + chunk_size) & (end > starts)).any(1)  # [B, C]
    return predicting[:, :, None] & overlaps[:, None, :]


def weight_on_targets(indices: list[torch.Tensor], weights: list[torch.Tensor],
                      targets: torch.Tensor) -> torch.Tensor:
    """float [B, L, N]: the retrieval weight that each of the N = HSA blocks x retrieval heads puts on the target
    chunks at each position.

    indices, weights: one [B, L, Hr, K] each per HSA block (HSAOutput.retrieval, .retrieval_weights: the
    selected chunks, -1 for empty slots, and their weights); targets: bool [B, L, C], the chunks position t
    should read.
    """
    if not indices or len(indices) != len(weights):
        raise ValueError(f"the retrieval weight on targets needs the selections of at least one HSA block (model(..., "
                         f"return_retrieval=True)), got {len(indices)} index and {len(weights)} weight tensors")
    B, L, C = targets.shape
    if targets.dtype != torch.bool or any(i.shape[:2] != (B, L) for i in indices):
        raise ValueError(f"targets must be bool [B, L, C] with the selections' B, L = {tuple(indices[0].shape[:2])}, "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    on_target = []
    for chunk, weight in zip(indices, weights):
        flat = targets.unsqueeze(2).expand(B, L, chunk.shape[2], C)
        hit = torch.gather(flat, 3, chunk.clamp(0, C - 1)) & (chunk >= 0) & (chunk < C)
        on_target.append((weight.float() * hit).sum(-1))  # [B, L, Hr]
    return torch.cat(on_target, dim=-1)


def retrieval_target_loss(indices: list[torch.Tensor], weights: list[torch.Tensor],
                          targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean weight on the targets) over the positions that have targets (arguments as weight_on_targets).
    Positions without any target are left out; the loss is 0 (attached) when none has one.
    """
    on_target = weight_on_targets(indices, weights, targets)
    asked = targets.any(-1)  # [B, L]
    if not bool(asked.any()):
        return weights[0].sum() * 0.0, weights[0].new_zeros(())
    w = on_target[asked]
    return -torch.log(w.clamp_min(FLOOR)).mean(), w.mean().detach()


@contextmanager
def all_chunk_scores(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every forward of `model` appends to the yielded list each HSA block's scores of every
    chunk, [B, L, Hr, C] (-inf where not visible; ops.retrieve.chunk_scores), in block order. Full forwards of
    unpacked rows only."""
    blocks = [m for m in model.modules() if isinstance(m, HSA)]
    if not blocks:
        raise ValueError("the scores of every chunk need a model with HSA blocks (use_hsa)")
    sink: list[torch.Tensor] = []
    for block in blocks:
        block.scores_sink = sink
    try:
        yield sink
    finally:
        for block in blocks:
            block.scores_sink = None


def all_chunks_loss(scores: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Minus the log of the softmax share, over every visible chunk, of the target chunks, averaged over HSA
    blocks, retrieval heads and the positions where a target chunk is visible.

    scores: one [B, L, Hr, C'] per HSA block (all_chunk_scores; C' complete chunks); targets: bool [B, L, C]
    with C >= C' (span_targets). 0 (attached) when no position sees a target."""
    if not scores:
        raise ValueError("all_chunks_loss needs the scores of at least one HSA block (all_chunk_scores)")
    terms = []
    for s in scores:
        C = s.shape[-1]
        t = targets[..., :C].unsqueeze(2) & torch.isfinite(s)      # [B, L, Hr, C]
        rows = t.any(-1)
        if not bool(rows.any()):
            continue
        picked, on = s[rows], t[rows]                              # [M, C]: rows with a visible target
        terms.append(torch.logsumexp(picked, -1) - torch.logsumexp(picked.masked_fill(~on, float("-inf")), -1))
    if not terms:
        return torch.where(torch.isfinite(scores[0]), scores[0], 0.0).sum() * 0.0
    return torch.cat(terms).mean()
