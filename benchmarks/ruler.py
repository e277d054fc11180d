r"""RULER-style synthetic tasks, generated locally from a seed, and prepared RULER jsonl files (QA tasks).

python -m benchmarks.ruler --checkpoint DIR --lengths 4k,64k,1m [--tasks niah_single_1,vt,...] \
    [--depths 0,0.5,1] [--data qa_1.jsonl[@4k] ...] [--samples N] [--out DIR] [--segment 4096] [--device cuda]

Tasks: needle in a haystack (niah_single_1: one needle in a repeated noise passage; niah_single_2 and _3: in
essay-like filler text, number or uuid values; niah_multikey_1: four needles, one asked; niah_multikey_2 and _3:
the haystack itself is distractor key-value lines; niah_multivalue: four values for one key; niah_multiquery:
four keys asked), vt (follow a chain of variable assignments), cwe (the 10 most common words of a list) and fwe
(the 3 most frequent words of a Zipf-distributed coded text). Prompts are exactly the asked length in tokens.
Keys are adjective-noun words or uuids, values 7-digit numbers or uuids; made-up words replace English ones
in cwe and fwe so that lists of any length have enough distinct words.

Scoring as RULER: a sample scores the fraction of its references found in the output (case-insensitive),
except QA tasks, which score 1 if any reference is found. `--data` runs RULER-format jsonl files prepared
elsewhere (fields `input`, `outputs`, optional `answer_prefix` and `length`): the task is the file name (or
its folder's, for validation.jsonl), the length the next power of two of the records' `length`, or `@LENGTH`.
Without --tasks, all synthetic tasks run unless --data is given.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, count
from pathlib import Path

import torch

from benchmarks.common import (
    BenchmarkError,
    Key,
    Prompt,
    Sample,
    Tokenizer,
    add_common_args,
    build_prompt,
    encode,
    haystack_units,
    main_guard,
    parse_depths,
    parse_lengths,
    run,
    sample_rng,
)
from ramba.data.synthetic import ADJECTIVES, NOUNS


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
TASKS = (*NIAH, "vt", "cwe", "fwe")
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


def _budget(task: str, tokenizer: Tokenizer, target: str) -> int:
    """RULER's generation budget for the task, or more when the ideal answer needs it."""
    return max(MAX_NEW_TOKENS.get(task.split("_")[0], 64), len(encode(tokenizer, target)) + 8)


def _sample(task: str, tokenizer: Tokenizer, prompt: Prompt, references: list[str]) -> Sample:
    target = " " + ", ".join(references)
    return Sample(prompt.ids, target, references, _budget(task, tokenizer, target), prompt.insert_offsets)


def _distractors(spec: Niah, rng: random.Random, exclude: set[str]) -> Iterator[str]:
    """The `needles` haystack: needle-like lines whose keys are none of the real ones."""
    child = random.Random(rng.getrandbits(64))
    while True:
        key = _draw(spec.key_kind, child)
        if key not in exclude:
            yield f" One hidden {spec.value_kind} for {key} is {_draw(spec.value_kind, child)}."


def _niah(spec: Niah, key: Key, tokenizer: Tokenizer, rng: random.Random) -> Sample:
    keys = _distinct(spec.key_kind, rng, spec.keys)
    flat = _distinct(spec.value_kind, rng, spec.keys * spec.values)
    values = {k: flat[i * spec.values:(i + 1) * spec.values] for i, k in enumerate(keys)}
    asked = keys if spec.queries > 1 else [rng.choice(keys)]
    needles = [(k, v) for k in keys for v in values[k]]
    first = (asked[0], values[asked[0]][0])  # the needle placed at the asked depth
    inserts = [(key.depth if (k, v) == first and key.depth is not None else rng.random(),
                f" One hidden {spec.value_kind} for {k} is {v}.") for k, v in needles]
    kind = spec.value_kind
    head = f"Some hidden {kind}s are placed in the text below. Remember them: you will be asked about them.\n"
    tail = (f"\nQuestion: what are all the hidden {kind}s for {_join(asked)} in the text above?\n"
            f"Answer: the hidden {kind}s for {_join(asked)} are:")
    units = _distractors(spec, rng, set(keys)) if spec.haystack == "needles" else haystack_units(spec.haystack, rng)
    prompt = build_prompt(tokenizer, key.length, head, units, inserts, tail, key.task)
    return _sample(key.task, tokenizer, prompt, [v for k in asked for v in values[k]])


def _vt(key: Key, tokenizer: Tokenizer, rng: random.Random) -> Sample:
    names = _distinct_names(rng, VT_HOPS + 1)
    value = str(rng.randrange(10**4, 10**5))
    lines = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    depths = sorted(rng.random() for _ in lines)
    head = "Some variable assignments are hidden in the text below. Keep track of them.\n"
    tail = (f"\nQuestion: which variables hold the value {value} in the text above, directly or through other "
            f"variables?\nAnswer: the variables that hold {value} are:")
    prompt = build_prompt(tokenizer, key.length, head, haystack_units("noise", rng), list(zip(depths, lines)),
                          tail, key.task)
    return _sample(key.task, tokenizer, prompt, names)


def _distinct_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def _cwe(key: Key, tokenizer: Tokenizer, rng: random.Random) -> Sample:
    offset = rng.randrange(WORD_SPACE)
    common = [_made_up_word(i, offset) for i in range(CWE_WORDS)]
    head = "Below is a list of made-up words. Some of them occur much more often than the others.\n"
    tail = (f"\nQuestion: what are the {CWE_WORDS} most common words in the list above?\n"
            f"Answer: the {CWE_WORDS} most common words are:")
    fixed = len(encode(tokenizer, head)) + len(encode(tokenizer, tail)) + (tokenizer.bos_id is not None)
    per_round = sum(map(len, tokenizer.encode_many([" " + w for w in common])))
    freq = min(CWE_FREQ, (key.length - fixed) // (2 * per_round))  # common words fill at most half the list
    if freq <= CWE_RARE_FREQ:
        raise BenchmarkError(f"cwe: a length of {key.length} tokens is too short; it needs at least "
                             f"{fixed + 2 * (CWE_RARE_FREQ + 1) * per_round} tokens")
    inserts = [(rng.random(), " " + w) for w in common for _ in range(freq)]
    child = random.Random(rng.getrandbits(64))

    def rare() -> Iterator[str]:
        """Fresh words, each CWE_RARE_FREQ times, shuffled in blocks."""
        for start in count(CWE_WORDS, 64):
            block = [" " + _made_up_word(i, offset) for i in range(start, start + 64)] * CWE_RARE_FREQ
            child.shuffle(block)
            yield from block

    prompt = build_prompt(tokenizer, key.length, head, rare(), inserts, tail, key.task)
    return _sample(key.task, tokenizer, prompt, common)


def _fwe(key: Key, tokenizer: Tokenizer, rng: random.Random) -> Sample:
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
    prompt = build_prompt(tokenizer, key.length, head, coded(), [], tail, key.task)
    counts = Counter(drawn[:prompt.whole_units])
    if len(counts) < FWE_TOP:
        raise BenchmarkError(f"fwe: a length of {key.length} tokens is too short for a coded text of "
                             f"{FWE_TOP} distinct words")
    top = sorted(counts, key=lambda rank: (-counts[rank], rank))[:FWE_TOP]
    return _sample(key.task, tokenizer, prompt, [_made_up_word(rank, offset) for rank in top])


GENERATORS = {"vt": _vt, "cwe": _cwe, "fwe": _fwe}


# ------------------------------------------------------------------------------------- RULER jsonl files
@dataclass
class FileTask:
    """Records of a RULER-format jsonl file: one task at one length."""

    name: str
    length: int
    records: list[dict]


def load_ruler_file(spec: str, limit: int | None = None) -> FileTask:
    """`PATH[@LENGTH]` -> its first `limit` records, checked for `input` and `outputs`."""
    text, _, length_text = spec.rpartition("@")
    if not text or not re.fullmatch(r"\d+(\.\d+)?[kmg]?", length_text.strip().lower()):
        text, length_text = spec, ""
    path = Path(text)
    if not path.is_file():
        raise BenchmarkError(f"--data {text}: no such file")
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}, line {n}, is not JSON: {err}") from None
            outputs = record.get("outputs") if isinstance(record, dict) else None
            if not isinstance(record.get("input"), str) or not isinstance(outputs, list) or not outputs:
                raise BenchmarkError(f"{path}, line {n}: a RULER record needs `input` (the prompt text) and "
                                     "`outputs` (a non-empty list of answers)")
            records.append(record)
    if not records:
        raise BenchmarkError(f"{path} holds no records")
    name = path.parent.name if path.stem in ("validation", "test") else path.stem
    if length_text:
        length = parse_lengths(length_text)[0]
    else:
        tokens = max(int(r.get("length", 0)) for r in records)
        if tokens < 1:
            raise BenchmarkError(f"{path}: the records carry no `length`; give the length as {text}@4k, say")
        length = 1 << (tokens - 1).bit_length()
    return FileTask(name, length, records)


def _file_sample(task: FileTask, index: int, tokenizer: Tokenizer) -> Sample:
    record = task.records[index]
    prefix = record.get("answer_prefix") or ""
    text = record["input"] if record["input"].endswith(prefix) else record["input"] + prefix
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + encode(tokenizer, text)
    references = [str(o) for o in record["outputs"]]
    target = " " + (references[0] if task.name.startswith("qa") else ", ".join(references))
    return Sample(torch.tensor(ids, dtype=torch.int32), target, references, _budget(task.name, tokenizer, target))


# ----------------------------------------------------------------------------------------------- scoring
def match_all(output: str, references: list[str]) -> float:
    """The fraction of the references found in the output (case-insensitive)."""
    text = output.lower()
    return sum(r.lower() in text for r in references) / len(references)


def match_part(output: str, references: list[str]) -> float:
    """1 if any reference is found in the output (case-insensitive), else 0."""
    text = output.lower()
    return float(any(r.lower() in text for r in references))


def score(task: str, output: str, references: list[str]) -> float:
    return match_part(output, references) if task.startswith("qa") else match_all(output, references)


# ---------------------------------------------------------------------------------------------- commands
def parse_tasks(text: str) -> list[str]:
    """'niah_single_1,vt' or 'all' -> task names, checked."""
    names = list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise BenchmarkError(f"unknown RULER task(s) {', '.join(map(repr, unknown)) or repr(text)}; known: "
                             f"{', '.join(TASKS)} (QA tasks such as qa_1 and qa_2 run from RULER jsonl files "
                             "given with --data)")
    return names


def make_sample(key: Key, tokenizer: Tokenizer, seed: int = 0, files: dict[tuple[str, int], FileTask] | None = None
                ) -> Sample:
    """A synthetic task's sample for (seed, key), or the key's record of a loaded file."""
    if files and (key.task, key.length) in files:
        return _file_sample(files[key.task, key.length], key.index, tokenizer)
    rng = sample_rng(seed, key)
    if key.task in NIAH:
        return _niah(NIAH[key.task], key, tokenizer, rng)
    if key.task in GENERATORS:
        return GENERATORS[key.task](key, tokenizer, rng)
    raise BenchmarkError(f"unknown RULER task {key.task!r}; known: {', '.join(TASKS)}")


def keys(tasks: list[str], lengths: list[int], depths: list[float] | None, samples: int,
         files: dict[tuple[str, int], FileTask]) -> list[Key]:
    """Shortest lengths first; needle tasks at each depth when depths are given (else at random depths)."""
    out = [Key(t, n, d, i) for n in lengths for t in tasks
           for d in (depths if depths and t in NIAH else [None]) for i in range(samples)]
    out += [Key(name, n, None, i) for (name, n), task in files.items() for i in range(len(task.records))]
    return sorted(out, key=lambda k: (k.length, k.task, -1 if k.depth is None else k.depth, k.index))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "ruler", "4k,8k,16k,32k,64k,128k", samples=10)
    parser.add_argument("--tasks", help=f"comma-separated, or 'all': {', '.join(TASKS)}")
    parser.add_argument("--depths", help="place the asked needle of niah tasks at these depths (default: random)")
    parser.add_argument("--data", action="append", default=[], metavar="PATH[@LENGTH]",
                        help="a RULER-format jsonl file to run (repeatable)")
    args = parser.parse_args(argv)

    def go() -> str:
        tasks = parse_tasks(args.tasks) if args.tasks else [] if args.data else list(TASKS)
        files: dict[tuple[str, int], FileTask] = {}
        for spec in args.data:
            task = load_ruler_file(spec, args.samples)
            if task.name in tasks or (task.name, task.length) in files:
                raise BenchmarkError(f"task {task.name!r} at length {task.length} is given twice")
            files[task.name, task.length] = task
        depths = parse_depths(args.depths) if args.depths else None
        todo = keys(tasks, parse_lengths(args.lengths), depths, args.samples, files)
        return run(args, "RULER", todo, lambda key, tok: make_sample(key, tok, args.seed, files), score, {})

    return main_guard(go)


if __name__ == "__main__":
    main()
