"""Answerers of the benchmarks: a model answering greedily with a segment-wise prefill, or the oracle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from benchmarks.common import BenchmarkError
from ramba.generation import generate
from ramba.data.tasks import Sample
from ramba.loading import load_model
from ramba.tokenizer import Tokenizer, load_tokenizer

PROGRESS_SEGMENTS = 16  # prefill progress bar from this many segments on


class Answerer(Protocol):
    """Anything that answers samples: a model with its tokenizer, or the oracle."""

    name: str
    tokenizer: Tokenizer

    def answer(self, sample: Sample) -> str: ...


@torch.no_grad()
def answer_greedy(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, segment: int = 4096,
                  stop_ids: Sequence[int] = (), offload: bool = False, progress: bool | None = None) -> list[int]:
    """Greedy continuation (token ids, without the stop token) of a 1-D prompt.

    The prompt is prefilled in segments into a cache (`model.new_cache(1)`, then `model(segment, cache=cache,
    logits_to_keep=0)`, the last segment keeping one logit), so memory stays flat in the prompt length apart
    from the model's chunk memory; only one segment at a time goes to the model's device. `model` is an
    HSAHybrid or any module with the same `new_cache` / `forward(..., cache=, logits_to_keep=)` interface.
    """
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D tensor, got shape {tuple(prompt_ids.shape)}")
    show = -(-prompt_ids.numel() // max(segment, 1)) >= PROGRESS_SEGMENTS if progress is None else progress
    ids = generate(model, prompt_ids.long()[None], max_new_tokens, stop_tokens=stop_ids, segment_size=segment,
                   offload=offload, progress=show)
    out = ids[0, prompt_ids.numel():].tolist()
    stops = set(stop_ids)
    return next((out[:i] for i, token in enumerate(out) if token in stops), out)


@dataclass
class ModelAnswerer:
    """Greedy answers of a model (HSAHybrid or the same interface)."""

    name: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    segment: int = 4096
    offload: bool = False

    def answer(self, sample: Sample) -> str:
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        ids = answer_greedy(self.model, sample.prompt_ids, sample.max_new_tokens, self.segment, stops, self.offload)
        return self.tokenizer.decode(ids)


@dataclass
class OracleAnswerer:
    """Always answers the ideal continuation: checks the benchmark pipeline and its scoring end to end."""

    name: str
    tokenizer: Tokenizer

    def answer(self, sample: Sample) -> str:
        return sample.target


def benchmark_tokenizer(spec: str | None, checkpoint: str | None = None) -> Tokenizer:
    """ramba.tokenizer.load_tokenizer (--tokenizer, else the checkpoint's own, else bytes); its errors as
    BenchmarkError."""
    try:
        return load_tokenizer(spec, checkpoint)
    except (ImportError, ValueError) as err:
        raise BenchmarkError(str(err)) from err


def load_answerer(spec: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
                  segment: int = 4096, offload: bool = False) -> Answerer:
    """`--checkpoint` value -> Answerer: `[NAME=]DIR` (a directory written by HSAHybrid.save_pretrained),
    `builtin:tiny-random` (the tiny preset, randomly initialised, seed 0) or `oracle`."""
    name, sep, path = spec.partition("=")
    if not sep:
        name = path = spec
    if path == "oracle":
        return OracleAnswerer(name, benchmark_tokenizer(tokenizer))
    model, tok = load_checkpoint_model(name, path, f"--checkpoint {spec}", tokenizer, device, dtype,
                                       " (or give oracle)")
    return ModelAnswerer(name, model, tok, segment, offload)


def load_checkpoint_model(name: str, path: str, flag: str, tokenizer: str | None, device: str, dtype: str,
                          hint: str = "") -> tuple[torch.nn.Module, Tokenizer]:
    """The model at `path` (a save_pretrained folder or builtin:tiny-random) on `device` and its tokenizer
    (`tokenizer`, else the folder's own, else bytes); BenchmarkError naming `flag` when either cannot be used."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    try:
        model = load_model(path, device, dtype)
    except ValueError as err:
        raise BenchmarkError(f"{flag}: {err}{hint}") from err
    tok = benchmark_tokenizer(tokenizer, None if path.startswith("builtin:") else path)
    if tok.vocab_size > model.config.vocab_size:
        raise BenchmarkError(f"the tokenizer {tok.name!r} has {tok.vocab_size} ids but the model {name!r} only "
                             f"{model.config.vocab_size}: give the model's own tokenizer with --tokenizer")
    return model, tok
