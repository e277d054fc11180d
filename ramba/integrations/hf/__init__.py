"""ramba as a transformers model (model type "ramba"): RambaConfig, RambaForCausalLM, RambaCache and
RambaByteTokenizer, registered with AutoConfig, AutoModelForCausalLM and AutoTokenizer.

`import ramba` registers them when a recent enough transformers is installed (`pip install ramba[hf]`);
importing this module directly raises an ImportError that says what to install.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MIN_TRANSFORMERS = "5.25.0"


def _check_transformers() -> None:
    from packaging.version import Version

    try:
        found = version("transformers")
    except PackageNotFoundError:
        raise ImportError("ramba's Hugging Face integration needs transformers: pip install 'ramba[hf]'") from None
    if Version(found) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"ramba's Hugging Face integration needs transformers>={MIN_TRANSFORMERS} (its Cache and "
                          f"generation API), found {found}: pip install -U 'transformers>={MIN_TRANSFORMERS}'")


_check_transformers()

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .configuration import MODEL_TYPE, RambaConfig  # noqa: E402
from .modeling import RambaCache, RambaCausalLMOutput, RambaForCausalLM  # noqa: E402
from .tokenization import RambaByteTokenizer  # noqa: E402

__all__ = ["RambaByteTokenizer", "RambaCache", "RambaCausalLMOutput", "RambaConfig", "RambaForCausalLM",
           "save_tokenizer"]

AutoConfig.register(MODEL_TYPE, RambaConfig, exist_ok=True)
AutoModelForCausalLM.register(RambaConfig, RambaForCausalLM, exist_ok=True)
AutoTokenizer.register(RambaConfig, slow_tokenizer_class=RambaByteTokenizer, exist_ok=True)


def save_tokenizer(directory: str) -> None:
    """Write the byte tokenizer's files into a model folder, so AutoTokenizer.from_pretrained(directory) loads it."""
    RambaByteTokenizer().save_pretrained(directory)
