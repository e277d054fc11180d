"""ramba: long-memory language models with Hierarchical Sparse Attention (HSA)."""

from .config import ConfigError, HSAHybridConfig
from .loading import load_model
from .model import HSAHybrid, HSAOutput

__all__ = ["ConfigError", "HSAHybrid", "HSAHybridConfig", "HSAOutput", "load_model"]
__version__ = "0.1.0"
