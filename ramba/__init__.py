"""ramba: long-memory language models with Hierarchical Sparse Attention (HSA)."""

from .config import ConfigError, HSAHybridConfig
from .loading import load_model
from .model import HSAHybrid, HSAOutput
from .ops.backends import describe

__all__ = ["ConfigError", "HSAHybrid", "HSAHybridConfig", "HSAOutput", "load_model", "print_backends"]
__version__ = "0.1.0"


def print_backends(device: str | None = None) -> None:
    """Print, for each op kind, the backend "auto" uses on `device` (default: CUDA when available, else CPU)
    and why each other one is not used."""
    print(describe(device))
