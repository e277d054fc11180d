"""Prompts of an exact token length: a head, a haystack with facts inserted at chosen depths, a tail.

Everything draws from a `random.Random`; `sample_rng` derives one per sample from a seed and a `Key`.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, count, cycle, islice
from pathlib import Path

import torch

from ramba.tokenizer import ByteTokenizer, Tokenizer

from ..texts import read_texts
from .filler import sentences

NOISE = ("The sky is clear and the sea is calm.", "The fields are green.", "A boat drifts past the old pier.",
         "Nothing much happens here.", "Then it all starts over.")
HAYSTACKS = ("noise", "essay")  # plus "text:PATH", sentences of a corpus file (see haystack_units)
TEXT_PREFIX = "text:"
MAX_UNIT_CHARS = 600  # longer sentences (tables, code) are left out of a text haystack


class TaskError(ValueError):
    """A task that cannot be generated: an unknown task or haystack, a length too short for the task."""


@dataclass(frozen=True)
class Key:
    """Identifies one sample: task name, prompt length in tokens, depth (None: random) and sample index."""

    task: str
    length: int
    depth: float | None
    index: int


def sample_rng(seed: int, key: Key) -> random.Random:
    """The random source of one sample: the same for the same seed and key, whatever else runs."""
    return random.Random(f"{seed}:{key.task}:{key.length}:{key.depth}:{key.index}")


@dataclass
class Sample:
    """One question: prompt token ids (int32 [length], CPU), the ideal continuation, and what scoring looks for."""

    prompt_ids: torch.Tensor
    target: str
    references: list[str]
    max_new_tokens: int
    insert_offsets: list[int] = field(default_factory=list)  # token offset of each inserted fact
    insert_ends: list[int] = field(default_factory=list)  # token offset where each inserted fact ends (exclusive)


TaskFn = Callable[[random.Random, Tokenizer, int, float | None], Sample]  # (rng, tokenizer, length, depth)


@dataclass
class Prompt:
    """A prompt built by build_prompt."""

    ids: torch.Tensor  # int32 [length]
    insert_offsets: list[int]  # token offset of each insert, in the order given
    insert_ends: list[int]  # token offset where each insert ends (exclusive)
    whole_units: int  # haystack units included whole (the next one may be cut)


def encode_prompt(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """int32 [n]: bos (where the tokenizer has one), then the tokens of `text`."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return torch.tensor(bos + tokenizer.encode(text), dtype=torch.int32)


def _encode_block(tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """int32 [n] ids of the texts one after another, and each text's token count (bytes read directly for the
    byte tokenizer: a 64M-token haystack in about a second instead of ten)."""
    if isinstance(tokenizer, ByteTokenizer):
        raw = [text.encode("utf-8") for text in texts]
        joined = bytearray(b"".join(raw))
        if not joined:
            return torch.empty(0, dtype=torch.int32), [0] * len(raw)
        return torch.frombuffer(joined, dtype=torch.uint8).to(torch.int32), [len(r) for r in raw]
    encoded = tokenizer.encode_many(texts)
    return torch.tensor(list(chain.from_iterable(encoded)), dtype=torch.int32), [len(ids) for ids in encoded]


def _haystack(tokenizer: Tokenizer, units: Iterator[str], budget: int) -> tuple[torch.Tensor, list[int], int]:
    """Token ids of the first `budget` tokens of the concatenated units, the boundaries of the whole units (token
    offsets, 0 included; `budget` only when the last unit is whole) and the number of whole units."""
    pieces, bounds, total = [], [0], 0
    while total < budget:
        size = 64 if total == 0 else min(65536, max(64, int(1.05 * (budget - total) * (len(bounds) - 1) / total)))
        block = list(islice(units, size))
        if not block:
            raise TaskError("the haystack ran out of text")
        ids, lengths = _encode_block(tokenizer, block)
        for n in lengths:
            total += n
            bounds.append(total)
        pieces.append(ids)
    ids = torch.cat(pieces)[:budget]
    whole = bisect.bisect_right(bounds, budget) - 1
    return ids, bounds[:whole + 1], whole


def _nearest(bounds: list[int], position: float) -> int:
    i = bisect.bisect_left(bounds, position)
    candidates = bounds[max(0, i - 1):i + 1]
    return min(candidates, key=lambda b: abs(b - position))


def build_prompt(tokenizer: Tokenizer, length: int, head: str, units: Iterator[str],
                 inserts: Sequence[tuple[float, str]], tail: str, task: str) -> Prompt:
    """bos + head + haystack + tail of exactly `length` tokens, with each (depth, text) insert placed at the unit
    boundary of the haystack nearest `depth` (0: its start, 1: its end; inserts at one place keep their order).
    Inserts never split a unit: the last unit, cut where the length runs out, comes after every insert.

    The haystack is the token stream of `units` cut at the length that remains; units and inserts carry their
    own separators (a leading space, say). `task` names the task in errors.
    """
    head_ids = encode_prompt(tokenizer, head)
    bad = [depth for depth, _ in inserts if not 0.0 <= depth <= 1.0]
    if bad:
        raise TaskError(f"{task}: depth must be in [0, 1], got {bad[0]}")
    tail_ids = tokenizer.encode(tail)
    insert_ids = tokenizer.encode_many([text for _, text in inserts])
    fixed = len(head_ids) + len(tail_ids) + sum(map(len, insert_ids))
    if fixed >= length:
        raise TaskError(f"{task}: a length of {length} tokens is too short; its instructions, question and "
                        f"{len(inserts)} inserted fact(s) alone take {fixed} tokens")
    hay, bounds, whole = _haystack(tokenizer, units, length - fixed)
    slots = [_nearest(bounds, depth * len(hay)) for depth, _ in inserts]
    parts, offsets, cursor, offset = [head_ids], [0] * len(inserts), 0, len(head_ids)
    for k in sorted(range(len(inserts)), key=lambda k: (slots[k], k)):
        parts.append(hay[cursor:slots[k]])
        offset += slots[k] - cursor
        cursor = slots[k]
        offsets[k] = offset
        parts.append(torch.tensor(insert_ids[k], dtype=torch.int32))
        offset += len(insert_ids[k])
    parts += [hay[cursor:], torch.tensor(tail_ids, dtype=torch.int32)]
    ends = [start + len(ids) for start, ids in zip(offsets, insert_ids)]
    return Prompt(torch.cat(parts), offsets, ends, whole)


def _split_sentences(text: str) -> Iterator[str]:
    """Sentences of `text`, paragraph by paragraph, whitespace collapsed."""
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            sentence = " ".join(sentence.split())
            if sentence:
                yield sentence


@functools.lru_cache(maxsize=4)
def _corpus_units(path: str, mtime_ns: int) -> tuple[str, ...]:
    """The haystack units of a corpus file (cached per path and modification time)."""
    try:
        texts = read_texts(path)
    except ValueError as err:
        raise TaskError(f"haystack {TEXT_PREFIX}{path}: {err}") from None
    units = tuple(" " + s for text in texts for s in _split_sentences(text)
                  if len(s) <= MAX_UNIT_CHARS and not any(c.isdigit() for c in s))
    if not units:
        raise TaskError(f"haystack {TEXT_PREFIX}{path}: no usable sentences (sentences with digits are left out)")
    return units


def check_haystack(kind: str, need_file: bool = True) -> str:
    """`kind` if it names a haystack: noise, essay or text:PATH with PATH an existing .jsonl (a "text" field per
    line) or text file (need_file=False: any non-empty PATH); otherwise a TaskError that says why."""
    if kind in HAYSTACKS:
        return kind
    if kind.startswith(TEXT_PREFIX) and (kind[len(TEXT_PREFIX):] or need_file):
        path = Path(kind[len(TEXT_PREFIX):])
        if need_file and not path.is_file():
            raise TaskError(f"haystack {kind!r}: no such file {str(path)!r} (give text:PATH with PATH a .jsonl "
                            "file with a \"text\" field per line, such as a corpus validation.jsonl, or a .txt file)")
        return kind
    raise TaskError(f"unknown haystack {kind!r}; choose one of {', '.join(HAYSTACKS)} or {TEXT_PREFIX}PATH")


def haystack_units(kind: str, rng: random.Random) -> Iterator[str]:
    """Haystack text, unit by unit (each with a leading space): `noise`, one short passage repeated, or `essay`,
    English-like filler sentences (`filler.sentences`, 120 characters at a time) drawn from a generator seeded
    by `rng`, one sentence per unit so that facts land at sentence boundaries, or `text:PATH`, the sentences
    of a corpus file (a .jsonl with a "text" field per line, or plain text) in order from a start drawn from
    `rng`, cycling at the end; sentences that hold digits (so numbers in a prompt stay facts) or more than
    MAX_UNIT_CHARS characters are left out."""
    if kind == "noise":
        return (" " + sentence for sentence in cycle(NOISE))
    if kind == "essay":
        child = random.Random(rng.getrandbits(64))
        return (" " + sentence for _ in count() for sentence in sentences(child, 120))
    check_haystack(kind)
    path = Path(kind[len(TEXT_PREFIX):])
    units = _corpus_units(str(path.resolve()), path.stat().st_mtime_ns)
    start = rng.randrange(len(units))
    return (units[i % len(units)] for i in count(start))
