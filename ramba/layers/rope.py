"""Rotary position embeddings (half-split layout, as in GPT-NeoX and Llama)."""

import torch


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, dim // 2] in float64; positions: integer tensor of any shape.

    Angles are computed in float64 so that positions in the tens of millions keep their precision.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles cos, sin of shape [L, D/2] or [B, L, D/2]; returns x's dtype.

    The rotation runs in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
