"""Hardware-aligned ops of HSA with their PyTorch references (ships as `ramba.ops`)."""

from .aggregate import hsa_aggregate
from .retrieve import hsa_retrieve

__all__ = ["hsa_aggregate", "hsa_retrieve"]
