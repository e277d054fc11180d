r"""BABILong: bAbI reasoning questions whose facts are spread through long text.

python -m benchmarks.babilong --checkpoint DIR --lengths 4k,64k,1m [--tasks qa1,qa2,qa3,qa4,qa5] [--samples N] \
    [--hf-dataset RMT-team/babilong | --data-dir DIR] [--out DIR] [--segment 4096] [--device cuda]

Data, one of:
- the built-in generator (default; offline): bAbI-style stories for qa1..qa5 (one, two and three supporting
  facts, two- and three-argument relations) with their facts placed in order at random depths of essay-like
  filler text, the prompt exactly the asked length in tokens;
- `--hf-dataset NAME`: the official data through `datasets` (config = length such as "4k" or "1M", split = task;
  the other layout, config = task and split = length, is tried too); fields `input`, `question`, `target`;
- `--data-dir DIR`: the same records from local files, DIR/<length>/<task>.* or DIR/<task>/<length>.* (jsonl,
  json or parquet), lengths named as the official ones (4k, 128k, 1M).
A sample is right iff every comma-separated part of the answer appears as a word in the output (any case).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path

import torch

from benchmarks.common import (
    BenchmarkError,
    Key,
    Sample,
    Tokenizer,
    add_common_args,
    build_prompt,
    encode,
    haystack_units,
    main_guard,
    parse_lengths,
    run,
    sample_rng,
)

PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Julie", "Jeff")
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office", "cellar", "balcony")
OBJECTS = ("apple", "football", "milk", "book", "key", "hat")
MOVE = ("went to", "moved to", "journeyed to", "travelled to", "walked to")
TAKE = ("picked up", "grabbed", "took", "got")
DROP = ("dropped", "put down", "left", "discarded")
GIVE = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
HEAD = ("Below is a long text. A few sentences in it are facts about people, objects and places. "
        "Answer the question after the text from those facts, with a single word.\n\n")
MAX_NEW_TOKENS = 16
Story = tuple[list[str], str, str]  # facts in order, question, answer


class World:
    """People moving between places, taking, dropping and giving objects; every action is also a fact."""

    def __init__(self, rng: random.Random, actions: tuple[str, ...], places: int = 6) -> None:
        self.rng, self.actions = rng, actions
        self.people = rng.sample(PEOPLE, 4)
        self.places = rng.sample(PLACES, places)
        self.objects = rng.sample(OBJECTS, 3)
        self.where: dict[str, str] = {}  # person -> place
        self.holder: dict[str, str] = {}  # object -> person
        self.trail: dict[str, list[str]] = {o: [] for o in self.objects}  # the object's places, in order
        self.gifts: list[tuple[str, str, str]] = []  # (giver, object, receiver)
        self.facts: list[str] = []

    def _takeable(self, person: str) -> list[str]:
        """Objects lying where the person is (an object never seen yet lies anywhere)."""
        return [o for o in self.objects if o not in self.holder and person in self.where
                and (not self.trail[o] or self.trail[o][-1] == self.where[person])]

    def step(self) -> None:
        """One random allowed action that keeps the world consistent."""
        rng, person = self.rng, self.rng.choice(self.people)
        held = [o for o, p in self.holder.items() if p == person]
        here = self.where.get(person)
        near = [p for p in self.people if p != person and here is not None and self.where.get(p) == here]
        possible = {"move": True, "take": bool(self._takeable(person)), "drop": bool(held), "give": bool(held and near)}
        action = rng.choice([a for a in self.actions if possible[a]])
        if action == "move":
            place = rng.choice([p for p in self.places if p != here])
            self.where[person] = place
            for obj in held:
                self.trail[obj].append(place)
            self.facts.append(f"{person} {rng.choice(MOVE)} the {place}.")
        elif action == "take":
            obj = rng.choice(self._takeable(person))
            self.holder[obj] = person
            if not self.trail[obj]:
                self.trail[obj].append(self.where[person])
            self.facts.append(f"{person} {rng.choice(TAKE)} the {obj}.")
        elif action == "drop":
            obj = rng.choice(held)
            del self.holder[obj]
            self.facts.append(f"{person} {rng.choice(DROP)} the {obj}.")
        else:
            obj, other = rng.choice(held), rng.choice(near)
            self.holder[obj] = other
            self.gifts.append((person, obj, other))
            self.facts.append(f"{person} {rng.choice(GIVE)} the {obj} to {other}.")


def _run(rng: random.Random, actions: tuple[str, ...], places: int = 6) -> World:
    world = World(rng, actions, places)
    for _ in range(rng.randint(8, 16)):
        world.step()
    return world


def _qa1(rng: random.Random) -> Story:
    """Single supporting fact: where is a person now?"""
    world = _run(rng, ("move",))
    person = rng.choice(sorted(world.where))
    return world.facts, f"Where is {person}?", world.where[person]


def _object_story(rng: random.Random, ready: Callable[[World, str], bool]) -> tuple[World, str]:
    """Draw worlds of moves, takes and drops until `ready(world, object)` holds for some object; return both."""
    while True:
        world = _run(rng, ("move", "take", "drop"))
        found = [o for o in world.objects if ready(world, o)]
        if found:
            return world, rng.choice(found)


def _qa2(rng: random.Random) -> Story:
    """Two supporting facts: where is an object (where its carrier went, or where it was put down)?"""
    world, obj = _object_story(rng, lambda w, o: bool(w.trail[o]))
    return world.facts, f"Where is the {obj}?", world.trail[obj][-1]


def _qa3(rng: random.Random) -> Story:
    """Three supporting facts: where was an object before its current place?"""
    world, obj = _object_story(rng, lambda w, o: len(w.trail[o]) >= 2 and w.trail[o][-1] not in w.trail[o][:-1])
    return world.facts, f"Where was the {obj} before the {world.trail[obj][-1]}?", world.trail[obj][-2]


def _qa4(rng: random.Random) -> Story:
    """Two-argument relations: which place lies in a direction of another?"""
    a, b, c = rng.sample(PLACES, 3)
    d1, d2 = rng.sample(sorted(OPPOSITE), 2)
    facts = [f"The {a} is {d1} of the {b}.", f"The {c} is {d2} of the {b}."]
    rng.shuffle(facts)
    if rng.random() < 0.5:
        return facts, f"What is {d1} of the {b}?", a
    return facts, f"What is the {b} {OPPOSITE[d1]} of?", a


def _qa5(rng: random.Random) -> Story:
    """Three-argument relations: who gave what to whom? (only questions with one right answer)"""
    while True:
        world = _run(rng, ("move", "take", "drop", "give"), places=3)
        if not world.gifts:
            continue
        giver, obj, receiver = rng.choice(world.gifts)
        questions = []
        if sum((o, r) == (obj, receiver) for _, o, r in world.gifts) == 1:
            questions.append((f"Who gave the {obj} to {receiver}?", giver))
        if sum((g, r) == (giver, receiver) for g, _, r in world.gifts) == 1:
            questions.append((f"What did {giver} give to {receiver}?", obj))
        if sum((g, o) == (giver, obj) for g, o, _ in world.gifts) == 1:
            questions.append((f"Who did {giver} give the {obj} to?", receiver))
        questions.append((f"Who received the {obj} last?", [r for _, o, r in world.gifts if o == obj][-1]))
        question, answer = rng.choice(questions)
        return world.facts, question, answer


GENERATORS = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def _tail(question: str) -> str:
    return f"\n\nQuestion: {question}\nAnswer:"


def generated_sample(key: Key, tokenizer: Tokenizer, seed: int = 0) -> Sample:
    """A generated story with its facts in order at random depths of filler text of the key's length."""
    if key.task not in GENERATORS:
        raise BenchmarkError(f"unknown BABILong task {key.task!r} for the built-in generator; known: "
                             f"{', '.join(GENERATORS)} (the official data has qa1..qa10 and more)")
    rng = sample_rng(seed, key)
    facts, question, answer = GENERATORS[key.task](rng)
    depths = sorted(rng.random() for _ in facts)
    prompt = build_prompt(tokenizer, key.length, HEAD, haystack_units("essay", rng),
                          [(d, " " + f) for d, f in zip(depths, facts)], _tail(question), key.task)
    return Sample(prompt.ids, f" {answer}", [answer], MAX_NEW_TOKENS, prompt.insert_offsets)


def length_name(length: int) -> str:
    """The official data's name of a length: 4096 -> '4k', 2**20 -> '1M'."""
    return f"{length >> 20}M" if length % 2**20 == 0 else f"{length >> 10}k"


def _local_records(root: Path, task: str, name: str) -> Sequence[dict]:
    files = sorted(f for pattern in (f"{name}/{task}[.-]*", f"{task}/{name}[.-]*", f"data/{task}/{name}.*")
                   for f in root.glob(pattern) if f.suffix in (".jsonl", ".json", ".parquet"))
    if not files:
        raise BenchmarkError(f"no BABILong file for {task} at {name} in {root} (looked for {name}/{task}.jsonl, "
                             f"{task}/{name}.jsonl, .json or .parquet)")
    if all(f.suffix == ".jsonl" for f in files):
        return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    from datasets import load_dataset

    return load_dataset("parquet" if files[0].suffix == ".parquet" else "json", data_files=[str(f) for f in files],
                        split="train")


def _hub_records(source: str, task: str, name: str) -> Sequence[dict]:
    from datasets import load_dataset

    errors = []
    for config, split in ((name, task), (task, name)):  # both layouts of the official dataset
        try:
            return load_dataset(source, config, split=split)
        except Exception as err:  # unreachable hub, unknown config or split...
            errors.append(f"{config}/{split}: {err}")
    raise BenchmarkError(f"could not load {task} at {name} from {source}: {'; '.join(errors)}")


@lru_cache(maxsize=1)
def _records(source: str, task: str, length: int) -> Sequence[dict]:
    """The records of (task, length) from a Hugging Face dataset name or a local directory ('dir:PATH')."""
    if length % 1024:
        raise BenchmarkError(f"the official BABILong data has lengths such as 4k, 128k and 1M, not {length}")
    if source.startswith("dir:"):
        return _local_records(Path(source[4:]), task, length_name(length))
    return _hub_records(source, task, length_name(length))


def official_sample(key: Key, tokenizer: Tokenizer, source: str) -> Sample:
    """The key's record of the official data: instructions, its context, its question."""
    records = _records(source, key.task, key.length)
    if key.index >= len(records):
        raise BenchmarkError(f"{key.task} at {length_name(key.length)} has only {len(records)} samples")
    record = records[key.index]
    missing = [f for f in ("input", "question", "target") if f not in record]
    if missing:
        raise BenchmarkError(f"BABILong records need input, question and target; {key.task} lacks {missing}")
    text = HEAD + record["input"] + _tail(record["question"])
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + encode(tokenizer, text)
    answer = str(record["target"])
    return Sample(torch.tensor(ids, dtype=torch.int32), f" {answer}", [answer],
                  max(MAX_NEW_TOKENS, len(encode(tokenizer, answer)) + 8))


def score(task: str, output: str, references: list[str]) -> float:
    """1 iff every comma-separated part of the answer is a word of the output, ignoring case."""
    parts = [p.strip().lower() for p in references[0].split(",") if p.strip()]
    text = output.lower()
    return float(all(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", text) for p in parts))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "babilong", "4k,16k,64k,128k", samples=10)
    parser.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf-dataset", help="official data through `datasets`, e.g. RMT-team/babilong")
    source.add_argument("--data-dir", help="official data as local files")
    args = parser.parse_args(argv)

    def go() -> str:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        data = args.hf_dataset or (f"dir:{args.data_dir}" if args.data_dir else None)
        if data is None:
            unknown = [t for t in tasks if t not in GENERATORS]
            if unknown or not tasks:
                raise BenchmarkError(f"unknown BABILong task(s) {unknown or args.tasks!r} for the built-in generator;"
                                     f" known: {', '.join(GENERATORS)}")
            make = partial(generated_sample, seed=args.seed)
        else:
            make = partial(official_sample, source=data)
        todo = [Key(t, n, None, i) for n in parse_lengths(args.lengths) for t in tasks for i in range(args.samples)]
        return run(args, "BABILong", todo, make, score, {"data": data or "generated"})

    return main_guard(go)


if __name__ == "__main__":
    main()
