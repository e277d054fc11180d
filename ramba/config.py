"""HSAHybridConfig: every option of the model, with validation, JSON round trip and presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

MIXERS = ("swa", "mamba2")
CHOICES: dict[str, tuple[str, ...]] = {
    "landmark": ("cls", "mean"),
    "retrieval_heads": ("per_kv_head", "shared"),
    "retrieval_weights": ("softmax", "stick_breaking"),
    "hsa_residual": ("bypass", "standard"),
    "swa_backend": ("auto", "torch", "flash", "flex", "fla"),
    "mamba_backend": ("auto", "torch", "compile", "cuda"),
    "ops_backend": ("auto", "torch", "triton"),
}


# fields by kind, each validated by name (the relations between fields are checked after)
POSITIVE_INTS = ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "window", "d_state", "d_conv",
                 "expand", "mamba_head_dim", "n_groups", "mamba_chunk_size", "chunk_size", "retrieval_dim",
                 "hsa_every")
NON_NEGATIVE_INTS = ("n_lower_layers", "n_upper_layers", "encoder_layers", "intermediate_size", "mamba_horizon",
                     "mamba_reset", "mamba_reset_upper")
BOOLS = ("plain_block_mlp", "use_hsa", "retrieve_beyond_window", "softmax_off_by_one", "tie_embeddings",
         "mamba_reset_stagger")
POSITIVE_FLOATS = ("rope_theta", "norm_eps")
NON_NEGATIVE_FLOATS = ("gumbel_noise", "initializer_range")


MODEL_TYPE = "ramba"  # config.json's model type, as transformers' AutoConfig reads it
# keys that transformers writes into a config.json beside the model's fields (ramba.integrations.hf): read
# and dropped, so that a folder saved through either API loads through both
TRANSFORMERS_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "auto_map",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "tie_word_embeddings", "return_dict",
    "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type",
})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (a bool or a string is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ConfigError(ValueError):
    """A config field has a value the model cannot work with."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"HSAHybridConfig.{name}: {problem}")
        self.field = name
        self.problem = problem


@dataclass
class HSAHybridConfig:
    """The whole model shape. See DESIGN.md section 1 for the semantics of each option.

    The stack is `n_lower_layers` plain blocks, the chunk memory, then `n_upper_layers` blocks in groups
    of `hsa_every`: the first block of each group is an HSA block, the others are plain blocks.
    """

    vocab_size: int = 259
    d_model: int = 256
    n_lower_layers: int = 2
    n_upper_layers: int = 2
    hsa_every: int = 2
    # local mixer: one name for every block, or one per block (lower blocks first, then upper blocks)
    local_mixer: Union[str, list[str]] = "swa"
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 768
    plain_block_mlp: bool = True
    # sliding-window attention
    window: int = 128
    rope_theta: float = 10000.0
    # Mamba2 (names as mamba_ssm.modules.mamba2.Mamba2)
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    mamba_head_dim: int = 64
    n_groups: int = 1
    mamba_chunk_size: int = 64
    # tokens within which every Mamba2 head forgets at least a factor e (0: no bound), so that its state at
    # any length looks like its state in training: a soft window for the recurrent mixer (the decay is bounded;
    # each token's weight in the state is unchanged)
    mamba_horizon: int = 0
    # Mamba2 blocks below the memory restart their SSM state every this many tokens of a document (0: never);
    # chunk_size makes them chunk-local like the chunk encoder: landmarks and retrieval queries then never read
    # a state older than one chunk, at any length (the 4-tap conv still reads across the restart)
    mamba_reset: int = 0
    # the same for the Mamba2 blocks above the memory (0: never); at most the training length, every state at
    # any length has seen no more tokens than in training
    mamba_reset_upper: int = 0
    # with a reset R, every second Mamba2 block of each side restarts R // 2 tokens later than the first (at
    # offsets R/2, 3R/2, ...): each token then has at least R/2 tokens of context in one of them, as a sliding
    # window gives, and still no state is older than R tokens
    mamba_reset_stagger: bool = False
    # chunk memory and retrieval (use_hsa=False: the same stack with plain blocks only, the mixer-only baseline)
    use_hsa: bool = True
    chunk_size: int = 64
    topk: int = 8
    retrieval_heads: str = "per_kv_head"
    retrieval_dim: int = 64
    landmark: str = "cls"
    encoder_layers: int = 1
    retrieval_weights: str = "softmax"
    hsa_residual: str = "bypass"
    retrieve_beyond_window: bool = False
    softmax_off_by_one: bool = False
    gumbel_noise: float = 0.0
    # embeddings and norms
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # backends: "auto" picks the fastest installed one for the device
    swa_backend: str = "auto"
    mamba_backend: str = "auto"
    ops_backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def n_layers(self) -> int:
        return self.n_lower_layers + self.n_upper_layers

    @property
    def mixers(self) -> list[str]:
        """The local mixer of every block, lower blocks first."""
        if isinstance(self.local_mixer, str):
            return [self.local_mixer] * self.n_layers
        return list(self.local_mixer)

    @property
    def num_retrieval_heads(self) -> int:
        return self.num_kv_heads if self.retrieval_heads == "per_kv_head" else 1

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def is_hsa_layer(self, layer: int) -> bool:
        """True for the first block of each upper group (layer counts lower blocks first)."""
        upper = layer - self.n_lower_layers
        return self.use_hsa and upper >= 0 and upper % self.hsa_every == 0

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, name: str, problem: str) -> None:
            if not ok:
                raise ConfigError(name, problem)

        for name in POSITIVE_INTS:
            value = getattr(self, name)
            need(_is_int(value) and value > 0, name, f"must be a positive integer, got {value!r}")
        for name in NON_NEGATIVE_INTS:
            value = getattr(self, name)
            need(_is_int(value) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
        need(_is_int(self.topk) and self.topk >= 1, "topk",
             f"must be at least 1 (the number of chunks each token retrieves), got {self.topk!r}")
        for name in BOOLS:
            value = getattr(self, name)
            need(isinstance(value, bool), name,
                 f"must be true or false (a bool, not a string or number), got {value!r}")
        for name in POSITIVE_FLOATS:
            value = getattr(self, name)
            need(_is_number(value) and value > 0, name, f"must be a finite number > 0, got {value!r}")
        for name in NON_NEGATIVE_FLOATS:
            value = getattr(self, name)
            need(_is_number(value) and value >= 0, name, f"must be a finite non-negative number, got {value!r}")
        for name, allowed in CHOICES.items():
            need(getattr(self, name) in allowed, name, f"must be one of {allowed}, got {getattr(self, name)!r}")

        need(self.n_upper_layers >= 1 or not self.use_hsa, "n_upper_layers",
             "must be at least 1: the first upper block is the HSA block that reads the chunk memory")
        need(self.chunk_size % 16 == 0, "chunk_size",
             f"must be a multiple of 16 (the kernels tile chunks by 16), got {self.chunk_size}")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        need(self.intermediate_size > 0, "intermediate_size",
             "must be positive: HSA blocks and encoder layers always have an MLP")
        need(self.d_inner % self.mamba_head_dim == 0, "mamba_head_dim",
             f"expand * d_model ({self.d_inner}) must be a multiple of mamba_head_dim ({self.mamba_head_dim})")
        need((self.d_inner // self.mamba_head_dim) % self.n_groups == 0, "n_groups",
             f"the Mamba2 head count ({self.d_inner // self.mamba_head_dim}) must be a multiple of n_groups")
        need(self.landmark == "mean" or self.encoder_layers >= 1, "landmark",
             "'cls' needs encoder_layers >= 1 (with no encoder layer the CLS vector sees no token); "
             "use landmark='mean' or add an encoder layer")

        need(not self.mamba_reset_stagger or self.mamba_reset or self.mamba_reset_upper, "mamba_reset_stagger",
             "staggers the restarts of mamba_reset / mamba_reset_upper: set one of them too, or leave it false")
        need(isinstance(self.local_mixer, (str, list, tuple)), "local_mixer",
             f"must be one of {MIXERS} or a list of them (one per block), got {self.local_mixer!r}")
        if isinstance(self.local_mixer, str):
            need(self.local_mixer in MIXERS, "local_mixer", f"must be one of {MIXERS}, got {self.local_mixer!r}")
        else:
            mixers = list(self.local_mixer)
            need(len(mixers) == self.n_layers, "local_mixer",
                 f"a per-layer list needs n_lower_layers + n_upper_layers = {self.n_layers} entries, got {len(mixers)}")
            bad = [m for m in mixers if not isinstance(m, str) or m not in MIXERS]
            need(not bad, "local_mixer", f"entries must be in {MIXERS}, got {bad}")
        if self.retrieve_beyond_window:
            hsa_mixers = {m for i, m in enumerate(self.mixers) if self.is_hsa_layer(i)}
            need(hsa_mixers == {"swa"}, "retrieve_beyond_window",
                 "hides the chunks the local window sees, so every HSA block's mixer must be 'swa'")
            need(self.window >= self.chunk_size, "retrieve_beyond_window",
                 f"needs window ({self.window}) >= chunk_size ({self.chunk_size})")

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"model_type": MODEL_TYPE, **self.to_dict()}, indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HSAHybridConfig":
        if not isinstance(data, dict):
            raise TypeError(f"HSAHybridConfig.from_dict needs a mapping of field names to values, got "
                            f"{type(data).__name__}")
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError("model_type", f"this is a {model_type!r} model's config, not a ramba model's "
                              f"({MODEL_TYPE!r}): load it with the library that made it")
        data = {k: v for k, v in data.items() if k not in TRANSFORMERS_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown field (known fields: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "HSAHybridConfig":
        """A config from a JSON file, or from JSON text (a string starting with '{'). Errors name the file."""
        text = str(path_or_text)
        source = "the JSON text"
        if not text.lstrip().startswith("{"):
            source = str(path_or_text)
            text = Path(path_or_text).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e}); it should hold one HSAHybridConfig object, as "
                             "written by HSAHybridConfig.to_json") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object of config fields, got a {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(e.field, f"{e.problem} (in {source})") from None

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "HSAHybridConfig":
        """A named shape (`tiny`, `small`, `ramba-370m`) with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # a few million parameters: trains on a laptop CPU on byte-level text
    "tiny": dict(vocab_size=259, d_model=256, n_lower_layers=2, n_upper_layers=2, hsa_every=2,
                 local_mixer="swa", num_heads=4, num_kv_heads=1, head_dim=64, intermediate_size=768,
                 window=128, d_state=32, mamba_head_dim=32, chunk_size=64, topk=8, retrieval_dim=64,
                 encoder_layers=1),
    # about 100M parameters (121M with Mamba2, 93M with SWA) with a Llama-sized vocabulary
    "small": dict(vocab_size=32000, d_model=768, n_lower_layers=6, n_upper_layers=6, hsa_every=3,
                  local_mixer="mamba2", num_heads=12, num_kv_heads=2, head_dim=64, intermediate_size=1536,
                  window=512, d_state=128, mamba_head_dim=64, chunk_size=64, topk=8, retrieval_dim=128,
                  encoder_layers=1),
    # the published RAMba shape: Mamba2 blocks without MLP, an HSA block every 8 upper blocks (405M parameters)
    "ramba-370m": dict(vocab_size=50304, d_model=1024, n_lower_layers=24, n_upper_layers=24, hsa_every=8,
                       local_mixer="mamba2", plain_block_mlp=False, num_heads=16, num_kv_heads=1,
                       head_dim=64, intermediate_size=2048, window=512, d_state=128, mamba_head_dim=64,
                       mamba_chunk_size=256, chunk_size=64, topk=8, retrieval_dim=128, encoder_layers=1),
}
