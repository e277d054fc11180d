"""The built-in pre-training mixture: pass-key and key-value recall documents of ramba.data.tasks, one per
sequence, with the token span of the fact that holds the answer (for retrieval statistics).

Everything draws from a `random.Random` built from the seed; the global RNG is never used.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from itertools import islice

import torch

from ramba.tokenizer import Tokenizer

from .tasks import Sample, kv, passkey

MIN_SEQ_LEN = 256
MIN_FILL = 0.75  # the shortest prompt, as a fraction of seq_len
ANSWER_ROOM = 10  # tokens left after the longest prompt: the answer (8 byte tokens at most), eos, a start token


def document(rng: random.Random, tokenizer: Tokenizer, length: int) -> Sample:
    """A prompt of `length` tokens over an essay haystack, the asked fact at a random depth: a pass key (half the
    time) or 1 to 16 key-value facts (about one per 200 tokens)."""
    if rng.random() < 0.5:
        return passkey.sample(rng, tokenizer, length, haystack="essay")
    return kv.sample(rng, tokenizer, length, n_pairs=rng.randint(1, max(1, min(16, length // 200))))


def needle_span(sample: Sample, tokenizer: Tokenizer) -> tuple[int, int]:
    """Token span [start, end) in sample.prompt_ids of the fact that holds the answer (the sample's first insert),
    without the whitespace tokens that separate it from the haystack."""
    start, end = sample.insert_offsets[0], sample.insert_ends[0]
    while start < end and not tokenizer.decode(sample.prompt_ids[start:start + 1].tolist()).strip():
        start += 1
    return start, end


def _examples(rng: random.Random, seq_len: int, tokenizer: Tokenizer) -> Iterator[dict[str, torch.Tensor]]:
    """Examples forever (see `synthetic_examples`); one prompt + answer + eos document per example, the prompt
    starting with bos (eos where the tokenizer has no bos)."""
    start = [] if tokenizer.bos_id is not None else [tokenizer.eos_id]
    while True:
        sample = document(rng, tokenizer, rng.randint(math.ceil(MIN_FILL * seq_len), seq_len - ANSWER_ROOM))
        prompt = start + sample.prompt_ids.tolist()
        answer = tokenizer.encode(sample.target)
        ids = prompt + answer + [tokenizer.eos_id]
        if len(ids) > seq_len:
            raise ValueError(f"document of {len(ids)} tokens does not fit seq_len={seq_len}: this tokenizer spends "
                             f"more than {ANSWER_ROOM - 2} tokens on the answer {sample.target!r}")
        input_ids = torch.full((seq_len,), tokenizer.pad_id, dtype=torch.long)
        input_ids[:len(ids)] = torch.tensor(ids)
        labels = input_ids.clone()
        labels[len(ids):] = -100
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[len(prompt):len(prompt) + len(answer)] = True
        needle, needle_end = needle_span(sample, tokenizer)
        yield {"input_ids": input_ids, "labels": labels, "answer_mask": mask,
               "needle_pos": torch.tensor(len(start) + needle), "needle_end": torch.tensor(len(start) + needle_end)}


def synthetic_examples(seed: int, seq_len: int, tokenizer: Tokenizer) -> Iterator[dict[str, torch.Tensor]]:
    """Infinite deterministic stream of examples, one pass-key or key-value document each, as dicts:
    input_ids, labels [seq_len] (labels unshifted, -100 on padding), answer_mask bool [seq_len] (the answer
    tokens), needle_pos and needle_end (token indices where the fact that holds the answer starts and ends,
    exclusive)."""
    if seq_len < MIN_SEQ_LEN:
        raise ValueError(f"seq_len must be >= {MIN_SEQ_LEN}, got {seq_len}")
    return _examples(random.Random(seed), seq_len, tokenizer)


def training_mixture(seed: int, seq_len: int, tokenizer: Tokenizer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite deterministic stream of (input_ids [seq_len], labels [seq_len]).

    Each example is one pass-key or key-value document (50/50, random depth) filling 75-100% of seq_len,
    right-padded with pad_id; labels equal input_ids (unshifted) with -100 on pads.
    """
    return ((ex["input_ids"], ex["labels"]) for ex in synthetic_examples(seed, seq_len, tokenizer))


def make_batch(seed: int, batch_size: int, seq_len: int, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """The first `batch_size` examples of `synthetic_examples(seed, ...)` stacked.

    Keys: input_ids, labels (LongTensor [B, seq_len]); answer_mask (bool [B, seq_len], True on answer tokens);
    needle_pos, needle_end [B].
    """
    rows = list(islice(synthetic_examples(seed, seq_len, tokenizer), batch_size))
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
