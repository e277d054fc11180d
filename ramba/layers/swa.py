"""Sliding-window attention block: projections, RoPE, windowed GQA attention, output projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ramba.config import HSAHybridConfig
from ramba.layers.rope import apply_rope, rope_angles
from ramba.ops import DocIndex, sliding_window_attention
from ramba.ops.swa import swa_decode
from ramba.parallel.context import context_parallel_swa
from ramba.parallel.group import active


@dataclass
class SWAState:
    """Keys (after RoPE) and values of the last min(W-1, tokens seen) positions: k, v [B, n, H, D]; valid
    bool [B, n] (False for padding), or None while every kept key is a real token."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor | None = None


class SWARing:
    """The keys (after RoPE) and values of the last W positions, k, v [B, W, H, D], as a ring that every
    one-token step writes at the same slot of every row; valid bool [B, W] (False: empty or padding). The
    fixed-shape state of `SlidingWindowAttention.step` (ramba.decoding)."""

    def __init__(self, state: SWAState, window: int):
        """From a cache's state of the last n <= W-1 positions: they fill the ring's last n slots, slot 0 is
        free (the first step writes there)."""
        B, n, H, D = state.k.shape
        self.k = state.k.new_zeros(B, window, H, D)
        self.v = state.v.new_zeros(B, window, H, D)
        self.valid = torch.zeros(B, window, dtype=torch.bool, device=state.k.device)
        self.k[:, window - n:], self.v[:, window - n:] = state.k, state.v
        self.valid[:, window - n:] = True if state.valid is None else state.valid


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

    def allocate_inference_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SWAState:
        """An empty state; it grows to the last W-1 keys as tokens arrive (never more than were seen)."""
        kv = torch.zeros(batch_size, 0, self.num_kv_heads, self.head_dim, device=device, dtype=dtype)
        return SWAState(kv, kv.clone())

    def forward(self, x: torch.Tensor, docs: DocIndex | torch.Tensor | None = None, state: SWAState | None = None,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, d_model], docs: the documents (integer ids [B, L] or a DocIndex) -> [B, L, d_model].

        With a state (inference): positions [B, L] are absolute, valid bool [B, L] marks real tokens (not
        padding); the keys of the last W-1 positions are read from and written back to the state. Under context
        parallelism (a round of a sharded prefill, ramba.parallel.prefill) every rank holds the same state, rank
        0 continues from it, and it takes the keys of this rank's last W-1 positions.
        """
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if positions is None:
            positions = torch.arange(length, device=x.device)
        cos, sin = rope_angles(positions, self.head_dim, self.config.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        backend = self.config.swa_backend
        cp = active()
        if cp is not None:  # this rank's slice of a sharded sequence (global positions)
            history = None if state is None or state.k.shape[1] == 0 else (state.k, state.v)
            out = context_parallel_swa(q, k, v, self.config.window, cp.group, backend, docs, history)
            if state is not None:  # a sharded prefill: the slice's last W-1 keys (ramba.parallel.prefill)
                start = max(0, length - (self.config.window - 1))
                state.k, state.v = k[:, start:], v[:, start:]
        elif state is None:
            out = sliding_window_attention(q, k, v, self.config.window, docs, backend)
        else:
            # the state takes the activations' dtype (under autocast: bf16 keys into a cache made for float32)
            keys, values = torch.cat([state.k.to(k.dtype), k], dim=1), torch.cat([state.v.to(v.dtype), v], dim=1)
            key_valid = None
            if state.valid is not None or valid is not None:
                kept = torch.ones_like(state.k[..., 0, 0], dtype=torch.bool) if state.valid is None else state.valid
                real = torch.ones_like(q[..., 0, 0], dtype=torch.bool) if valid is None else valid
                key_valid = torch.cat([kept, real], dim=1)
            out = sliding_window_attention(q, keys, values, self.config.window, backend=backend, key_valid=key_valid)
            start = max(0, keys.shape[1] - (self.config.window - 1))
            state.k, state.v = keys[:, start:], values[:, start:]
            state.valid = None if key_valid is None else key_valid[:, start:]
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim))

    def step(self, x: torch.Tensor, ring: SWARing, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """One token per row in fixed shapes (ramba.decoding): x [B, d_model] at positions [B] -> [B, d_model];
        writes the token's key and value at ring slot `slot` [1] (the oldest, out of the window now), then
        attends over the ring."""
        B = x.shape[0]
        q = self.q_proj(x).view(B, 1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, 1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, 1, self.num_kv_heads, self.head_dim)
        cos, sin = rope_angles(positions[:, None], self.head_dim, self.config.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ring.k.index_copy_(1, slot, k.to(ring.k.dtype))
        ring.v.index_copy_(1, slot, v.to(ring.v.dtype))
        ring.valid.index_fill_(1, slot, True)
        out = swa_decode(q[:, 0], ring.k, ring.v, ring.valid)
        return self.o_proj(out.reshape(B, self.num_heads * self.head_dim))
