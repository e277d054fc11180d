"""RMSNorm computed in float32 (float64 for float64 inputs) whatever the input dtype."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`x / rms(x) * weight` over the last dimension; x: [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(ct)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(ct)).to(x.dtype)
