"""Key-value recall: facts "Key XXXX-XXXX has value NNNNNN." spread over an essay haystack; one key is asked.

Part of the built-in pre-training mixture (ramba.data.synthetic); not in the benchmark registry `TASKS`.
"""

from __future__ import annotations

import random
import string

from ramba.tokenizer import Tokenizer

from .passkey import score
from .prompt import Sample, TaskError, build_prompt, haystack_units

FACT = "Key {key} has value {value}."
QUESTION = "What is the value of key {key}? The value is"
KEY_ALPHABET = string.ascii_uppercase + string.digits


def _key(rng: random.Random) -> str:
    return "".join(rng.choices(KEY_ALPHABET, k=4)) + "-" + "".join(rng.choices(KEY_ALPHABET, k=4))


def sample(rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None,
           n_pairs: int = 1) -> Sample:
    """`length` tokens: `n_pairs` facts with distinct keys and 6-digit values in an essay haystack, then a question
    about one of them. The asked fact is the first insert (insert_offsets[0]) and lies at `depth` (random if
    None); the others lie at random depths."""
    if n_pairs < 1:
        raise TaskError(f"kv: n_pairs must be >= 1, got {n_pairs}")
    keys: list[str] = []
    while len(keys) < n_pairs:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    values = rng.sample(range(100000, 1000000), n_pairs)
    asked = rng.randrange(n_pairs)
    order = [asked] + [i for i in range(n_pairs) if i != asked]
    inserts = [(depth if i == asked and depth is not None else rng.random(),
                " " + FACT.format(key=keys[i], value=values[i])) for i in order]
    prompt = build_prompt(tokenizer, length, "", haystack_units("essay", rng), inserts,
                          " " + QUESTION.format(key=keys[asked]), "kv")
    target = f" {values[asked]}"
    return Sample(prompt.ids, target, [str(values[asked])], len(tokenizer.encode(target)) + 4,
                  prompt.insert_offsets, prompt.insert_ends)


__all__ = ["FACT", "QUESTION", "sample", "score"]
