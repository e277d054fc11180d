"""ramba: long-memory language models with Hierarchical Sparse Attention (HSA)."""

from .config import ConfigError, HSAHybridConfig
from .loading import load_model
from .model import HSAHybrid, HSAOutput
from .ops.backends import describe

__all__ = ["ConfigError", "HSAHybrid", "HSAHybridConfig", "HSAOutput", "load_model", "print_backends"]
__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Make model type "ramba" known to transformers' Auto classes when a recent enough transformers is
    installed (`pip install ramba[hf]`); without one, ramba works as before and says why at debug level."""
    import importlib.util
    import logging

    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from .integrations import hf  # noqa: F401
    except ImportError as err:
        logging.getLogger(__name__).debug("not registered with transformers: %s", err)


_register_with_transformers()


def print_backends(device: str | None = None) -> None:
    """Print, for each op kind, the backend "auto" uses on `device` (default: CUDA when available, else CPU)
    and why each other one is not used."""
    print(describe(device))
