"""Chunk memory: encode every complete chunk on its own into a landmark and memory keys/values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HSAHybridConfig
from ..memory import ChunkMemory
from .mlp import MLP
from .norm import RMSNorm
from .rope import apply_rope, rope_angles


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer over the S+1 positions of one chunk; x: [M, S+1, d]."""

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        d, self.heads, self.head_dim = config.d_model, config.num_heads, config.head_dim
        self.theta = config.rope_theta
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.qkv_proj = nn.Linear(d, 3 * self.heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.mlp = MLP(d, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, P, _ = x.shape
        q, k, v = self.qkv_proj(self.attn_norm(x)).view(M, P, 3, self.heads, self.head_dim).unbind(2)
        cos, sin = rope_angles(torch.arange(P, device=x.device), self.head_dim, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.o_proj(attn.transpose(1, 2).reshape(M, P, self.heads * self.head_dim))
        return x + self.mlp(self.mlp_norm(x))


class ChunkEncoder(nn.Module):
    """Normalised lower-stack states [N, L, d] -> ChunkMemory of the floor(L / S) complete chunks.

    Each chunk gets a learned CLS vector appended (position S) and runs through `encoder_layers`
    bidirectional layers on its own; the landmark is a projection of the CLS output (`landmark="cls"`) or
    of the mean of the encoded tokens (`"mean"`); memory keys/values are projections of the encoded tokens.
    """

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        self.chunk_size = config.chunk_size
        self.landmark = config.landmark
        self.kv_heads, self.head_dim = config.num_kv_heads, config.head_dim
        self.lmk_heads, self.lmk_dim = config.num_retrieval_heads, config.retrieval_dim
        d = config.d_model
        self.cls = nn.Parameter(torch.randn(d) * config.initializer_range) if config.landmark == "cls" else None
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.norm = RMSNorm(d, config.norm_eps) if config.encoder_layers else nn.Identity()
        self.lmk_proj = nn.Linear(d, self.lmk_heads * self.lmk_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> ChunkMemory:
        N, L, d = x.shape
        S = self.chunk_size
        C = L // S
        chunks = x[:, : C * S].reshape(N * C, S, d)
        if self.cls is not None:
            chunks = torch.cat([chunks, self.cls.to(chunks.dtype).expand(N * C, 1, d)], dim=1)
        for layer in self.layers:
            chunks = layer(chunks)
        chunks = self.norm(chunks)
        tokens = chunks[:, :S]
        summary = chunks[:, S] if self.cls is not None else tokens.mean(dim=1)
        return ChunkMemory(
            landmarks=self.lmk_proj(summary).view(N, C, self.lmk_heads, self.lmk_dim),
            k=self.k_proj(tokens).view(N, C * S, self.kv_heads, self.head_dim),
            v=self.v_proj(tokens).view(N, C * S, self.kv_heads, self.head_dim),
        )
