"""Deterministic synthetic long-context documents (pass key, key-value recall) and training batches.

Everything draws from a `random.Random` passed in or built from a seed; the global RNG is never used.
Documents are pure ASCII, so character offsets equal byte offsets.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from ramba.tokenizer import Tokenizer

ADJECTIVES = (
    "old young quiet bright dark small large warm cold green silver golden gentle busy empty distant "
    "narrow wide heavy soft ancient simple strange calm happy tired careful wooden early hidden open "
    "clear proud lonely famous"
).split()
NOUNS = (
    "river garden house village mountain forest road bridge window door table letter book lamp market "
    "city field boat train station tower castle school teacher farmer baker child dog cat horse bird "
    "tree flower stone cloud song story map kitchen library harbor island valley hill path wall roof "
    "candle basket coat hat ship wagon well fire cup chair shop painter sailor doctor king queen neighbor"
).split()
NAMES = "Anna Ben Clara David Elena Felix Grace Henry Iris Jonas Kate Leo Maria Noah Olivia".split()
TRANSITIVE = (
    "carried painted found watched opened closed cleaned visited crossed repaired followed noticed "
    "lifted built bought sold wrote read moved remembered borrowed filled described admired"
).split()
INTRANSITIVE = (
    "walked waited slept smiled laughed rested wandered listened arrived returned stayed sang worked "
    "danced paused turned climbed stood sat shouted"
).split()
ADVERBS = (
    "slowly quickly quietly carefully happily often rarely again gently suddenly softly later calmly "
    "proudly briefly patiently eagerly together alone once"
).split()
PREPOSITIONS = "near behind beside across along under over past through around toward inside".split()
TIMES = (
    "In the morning", "Later that day", "At night", "Before dinner", "After the storm", "Every summer",
    "On Sunday", "Long ago", "That evening", "At dawn", "Soon after", "In winter",
)
TEMPLATES = (
    "The {adj} {noun} {iverb} {prep} the {noun}.",
    "{name} {tverb} the {adj} {noun} {adv}.",
    "{time}, {name} {iverb} {prep} the {noun}.",
    "{name} and {name} {tverb} the {noun} {prep} the {noun}.",
    "Nobody knew why the {noun} was so {adj}.",
    "The {noun} was {adj}, and the {noun} was {adj}.",
    "{name} said that the {noun} {prep} the {noun} looked {adj}.",
    "When the {noun} {iverb}, {name} {iverb} {adv}.",
    "{time}, the {adj} {noun} {iverb} {adv}.",
    "It was {a_adj} day in the {noun}.",
    "{name} {tverb} {a_noun} and {iverb}.",
)
SHORT = (
    "No.", "Yes.", "Why?", "Look.", "Wait.", "Rain fell.", "All was calm.", "Time passed.", "Nobody spoke.",
    "Night fell.", "The sun rose.", "Birds sang.", "It was late.", "The wind blew.", "Then it was quiet.",
)
SLOTS = {
    "adj": ADJECTIVES, "noun": NOUNS, "name": NAMES, "tverb": TRANSITIVE, "iverb": INTRANSITIVE,
    "adv": ADVERBS, "prep": PREPOSITIONS, "time": TIMES,
}
PASSKEY_QUESTION = "What is the pass key? The pass key is"
KEY_ALPHABET = string.ascii_uppercase + string.digits
MIN_SEQ_LEN = 256
MIN_FILL = 0.75


@dataclass(frozen=True)
class Sample:
    """A document: `prompt` ends with a question whose continuation is `answer`.

    needle_start, needle_end: character offsets in `prompt` where the sentence holding the answer begins and
    ends (exclusive).
    """

    prompt: str
    answer: str
    needle_start: int
    needle_end: int


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: random.Random) -> str:
    """One sentence from a random template, each slot filled independently."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(rng.choice(TEMPLATES)):
        parts.append(literal)
        if field is None:
            continue
        if field.startswith("a_"):
            parts.append(_with_article(rng.choice(SLOTS[field[2:]])))
        else:
            parts.append(rng.choice(SLOTS[field]))
    return "".join(parts)


def _sentences(rng: random.Random, n_chars: int) -> list[str]:
    """Sentences whose space-joined length is at most `n_chars` and at least `n_chars - 3`."""
    out: list[str] = []
    used = -1  # length of " ".join(out); the first sentence needs no space
    misses = 0
    while misses < 4:  # a few more draws once one does not fit, then close the gap with short ones
        candidate = _sentence(rng)
        if used + 1 + len(candidate) > n_chars:
            misses += 1
            continue
        out.append(candidate)
        used += 1 + len(candidate)
    while True:
        short = SHORT + (
            f"{rng.choice(NAMES)} {rng.choice(INTRANSITIVE)}.",
            f"The {rng.choice(NOUNS)} was {rng.choice(ADJECTIVES)}.",
        )
        fitting = [s for s in short if used + 1 + len(s) <= n_chars]
        if not fitting:
            return out
        out.append(max(fitting, key=len))
        used += 1 + len(out[-1])


def filler(rng: random.Random, n_chars: int) -> str:
    """English-like filler text of whole sentences, between `n_chars - 3` and `n_chars` characters."""
    return " ".join(_sentences(rng, n_chars))


def _assemble(
    rng: random.Random, length_chars: int, inserts: list[tuple[float, str]], question: str, answer: str
) -> tuple[str, list[int]]:
    """Filler with each (depth, text) insert placed at the sentence boundary nearest `depth`, then `question`.

    Returns the prompt and each insert's start offset; len(prompt + answer) is within 4 of `length_chars`.
    """
    n_filler = length_chars - len(answer) - len(question) - 1 - sum(len(t) + 1 for _, t in inserts)
    if n_filler < 0:
        raise ValueError(f"length_chars={length_chars} is too short for the needle(s) and question")
    sentences = _sentences(rng, n_filler)
    total = len(" ".join(sentences))
    bounds, offset = [], 0  # bounds[i]: filler offset where sentence i starts (i == len: the end)
    for s in sentences:
        bounds.append(offset)
        offset += len(s) + 1
    bounds.append(offset)
    slots = [min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * total)) for depth, _ in inserts]
    order = sorted(range(len(inserts)), key=lambda k: slots[k])
    pieces: list[str] = []
    starts = [0] * len(inserts)
    nxt, offset = 0, 0
    for k in order:
        for s in sentences[nxt:slots[k]]:
            pieces.append(s)
            offset += len(s) + 1
        nxt = max(nxt, slots[k])
        starts[k] = offset
        pieces.append(inserts[k][1])
        offset += len(inserts[k][1]) + 1
    pieces.extend(sentences[nxt:])
    pieces.append(question)
    return " ".join(pieces), starts


def _check_depth(depth: float) -> float:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return depth


def passkey_document(rng: random.Random, length_chars: int, depth: float | None = None) -> Sample:
    """Filler hiding a 5-to-7 digit pass key at `depth` (fraction of the filler; random if None)."""
    depth = rng.random() if depth is None else _check_depth(depth)
    n_digits = rng.randint(5, 7)
    key = str(rng.randrange(10 ** (n_digits - 1), 10**n_digits))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    answer = f" {key}"
    prompt, (start,) = _assemble(rng, length_chars, [(depth, needle)], PASSKEY_QUESTION, answer)
    return Sample(prompt, answer, start, start + len(needle))


def _kv_key(rng: random.Random) -> str:
    return "".join(rng.choices(KEY_ALPHABET, k=4)) + "-" + "".join(rng.choices(KEY_ALPHABET, k=4))


def kv_recall_document(rng: random.Random, length_chars: int, n_pairs: int) -> Sample:
    """Filler with `n_pairs` facts "Key XXXX-XXXX has value NNNNNN." at random depths; asks for one value."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    keys: list[str] = []
    while len(keys) < n_pairs:
        key = _kv_key(rng)
        if key not in keys:
            keys.append(key)
    values = rng.sample(range(100000, 1000000), n_pairs)
    asked = rng.randrange(n_pairs)
    facts = [(rng.random(), f"Key {k} has value {v}.") for k, v in zip(keys, values)]
    question = f"What is the value of key {keys[asked]}? The value is"
    answer = f" {values[asked]}"
    prompt, starts = _assemble(rng, length_chars, facts, question, answer)
    return Sample(prompt, answer, starts[asked], starts[asked] + len(facts[asked][1]))


def _examples(rng: random.Random, seq_len: int, tokenizer: Tokenizer) -> Iterator[dict[str, torch.Tensor]]:
    """Examples forever (see `synthetic_examples`); one bos + prompt + answer + eos document per example (eos
    stands in for a missing bos)."""
    bos = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    while True:
        length = rng.randint(math.ceil(MIN_FILL * seq_len), seq_len - 2)
        if rng.random() < 0.5:
            sample = passkey_document(rng, length)
        else:
            sample = kv_recall_document(rng, length, rng.randint(1, max(1, min(16, length // 200))))
        prompt = [bos] + tokenizer.encode(sample.prompt)
        answer = tokenizer.encode(sample.answer)
        ids = prompt + answer + [tokenizer.eos_id]
        if len(ids) > seq_len:
            raise ValueError(f"document of {len(ids)} tokens does not fit seq_len={seq_len}")
        n_pad = seq_len - len(ids)
        input_ids = torch.tensor(ids + [tokenizer.pad_id] * n_pad, dtype=torch.long)
        labels = input_ids.clone()
        labels[len(ids):] = -100
        mask = torch.zeros(seq_len, dtype=torch.bool)
        mask[len(prompt):len(prompt) + len(answer)] = True
        needle = 1 + len(tokenizer.encode(sample.prompt[:sample.needle_start]))
        needle_end = 1 + len(tokenizer.encode(sample.prompt[:sample.needle_end]))
        yield {"input_ids": input_ids, "labels": labels, "answer_mask": mask, "needle_pos": torch.tensor(needle),
               "needle_end": torch.tensor(needle_end)}


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

    Each example is one pass-key or key-value document (50/50, random depth) filling 70-100% of
    seq_len, right-padded with pad_id; labels equal input_ids (unshifted) with -100 on pads.
    """
    return ((ex["input_ids"], ex["labels"]) for ex in synthetic_examples(seed, seq_len, tokenizer))


def make_batch(seed: int, batch_size: int, seq_len: int, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """The first `batch_size` examples of `synthetic_examples(seed, ...)` stacked.

    Keys: input_ids, labels (LongTensor [B, seq_len]); answer_mask (bool [B, seq_len], True on answer tokens);
    needle_pos, needle_end [B].
    """
    rows = list(islice(synthetic_examples(seed, seq_len, tokenizer), batch_size))
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
