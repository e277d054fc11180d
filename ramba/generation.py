"""Text generation with an inference cache: segment-wise prefill, then one token at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .cache import HSACache
from .decoding import StaticDecoder, unsupported

if TYPE_CHECKING:
    from .model import HSAHybrid


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's weights (CPU for a model without any)."""
    tensor = next(chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def prefill_segments(length: int, size: int, attention_mask: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(start, end) pieces of at most `size` tokens that cover [0, length), for feeding a cache. With left
    padding (attention_mask [B, length], 0 for padding) the first piece is long enough to hold every row's
    padding and its first token, since a cache takes padding in its first call only."""
    first = size
    if attention_mask is not None:
        first = max(size, int((attention_mask == 0).sum(1).max()) + 1)
    bounds = [0, *range(min(first, length), length, size), length]
    return list(zip(bounds[:-1], bounds[1:]))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Sample from logits [B, V] with temperature and nucleus (top-p) filtering -> ids [B]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def greedy_steps(model: torch.nn.Module, cache, token: torch.Tensor) -> Iterator[torch.Tensor]:
    """Greedy decoding from a prefilled cache, one model call per step: feeds token [B, 1] and yields the next
    one [B, 1], without end (stop by not asking for more). For timing single decoding steps; `model` as in
    generate."""
    while True:
        with torch.no_grad():
            token = model(token, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        yield token


@dataclass
class GenerateOutput:
    """What `generate(..., return_retrieval=True)` returns.

    sequences [B, L + T]: the prompts and their continuations. retrieval: for each HSA block, the chunks
    [B, T, Hr, K] selected at the position that predicts each of the T generated tokens (-1 in empty slots);
    retrieval_weights: their mixing weights [B, T, Hr, K] (0 in empty slots); as in HSAOutput."""

    sequences: torch.Tensor
    retrieval: list[torch.Tensor]
    retrieval_weights: list[torch.Tensor]


@torch.no_grad()
def generate(
    model: HSAHybrid,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_tokens: Iterable[int] = (),
    pad_token_id: int = 0,
    segment_size: int = 4096,
    offload: bool = False,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    return_retrieval: bool = False,
    static_decode: bool | None = None,
) -> torch.Tensor | GenerateOutput:
    """Continue every row of input_ids [B, L] by up to max_new_tokens tokens -> [B, L + T] on input_ids' device.

    attention_mask [B, L] marks left padding (0) of shorter prompts. Greedy unless do_sample (temperature,
    top_p). A row stops after it emits one of stop_tokens; later positions get pad_token_id. The prompt is
    prefilled in segments of segment_size tokens, each moved to the model's device on its own, so a very long
    prompt can stay in CPU memory (a progress bar shows when there are several segments). `model` is an
    HSAHybrid or any module with the same `new_cache` / `forward(..., cache=, logits_to_keep=)` interface.
    return_retrieval: return a GenerateOutput that also holds, for every generated token, the chunks each HSA
    block read to predict it and their weights (an HSAHybrid only).
    static_decode: decode with a `ramba.decoding.StaticDecoder` (fixed-shape steps, captured in CUDA graphs on
    a GPU) instead of one model call per token; None (default) does so on CUDA whenever the cache allows it
    (an HSAHybrid's cache, not sharded, without return_retrieval; an offloaded one where the Triton kernels
    take the model's head dim and chunk size). True forces it (on CPU too, eagerly) and raises ValueError where
    it cannot run; False never uses it.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got {tuple(input_ids.shape)}")
    for name, value, low in (("max_new_tokens", max_new_tokens, 0), ("segment_size", segment_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if static_decode and return_retrieval:
        raise ValueError("static_decode=True cannot decode with return_retrieval=True: leave static_decode unset or "
                         "False")
    model.eval()
    B, L = input_ids.shape
    device = model_device(model)
    if attention_mask is not None:
        valid = attention_mask != 0
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError("generate needs left padding (pad tokens before the prompt); right-padded prompts "
                             "would continue from their padding")
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    cache = model.new_cache(B, offload=offload)
    if static_decode and not isinstance(cache, HSACache):
        raise ValueError(f"static_decode=True needs an HSAHybrid (its HSACache); {type(model).__name__} made a "
                         f"{type(cache).__name__}: leave static_decode unset or False")
    auto = static_decode is None
    static = max_new_tokens > 1 and (static_decode or (auto and device.type == "cuda" and not return_retrieval
                                                       and isinstance(cache, HSACache)))
    if static:  # the decoder's memory, reserved before the prefill: it never grows (nor copies) later
        cache.store.reserve(-(-(L + max_new_tokens) // cache.config.chunk_size))
    segments = prefill_segments(L, segment_size, attention_mask)
    bar = tqdm(total=L, desc="prefill", unit="tok", disable=not (progress if progress is not None else len(segments) > 1))
    for i, (start, end) in enumerate(segments):
        padding = {} if attention_mask is None or i else {"attention_mask": attention_mask[:, start:end].to(device)}
        extra = {"return_retrieval": True} if return_retrieval and end == L else {}
        step_out = model(input_ids[:, start:end].to(device), cache=cache, logits_to_keep=1 if end == L else 0,
                         **padding, **extra)
        bar.update(end - start)
    bar.close()
    decoder = None
    if static and (not auto or unsupported(model, cache) is None):
        decoder = StaticDecoder(model, cache, max_new_tokens - 1)

    out = [input_ids]
    reads: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # per token: each block's chunks, weights
    done = torch.zeros(B, dtype=torch.bool, device=device)
    last = step_out.logits[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(last, temperature, top_p, generator) if do_sample else last.argmax(-1)
        token = token.masked_fill(done, pad_token_id)
        out.append(token[:, None].to(input_ids.device))
        if return_retrieval:
            reads.append((step_out.retrieval, step_out.retrieval_weights))
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if decoder is not None:
            last = decoder.step(token)
        else:
            step_out = model(token[:, None], cache=cache, **({"return_retrieval": True} if return_retrieval else {}))
            last = step_out.logits[:, -1]
    sequences = torch.cat(out, dim=1)
    if not return_retrieval:
        return sequences
    if not reads:  # max_new_tokens == 0: nothing generated, nothing read
        reads = [([i[:, :0] for i in step_out.retrieval], [w[:, :0] for w in step_out.retrieval_weights])]
    blocks = range(len(reads[0][0]))
    return GenerateOutput(sequences, [torch.cat([r[0][b][:, -1:] for r in reads], dim=1) for b in blocks],
                          [torch.cat([r[1][b][:, -1:] for r in reads], dim=1) for b in blocks])
