"""RambaForCausalLM: an HSAHybrid as a transformers causal LM, and RambaCache: its HSACache as a transformers Cache.

The wrapper owns the very modules of an HSAHybrid under the same names (embed, lower, memory_norm, encoder,
upper, norm, lm_head), so its state dict, and so its model.safetensors, is HSAHybrid's: a folder saved by
either class loads with the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ...cache import HSACache
from ...generation import prefill_segments
from ...model import HSAHybrid
from .configuration import RambaConfig

SEGMENT = 4096  # tokens per forward when a long input fills the cache (segment-wise prefill)
# generate() arguments that need what a ramba model does not have: the name -> why, and what to do instead
UNSUPPORTED_GENERATE = {
    "assistant_model": "assisted decoding rolls the cache back, and HSACache cannot be rolled back",
    "prompt_lookup_num_tokens": "prompt-lookup decoding rolls the cache back, and HSACache cannot be rolled back",
    "cache_implementation": "ramba models use their own cache (RambaCache); leave cache_implementation unset",
    "prefill_chunk_size": "the model prefills long prompts in segments of 4096 tokens itself; leave it unset",
    "inputs_embeds": "give input_ids",
    "output_attentions": "HSA has no attention matrix to return",
    "output_hidden_states": "hidden states are not returned; use HSAHybrid's return_retrieval to inspect retrieval",
}


class RambaCache(Cache):
    """A transformers `Cache` around an `HSACache`: generate() keeps it between steps, beam search reorders it.

    seen: how many input columns (tokens and left padding) the model has read into it."""

    def __init__(self, inner: HSACache):
        super().__init__(layers=[])
        self.inner = inner
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the chunk memory grows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.inner.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.inner.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.inner.select_rows(torch.arange(self.inner.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a ramba cache cannot be cropped (its chunk memory and recurrent states only move "
                                  "forward): prefill again from the shorter input")

    def reset(self) -> None:
        raise NotImplementedError("a ramba cache cannot be reset: make a new one (generate() does)")

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True


@dataclass
class RambaCausalLMOutput(ModelOutput):
    """loss (when labels were given), logits [B, N, vocab], and the cache the call read and updated."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: RambaCache | None = None


class RambaForCausalLM(PreTrainedModel, GenerationMixin):
    """An HSAHybrid behind the transformers API: `AutoModelForCausalLM.from_pretrained(folder)` after
    `import ramba`, `generate()` on RambaCache (greedy, sampling, beam search, streamers, stopping criteria),
    `pipeline("text-generation")`, peft (LoRA on q_proj, k_proj, v_proj, o_proj, in_proj, out_proj, ...).

    `model.hybrid` is the HSAHybrid itself, for ramba's own API (its `generate`, `new_cache`, probes)."""

    config_class = RambaConfig
    base_model_prefix = "hybrid"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "HSABlock"]
    _is_stateful = True  # no assisted decoding, no cache rollback
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config: RambaConfig):
        super().__init__(config)
        hybrid = HSAHybrid(config.to_ramba())
        for name, child in hybrid.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "hybrid", hybrid)  # not a submodule: its modules are registered above
        if not config.tie_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    @classmethod
    def from_hybrid(cls, hybrid: HSAHybrid, **config_kwargs: Any) -> "RambaForCausalLM":
        """A wrapper with a copy of `hybrid`'s weights, on its device and in its dtype; config_kwargs set transformers'
        config fields (e.g. eos_token_id)."""
        model = cls(RambaConfig.from_ramba(hybrid.config, **config_kwargs))
        model.load_state_dict(hybrid.state_dict())
        return model.to(hybrid.embed.weight.device, hybrid.embed.weight.dtype)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: HSAHybrid initialises its own weights when it is built."""

    def train(self, mode: bool = True) -> "RambaForCausalLM":
        super().train(mode)
        self.hybrid.training = mode
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        """HSAHybrid's own switch (recompute each block in the backward pass); transformers'
        gradient_checkpointing_enable / activation_checkpointing_enable set it."""
        hybrid = self.__dict__.get("hybrid")
        return bool(hybrid is not None and hybrid.gradient_checkpointing)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        if "hybrid" in self.__dict__:
            self.hybrid.gradient_checkpointing = enable

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.embed = self.hybrid.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.lm_head = self.hybrid.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own RambaCache

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RambaCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: RambaCache | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> RambaCausalLMOutput:
        """input_ids [B, L] -> logits [B, N, vocab] of the last N = logits_to_keep positions (0: all).

        labels [B, L] as input_ids (shifted inside, -100 ignored) give the loss; attention_mask [B, L] marks
        padding (left padding only with a cache, and only in the call that starts it). With use_cache (or a
        cache), the call continues `cache` (past_key_values is the older name) or starts a new one, reading a
        long input in segments of 4096 tokens, and returns it."""
        kwargs.pop("num_items_in_batch", None)  # the Trainer's token count: the loss is already a mean
        kwargs.pop("position_ids", None)  # positions come from the cache: the model counts its tokens itself
        if kwargs:
            raise TypeError(f"RambaForCausalLM.forward got unsupported arguments: {', '.join(sorted(kwargs))}")
        for name, value in (("inputs_embeds", inputs_embeds), ("output_attentions", output_attentions),
                            ("output_hidden_states", output_hidden_states)):
            if value is not None and value is not False:
                raise ValueError(f"{name} is not supported by ramba models: {UNSUPPORTED_GENERATE[name]}")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, RambaCache):
            raise TypeError(f"cache must be a RambaCache (from a previous call's output), got {type(cache).__name__}")
        keep = None if logits_to_keep == 0 else logits_to_keep
        if cache is None and not use_cache:
            out = self.hybrid(input_ids, labels=labels, attention_mask=attention_mask, logits_to_keep=keep)
            return RambaCausalLMOutput(loss=out.loss, logits=out.logits)
        if labels is not None:
            raise ValueError("labels with a cache are not supported: compute the loss without use_cache")
        if cache is None:
            cache = RambaCache(self.hybrid.new_cache(input_ids.shape[0]))
        logits = self._forward_cached(input_ids, attention_mask, cache, keep)
        return RambaCausalLMOutput(logits=logits, cache=cache)

    def _forward_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: RambaCache,
                        keep: int | None) -> torch.Tensor:
        """Continue `cache` with input_ids [B, L], in segments of SEGMENT tokens; logits of the last keep."""
        L = input_ids.shape[1]
        if attention_mask is not None:
            if attention_mask.shape[1] != L:  # a mask of the whole sequence so far: its new columns are tokens
                if not bool((attention_mask[:, -L:] != 0).all()):
                    raise ValueError("with a cache, padding is only allowed in the call that starts it")
                attention_mask = None
            elif cache.seen and bool((attention_mask != 0).all()):
                attention_mask = None
        keep = L if keep is None else keep
        pieces = []
        for start, end in prefill_segments(L, SEGMENT, attention_mask):
            mask = attention_mask[:, start:end] if attention_mask is not None and start == 0 else None
            want = max(0, end - max(start, L - keep))
            pieces.append(self.hybrid(input_ids[:, start:end], attention_mask=mask, cache=cache.inner,
                                      logits_to_keep=want).logits)
            cache.seen += end - start
        return torch.cat(pieces, dim=1)

    # --------------------------------------------------------------- generation
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: RambaCache | None = None,
                                      attention_mask: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        """The columns of input_ids the cache has not read yet, with the mask only before the cache starts."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        inputs: dict[str, Any] = {"use_cache": kwargs.get("use_cache", True)}
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
            inputs["cache"] = cache
        elif attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if kwargs.get("logits_to_keep") is not None:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        inputs["input_ids"] = input_ids.to(self.device)
        return inputs

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' generate, after refusing the arguments a ramba model cannot honour (each named, with
        why). Greedy generate equals `model.hybrid.generate` token for token."""
        for name, why in UNSUPPORTED_GENERATE.items():
            if kwargs.get(name) not in (None, False):
                raise ValueError(f"generate({name}=...) is not supported by ramba models: {why}")
        config = kwargs.get("generation_config")
        if config is not None and getattr(config, "cache_implementation", None) is not None:
            raise ValueError(f"generation_config.cache_implementation is not supported by ramba models: "
                             f"{UNSUPPORTED_GENERATE['cache_implementation']}")
        return super().generate(*args, **kwargs)
