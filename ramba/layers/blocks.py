"""The two kinds of block of the hybrid stack, and the factory that picks each block's local mixer."""

from __future__ import annotations

import torch
from torch import nn

from ramba.ops import DocIndex

from ..config import HSAHybridConfig
from ..documents import DocLayout
from ..memory import Memory
from .hsa import HSA
from .mamba2 import Mamba2, Mamba2State
from .mlp import MLP
from .norm import RMSNorm
from .swa import SlidingWindowAttention, SWAState

MixerState = SWAState | Mamba2State
MIXER_CLASSES: dict[str, type[nn.Module]] = {"swa": SlidingWindowAttention, "mamba2": Mamba2}


def create_mixer(config: HSAHybridConfig, layer: int) -> nn.Module:
    """The local mixer of block `layer` (lower blocks counted first), as the config names it."""
    return MIXER_CLASSES[config.mixers[layer]](config, layer)


class Block(nn.Module):
    """Plain block: x += Mixer(norm x); x += MLP(norm x) (no MLP when config.plain_block_mlp is False)."""

    def __init__(self, config: HSAHybridConfig, layer: int):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = create_mixer(config, layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps) if config.plain_block_mlp else None
        self.mlp = MLP(config.d_model, config.intermediate_size) if config.plain_block_mlp else None

    def allocate_inference_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        """The empty inference state of this block's mixer."""
        return self.mixer.allocate_inference_cache(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, docs: DocIndex | None, state: MixerState | None = None,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), docs, state, positions, valid)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class HSABlock(nn.Module):
    """x += Mixer(norm x); h = HSA(norm x); then the residual rule:
    bypass: x_out = x + MLP(norm(x + h)); standard: x_out = (x + h) + MLP(norm(x + h))."""

    def __init__(self, config: HSAHybridConfig, layer: int):
        super().__init__()
        self.bypass = config.hsa_residual == "bypass"
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = create_mixer(config, layer)
        self.hsa_norm = RMSNorm(config.d_model, config.norm_eps)
        self.hsa = HSA(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config.d_model, config.intermediate_size)

    def allocate_inference_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        """The empty inference state of this block's mixer."""
        return self.mixer.allocate_inference_cache(batch_size, device, dtype)

    def forward(self, x: torch.Tensor, docs: DocIndex | None, memory: Memory, layout: DocLayout,
                state: MixerState | None = None, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.mixer(self.mixer_norm(x), docs, state, positions, valid)
        hsa_positions = None if positions is None else positions.expand(x.shape[0], -1)
        h, indices, weights = self.hsa(self.hsa_norm(x), memory, layout, hsa_positions)
        mixed = x + h
        out = (x if self.bypass else mixed) + self.mlp(self.mlp_norm(mixed))
        return out, indices, weights
