"""RambaConfig: HSAHybridConfig as a transformers config (model type "ramba"), one field for one field."""

from __future__ import annotations

import dataclasses
from typing import Any, Union

from transformers import PreTrainedConfig

from ...config import HSAHybridConfig

MODEL_TYPE = "ramba"
FIELDS = [f.name for f in dataclasses.fields(HSAHybridConfig)]


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(HSAHybridConfig)}


class RambaConfig(PreTrainedConfig):
    """The fields of `ramba.HSAHybridConfig` (same names, defaults and checks) plus transformers' own.

    `RambaConfig.from_ramba(HSAHybridConfig.preset("tiny"))` and `config.to_ramba()` convert both ways; the
    transformers names hidden_size, num_attention_heads, num_key_value_heads and tie_word_embeddings read the
    ramba fields d_model, num_heads, num_kv_heads and tie_embeddings."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "num_heads",
                     "num_key_value_heads": "num_kv_heads", "tie_word_embeddings": "tie_embeddings"}
    __annotations__ = {name: Union[str, int, float, bool, list, None] for name in FIELDS}
    locals().update(_defaults())

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.local_mixer, tuple):
            self.local_mixer = list(self.local_mixer)
        self.to_ramba()  # the same checks as HSAHybridConfig: a ConfigError names the field
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "RambaConfig":
        """As transformers' from_dict, but a config of another model type is refused (not read as ramba's)."""
        model_type = config_dict.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"this is a {model_type!r} model's config, not a ramba model's ({MODEL_TYPE!r}): load it "
                             "with transformers' AutoModelForCausalLM or the library that made it")
        return super().from_dict(config_dict, **kwargs)

    @property
    def num_hidden_layers(self) -> int:
        return self.n_lower_layers + self.n_upper_layers

    def to_ramba(self) -> HSAHybridConfig:
        """The HSAHybridConfig of these fields."""
        return HSAHybridConfig.from_dict({name: getattr(self, name) for name in FIELDS})

    @classmethod
    def from_ramba(cls, config: HSAHybridConfig, **kwargs: Any) -> "RambaConfig":
        """A RambaConfig with the fields of `config` (and transformers' own from kwargs, e.g. eos_token_id)."""
        return cls(**config.to_dict(), **kwargs)
