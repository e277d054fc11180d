"""bAbI-style stories (qa1..qa5) whose facts are spread, in order, through long filler text; BABILong's scoring.

qa1..qa5: one, two and three supporting facts, two- and three-argument relations.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import partial

from ramba.tokenizer import Tokenizer

from .prompt import Sample, TaskFn, build_prompt, haystack_units

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


STORIES: dict[str, Callable[[random.Random], Story]] = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4,
                                                       "qa5": _qa5}


def question_tail(question: str) -> str:
    """The text after the context: the question, then the answer cue."""
    return f"\n\nQuestion: {question}\nAnswer:"


def story(task: str, rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None) -> Sample:
    """A STORIES[task] story with its facts in order at random depths of essay filler (`depth` is not used)."""
    facts, question, answer = STORIES[task](rng)
    depths = sorted(rng.random() for _ in facts)
    prompt = build_prompt(tokenizer, length, HEAD, haystack_units("essay", rng),
                          [(d, " " + f) for d, f in zip(depths, facts)], question_tail(question), task)
    return Sample(prompt.ids, f" {answer}", [answer], MAX_NEW_TOKENS, prompt.insert_offsets, prompt.insert_ends)


TASKS: dict[str, TaskFn] = {name: partial(story, name) for name in STORIES}


def score(output: str, references: list[str]) -> float:
    """1 iff every comma-separated part of the answer is a word of the output, ignoring case."""
    parts = [p.strip().lower() for p in references[0].split(",") if p.strip()]
    text = output.lower()
    return float(all(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", text) for p in parts))
