"""DenseTransformer: the dense baseline of the benchmarks, full causal attention (SDPA) with a KV cache.

Same vocabulary, width, heads and number of blocks as an HSAHybrid of the same config, no chunk memory and no
position encoding: a baseline for speed and memory, not for quality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .config import HSAHybridConfig
from .model import IGNORE_INDEX, HSAOutput


class DenseCache:
    """Keys and values [B, kv_heads, T, head_dim] of every position so far, per block (None before the first
    call)."""

    def __init__(self, n_blocks: int, batch_size: int):
        self.batch_size = batch_size
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_blocks

    @property
    def length(self) -> int:
        """Positions held so far."""
        return 0 if self.kv[0] is None else self.kv[0][0].shape[2]

    def clear(self) -> None:
        """Drop every key and value (frees their memory)."""
        self.kv = [None] * len(self.kv)


class DenseBlock(nn.Module):
    """Pre-norm transformer block: full causal attention (GQA), then a SwiGLU MLP."""

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        d, self.h, self.kv, self.hd = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, (self.h + 2 * self.kv) * self.hd, bias=False)
        self.o = nn.Linear(self.h * self.hd, d, bias=False)
        self.up = nn.Linear(d, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, L, d] after the past keys/values -> (x [B, L, d], keys/values of past and x)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
        q = q.view(B, L, self.h, self.hd).transpose(1, 2)
        k = k.view(B, L, self.kv, self.hd).transpose(1, 2)
        v = v.view(B, L, self.kv, self.hd).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # causal with the queries aligned to the last keys, never materialised as an [L, M] mask
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, k.shape[2]), enable_gqa=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, L, -1))
        gate, up = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up), (k, v)


class DenseTransformer(nn.Module):
    """The dense baseline. `DenseTransformer(HSAHybridConfig.preset("small"))`; forward and new_cache as
    HSAHybrid's, so `ramba.generation.generate` runs it too (without padding or offload)."""

    def __init__(self, config: HSAHybridConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DenseBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def new_cache(self, batch_size: int, offload: bool = False) -> DenseCache:
        """An empty KV cache for `model(input_ids, cache=cache)`; it grows with every call."""
        if offload:
            raise ValueError("DenseTransformer keeps its KV cache on the model's device: offload is not supported")
        return DenseCache(len(self.blocks), batch_size)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: DenseCache | None = None,
                logits_to_keep: int | None = None) -> HSAOutput:
        """input_ids [B, L] -> HSAOutput: logits [B, N, vocab] of the last N = logits_to_keep positions (all by
        default); loss (mean next-token cross entropy, -100 ignored) when labels [B, L] are given. cache: continue
        from it (the input follows what it holds) and extend it."""
        length = input_ids.shape[1]
        keep = length if logits_to_keep is None else logits_to_keep
        if not 0 <= keep <= length:
            raise ValueError(f"logits_to_keep must be in [0, {length}] (the input length), got {logits_to_keep}")
        if labels is not None and keep != length:
            raise ValueError("labels need the logits of every position: leave logits_to_keep unset")
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the input has {input_ids.shape[0]}")
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache.kv[i])
            if cache is not None:
                cache.kv[i] = kv
        logits = self.head(self.norm(x[:, length - keep:]))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].long().flatten(),
                                   ignore_index=IGNORE_INDEX)
        return HSAOutput(logits=logits, loss=loss)
