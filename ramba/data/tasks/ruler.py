"""RULER-style synthetic tasks, with RULER's scoring (match_all; match_part for QA).

Needle in a haystack: niah_single_1, one needle in a repeated noise passage; niah_single_2 and _3, in
essay-like filler text, number or uuid values; niah_multikey_1, four needles, one asked; niah_multikey_2 and
_3, the haystack itself is distractor key-value lines; niah_multivalue, four values for one key;
niah_multiquery, four keys asked. vt: follow a chain of variable assignments. cwe: the 10 most common words
of a list. fwe: the 3 most frequent words of a Zipf-distributed coded text.

Keys are adjective-noun words or uuids, values 7-digit numbers or uuids; made-up words replace English ones
in cwe and fwe so that lists of any length have enough distinct words.
"""

from __future__ import annotations

import random
import string
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, count

from ramba.tokenizer import Tokenizer

from .filler import ADJECTIVES, NOUNS
from .prompt import Prompt, Sample, TaskError, TaskFn, build_prompt, encode_prompt, haystack_units


@dataclass(frozen=True)
class Niah:
    """A needle-in-a-haystack task: needles "One hidden <value kind> for <key> is <value>."."""

    haystack: str  # noise | essay | needles (distractor needles)
    key_kind: str  # word | uuid
    value_kind: str  # number | uuid
    keys: int = 1  # needles with distinct keys; one of them is asked unless queries > 1
    values: int = 1  # values (needles) per key
    queries: int = 1  # keys asked


NIAH = {
    "niah_single_1": Niah("noise", "word", "number"),
    "niah_single_2": Niah("essay", "word", "number"),
    "niah_single_3": Niah("essay", "word", "uuid"),
    "niah_multikey_1": Niah("essay", "word", "number", keys=4),
    "niah_multikey_2": Niah("needles", "word", "number"),
    "niah_multikey_3": Niah("needles", "uuid", "uuid"),
    "niah_multivalue": Niah("essay", "word", "number", values=4),
    "niah_multiquery": Niah("essay", "word", "number", keys=4, queries=4),
}
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
VT_HOPS = 4
CWE_WORDS, CWE_FREQ, CWE_RARE_FREQ = 10, 30, 3
FWE_VOCAB, FWE_ALPHA, FWE_TOP = 1000, 2.0, 3
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
WORD_SPACE = len(SYLLABLES) ** 4
WORD_STRIDE = 1_000_003  # a prime, so i -> i * stride + offset (mod WORD_SPACE) never repeats a word


def _draw(kind: str, rng: random.Random) -> str:
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randrange(10**6, 10**7))


def _distinct(kind: str, rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        item = _draw(kind, rng)
        if item not in out:
            out.append(item)
    return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _made_up_word(i: int, offset: int) -> str:
    """The i-th word of a sample's made-up vocabulary (4 syllables; distinct for distinct i)."""
    n = (i * WORD_STRIDE + offset) % WORD_SPACE
    syllables = []
    for _ in range(4):
        n, s = divmod(n, len(SYLLABLES))
        syllables.append(SYLLABLES[s])
    return "".join(syllables)


def answer_budget(task: str, tokenizer: Tokenizer, target: str) -> int:
    """RULER's generation budget for the task (its family: niah, vt, cwe, fwe, qa), or more when the ideal
    answer needs it."""
    return max(MAX_NEW_TOKENS.get(task.split("_")[0], 64), len(tokenizer.encode(target)) + 8)


def _sample(task: str, tokenizer: Tokenizer, prompt: Prompt, references: list[str]) -> Sample:
    target = " " + ", ".join(references)
    return Sample(prompt.ids, target, references, answer_budget(task, tokenizer, target), prompt.insert_offsets,
                  prompt.insert_ends)


def _distractors(spec: Niah, rng: random.Random, exclude: set[str]) -> Iterator[str]:
    """The `needles` haystack: needle-like lines whose keys are none of the real ones."""
    child = random.Random(rng.getrandbits(64))
    while True:
        key = _draw(spec.key_kind, child)
        if key not in exclude:
            yield f" One hidden {spec.value_kind} for {key} is {_draw(spec.value_kind, child)}."


def niah(task: str, rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None,
         haystack: str | None = None) -> Sample:
    """The NIAH[task] needles in a haystack; the first asked needle at `depth` (random if None), the others at
    random depths. `haystack` (a haystack_units kind, "text:PATH" say) replaces the task's noise or essay
    haystack; tasks whose haystack is distractor needles keep it."""
    spec = NIAH[task]
    keys = _distinct(spec.key_kind, rng, spec.keys)
    flat = _distinct(spec.value_kind, rng, spec.keys * spec.values)
    values = {k: flat[i * spec.values:(i + 1) * spec.values] for i, k in enumerate(keys)}
    asked = keys if spec.queries > 1 else [rng.choice(keys)]
    needles = [(k, v) for k in keys for v in values[k]]
    first = (asked[0], values[asked[0]][0])  # the needle placed at the asked depth
    inserts = [(depth if (k, v) == first and depth is not None else rng.random(),
                f" One hidden {spec.value_kind} for {k} is {v}.") for k, v in needles]
    kind = spec.value_kind
    head = f"Some hidden {kind}s are placed in the text below. Remember them: you will be asked about them.\n"
    tail = (f"\nQuestion: what are all the hidden {kind}s for {_join(asked)} in the text above?\n"
            f"Answer: the hidden {kind}s for {_join(asked)} are:")
    if spec.haystack == "needles":
        units = _distractors(spec, rng, set(keys))
    else:
        units = haystack_units(haystack or spec.haystack, rng)
    prompt = build_prompt(tokenizer, length, head, units, inserts, tail, task)
    return _sample(task, tokenizer, prompt, [v for k in asked for v in values[k]])


def _distinct_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def vt(rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None) -> Sample:
    """A chain of VT_HOPS + 1 variable assignments at random depths (`depth` is not used); asks for every
    variable that holds the value."""
    names = _distinct_names(rng, VT_HOPS + 1)
    value = str(rng.randrange(10**4, 10**5))
    lines = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    depths = sorted(rng.random() for _ in lines)
    head = "Some variable assignments are hidden in the text below. Keep track of them.\n"
    tail = (f"\nQuestion: which variables hold the value {value} in the text above, directly or through other "
            f"variables?\nAnswer: the variables that hold {value} are:")
    prompt = build_prompt(tokenizer, length, head, haystack_units("noise", rng), list(zip(depths, lines)), tail, "vt")
    return _sample("vt", tokenizer, prompt, names)


def cwe(rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None) -> Sample:
    """A list of made-up words in which CWE_WORDS words occur much more often than the rest; asks for them
    (`depth` is not used)."""
    offset = rng.randrange(WORD_SPACE)
    common = [_made_up_word(i, offset) for i in range(CWE_WORDS)]
    head = "Below is a list of made-up words. Some of them occur much more often than the others.\n"
    tail = (f"\nQuestion: what are the {CWE_WORDS} most common words in the list above?\n"
            f"Answer: the {CWE_WORDS} most common words are:")
    fixed = len(encode_prompt(tokenizer, head)) + len(tokenizer.encode(tail))
    per_round = sum(map(len, tokenizer.encode_many([" " + w for w in common])))
    freq = min(CWE_FREQ, (length - fixed) // (2 * per_round))  # common words fill at most half the list
    if freq <= CWE_RARE_FREQ:
        raise TaskError(f"cwe: a length of {length} tokens is too short; it needs at least "
                        f"{fixed + 2 * (CWE_RARE_FREQ + 1) * per_round} tokens")
    inserts = [(rng.random(), " " + w) for w in common for _ in range(freq)]
    child = random.Random(rng.getrandbits(64))

    def rare() -> Iterator[str]:
        """Fresh words, each CWE_RARE_FREQ times, shuffled in blocks."""
        for start in count(CWE_WORDS, 64):
            block = [" " + _made_up_word(i, offset) for i in range(start, start + 64)] * CWE_RARE_FREQ
            child.shuffle(block)
            yield from block

    prompt = build_prompt(tokenizer, length, head, rare(), inserts, tail, "cwe")
    return _sample("cwe", tokenizer, prompt, common)


def fwe(rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None) -> Sample:
    """A coded text of made-up words drawn from a Zipf law; asks for the FWE_TOP most frequent (`depth` is not
    used)."""
    offset = rng.randrange(WORD_SPACE)
    weights = list(accumulate(1 / r**FWE_ALPHA for r in range(1, FWE_VOCAB + 1)))
    child = random.Random(rng.getrandbits(64))
    drawn = array("l")

    def coded() -> Iterator[str]:
        """Words drawn with probability proportional to 1 / rank**alpha."""
        while True:
            for rank in child.choices(range(FWE_VOCAB), cum_weights=weights, k=256):
                drawn.append(rank)
                yield " " + _made_up_word(rank, offset)

    head = "Below is a coded text of made-up words. Count how often each word occurs.\n"
    tail = (f"\nQuestion: which {FWE_TOP} words occur most often in the coded text above?\n"
            f"Answer: the {FWE_TOP} most frequent words are:")
    prompt = build_prompt(tokenizer, length, head, coded(), [], tail, "fwe")
    counts = Counter(drawn[:prompt.whole_units])
    if len(counts) < FWE_TOP:
        raise TaskError(f"fwe: a length of {length} tokens is too short for a coded text of "
                        f"{FWE_TOP} distinct words")
    top = sorted(counts, key=lambda rank: (-counts[rank], rank))[:FWE_TOP]
    return _sample("fwe", tokenizer, prompt, [_made_up_word(rank, offset) for rank in top])


TASKS: dict[str, TaskFn] = {**{name: partial(niah, name) for name in NIAH}, "vt": vt, "cwe": cwe, "fwe": fwe}


def match_all(output: str, references: list[str]) -> float:
    """The fraction of the references found in the output (case-insensitive)."""
    text = output.lower()
    return sum(r.lower() in text for r in references) / len(references)


def match_part(output: str, references: list[str]) -> float:
    """1 if any reference is found in the output (case-insensitive), else 0."""
    text = output.lower()
    return float(any(r.lower() in text for r in references))
