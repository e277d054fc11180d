"""Hierarchical sparse attention: retrieve the top-k chunks of the memory, attend inside them, mix by weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ramba.ops.retrieve import chunk_scores

from ..config import HSAHybridConfig
from ..documents import DocLayout
from ..memory import ChunkMemory, Memory


def retrieval_weights(scores: torch.Tensor, indices: torch.Tensor, kind: str) -> torch.Tensor:
    """Weights of the selected slots; scores, indices: [..., K] (slots most recent first, empty last).

    softmax: softmax over the non-empty slots. stick_breaking: w_i = exp(s_i - sum_{j<=i} softplus(s_j)).
    Empty slots (index -1) get weight 0; a row with no chunk at all gets all zeros.
    """
    valid = indices >= 0
    s = scores.masked_fill(~valid, 0.0)
    if kind == "softmax":
        w = torch.softmax(s.masked_fill(~valid, torch.finfo(s.dtype).min), dim=-1)
    else:
        w = torch.exp(s - torch.cumsum(F.softplus(s).masked_fill(~valid, 0.0), dim=-1))
    return w * valid


def force_selection(indices: torch.Tensor, scores: torch.Tensor, forced: torch.Tensor, positions: torch.Tensor,
                    chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection replaced by `forced` wherever one of those chunks is visible: indices, scores [N, L, Hr, K];
    forced: long [F] chunk ids, most recent first (F <= K); positions [N, L] of the queries. Where any forced
    chunk is complete before the query ((c + 1) * chunk_size <= p), the slots hold exactly the visible forced
    chunks, most recent first, with equal scores (so equal weights), then empty slots (-1, -inf); elsewhere the
    selection is left as it was."""
    K = indices.shape[-1]
    visible = (forced + 1) * chunk_size <= positions[..., None]                      # [N, L, F]
    order = torch.sort(visible.to(torch.int8), dim=-1, descending=True, stable=True).indices
    picked = torch.where(torch.gather(visible, -1, order), forced[order], -1)        # visible first, in order
    picked = F.pad(picked, (0, K - forced.numel()), value=-1)[..., None, :].expand_as(indices)
    use = visible.any(-1)[..., None, None]
    forced_scores = torch.zeros_like(scores).masked_fill(picked < 0, float("-inf"))
    return torch.where(use, picked, indices), torch.where(use, forced_scores, scores)


class HSA(nn.Module):
    """x [B, L, d] (normalised) and the chunk memory -> [B, L, d], plus the selected chunks [B, L, Hr, K] and
    their weights [B, L, Hr, K] (0 for empty slots).

    positions [B, L]: absolute positions of the tokens (default: 0 .. L-1 in each document of the layout);
    memory: the chunk memory of the whole input, or an inference cache's ChunkStore (ramba.memory; a sharded
    memory retrieves and aggregates collectively, ramba.parallel)."""

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.q_proj = nn.Linear(d, config.num_heads * config.head_dim, bias=False)
        self.qr_proj = nn.Linear(d, config.num_retrieval_heads * config.retrieval_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, d, bias=False)
        self.forced: torch.Tensor | None = None  # chunks every query reads instead (ramba.steering, diagnostics)
        # when a list, each forward appends every chunk's score [B, L, Hr, C] (ramba.training.retrieval)
        self.scores_sink: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, memory: Memory, layout: DocLayout,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        xs = layout.unpack(x)
        N, L, _ = xs.shape
        qr = self.qr_proj(xs).view(N, L, cfg.num_retrieval_heads, cfg.retrieval_dim)
        at = layout.retrieval_positions(positions)
        window = cfg.window if cfg.retrieve_beyond_window else None
        indices, scores = memory.retrieve(qr, cfg.topk, cfg.chunk_size, at, window, cfg.ops_backend,
                                          cfg.gumbel_noise if self.training else 0.0)
        if at is None and (self.scores_sink is not None or self.forced is not None):
            at = torch.arange(L, device=x.device).expand(N, L)
        if self.scores_sink is not None:
            self.scores_sink.append(self._all_scores(qr, memory, layout, at, window))
        if self.forced is not None:
            indices, scores = force_selection(indices, scores, self.forced.to(x.device), at, cfg.chunk_size)
        weights = retrieval_weights(scores, indices, cfg.retrieval_weights)
        kv_indices, kv_weights = indices, weights
        if cfg.num_retrieval_heads != cfg.num_kv_heads:  # one shared retrieval head serves every kv head
            kv_indices = indices.expand(-1, -1, cfg.num_kv_heads, -1)
            kv_weights = weights.expand(-1, -1, cfg.num_kv_heads, -1)
        q = self.q_proj(xs).view(N, L, cfg.num_heads, cfg.head_dim)
        o = memory.aggregate(q, kv_indices, kv_weights, cfg.chunk_size, cfg.softmax_off_by_one, cfg.ops_backend)
        out = self.o_proj(o.reshape(N, L, cfg.num_heads * cfg.head_dim))
        return layout.pack(out), layout.pack(indices), layout.pack(weights)

    def _all_scores(self, qr: torch.Tensor, memory: Memory, layout: DocLayout, at: torch.Tensor,
                    window: int | None) -> torch.Tensor:
        """Every chunk's score for every query at positions `at` [N, L], [N, L, Hr, C] (-inf where not visible),
        of a whole memory (ChunkMemory) over unpacked rows (one document a row)."""
        if not isinstance(memory, ChunkMemory) or not layout.trivial:
            raise ValueError("the scores of every chunk need a full forward of unpacked rows (no cache, no packed "
                             "documents, no sharded memory)")
        return chunk_scores(qr, memory.landmarks, self.config.chunk_size, at, window)
