"""Pass key: a 5-to-7-digit key hidden at a chosen depth of a long haystack, asked for at the end."""

from __future__ import annotations

import random
import re

from ramba.tokenizer import Tokenizer

from .prompt import Sample, build_prompt, haystack_units

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def sample(rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None,
           haystack: str = "noise") -> Sample:
    """`length` tokens: a `haystack` ("noise", "essay" or "text:PATH", see haystack_units), the needle at `depth`
    (random if None), the question."""
    if depth is None:
        depth = rng.random()
    digits = rng.randint(5, 7)
    key = str(rng.randrange(10 ** (digits - 1), 10**digits))
    prompt = build_prompt(tokenizer, length, "", haystack_units(haystack, rng),
                          [(depth, " " + NEEDLE.format(key=key))], " " + QUESTION, "passkey")
    target = f" {key}"
    return Sample(prompt.ids, target, [key], len(tokenizer.encode(target)) + 4, prompt.insert_offsets,
                  prompt.insert_ends)


def score(output: str, references: list[str]) -> float:
    """1 iff the first run of digits in the output is the key."""
    digits = re.search(r"\d+", output)
    return float(digits is not None and digits.group() == references[0])
