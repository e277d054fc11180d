"""Sliding-window attention block: projections, RoPE, windowed GQA attention, output projection."""

from __future__ import annotations

import torch
from torch import nn

from ramba.backends import pick
from ramba.config import HSAHybridConfig
from ramba.layers.rope import apply_rope, rope_angles
from ramba.ops.swa import sliding_window_attention


class SlidingWindowAttention(nn.Module):
    """Causal attention over the last `config.window` tokens of the same document."""

    def __init__(self, config: HSAHybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, d_model], doc_ids: optional integer [B, L] -> [B, L, d_model]."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        cos, sin = rope_angles(torch.arange(length, device=x.device), self.head_dim, self.config.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        backend = pick("swa", self.config.swa_backend, x.device)
        out = sliding_window_attention(q, k, v, self.config.window, doc_ids, backend)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))
