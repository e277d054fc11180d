"""RULER's QA tasks: a question over numbered documents, of which one (qa_1) or two (qa_2) answer it.

qa_1 is single-hop (SQuAD-like): one document holds the answer. qa_2 is two-hop (HotpotQA-like): one document
links the question's subject to a bridge entity, another document about the bridge holds the answer. The other
documents are distractors; they fill the prompt to its exact length (the last one cut where the length runs out).

By default the documents are generated locally: short encyclopedia-style paragraphs about made-up towns, people,
rivers and companies, named from random syllables so that no answer can be guessed; no distractor mentions the
subject, the bridge or the answer. `data_dir` instead reads the official dev files, when you have them:
`dev-v2.0.json` (SQuAD v2, unanswerable questions left out) for qa_1 and `hotpot_dev_distractor_v1.json`
(HotpotQA, distractor setting) for qa_2; a question's own paragraphs are its documents (with HotpotQA's
`supporting_facts`, the supporting paragraphs are the answer documents and the rest distractors) and other
questions' paragraphs are the distractors.

`depth` puts the answer document (for qa_2 the one that holds the answer; the bridge document goes at a random
place) at that fraction of the list of whole documents. Scoring is RULER's match_part: 1 if any reference
occurs in the output, ignoring case.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path

from ramba.tokenizer import Tokenizer

from .prompt import Sample, TaskError, TaskFn, build_prompt, encode_prompt
from .ruler import SYLLABLES, answer_budget

HEAD = "Answer the question that follows the documents below. Reply with the answer alone.\n\nDocuments:"
TAIL = "\n\nQuestion: {question}\nAnswer:"
FILES = {"qa_1": "dev-v2.0.json", "qa_2": "hotpot_dev_distractor_v1.json"}


@dataclass
class QAItem:
    """One question: its answer documents (the first is the one placed at `depth`), documents of its own that do
    not answer it, the question and its reference answers."""

    gold: list[str]
    own_distractors: list[str]
    question: str
    answers: list[str]


# ------------------------------------------------------------------------------------ made-up documents
DIRECTIONS = ("northern", "southern", "eastern", "western", "upper", "lower")
PRODUCTS = ("woollen cloth", "copper pots", "glass beads", "smoked fish", "barley beer", "clay pipes", "rope",
            "paper", "cheese", "honey", "leather boots", "salt")
PROFESSIONS = ("clockmaker", "painter", "surveyor", "physician", "bookbinder", "shipwright", "poet", "merchant",
               "astronomer", "stonemason", "teacher", "engineer")
DEEDS = ("a survey of the coastal marshes", "a series of winter landscapes", "a treatise on tides",
         "an early design of a water pump", "a collection of folk songs", "a map of the eastern passes",
         "a new method of tanning hides", "a long poem about the sea")
FIRM_KINDS = ("Works", "Trading", "Mills", "Foundry", "Brothers", "Company")


class Names:
    """Made-up capitalised names of random syllables, never the same twice in one sample."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def new(self, syllables: tuple[int, ...] = (2, 3)) -> str:
        while True:
            word = "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.choice(syllables))).capitalize()
            if word.lower() not in self.used:
                self.used.add(word.lower())
                return word

    def person(self) -> str:
        """A given name (may repeat) and a family name (never repeats)."""
        first = "".join(self.rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        return f"{first} {self.new((2, 3))}"


def _year(rng: random.Random) -> str:
    return str(rng.randrange(1500, 1950))


def town_doc(rng: random.Random, names: Names, name: str | None = None, year: str | None = None,
             river: str | None = None) -> str:
    name, year, river = name or names.new(), year or _year(rng), river or names.new()
    return (f"{name} is a town in the {rng.choice(DIRECTIONS)} province of {names.new()}, founded in {year} "
            f"on the river {river}. It is known for its {rng.choice(PRODUCTS)}.")


def person_doc(rng: random.Random, names: Names, name: str | None = None, town: str | None = None) -> str:
    name, town = name or names.person(), town or names.new()
    profession = rng.choice(PROFESSIONS)
    article = "an" if profession[0] in "aeiou" else "a"
    return f"{name} was {article} {profession} born in the town of {town}, known for {rng.choice(DEEDS)}."


def river_doc(rng: random.Random, names: Names, name: str | None = None, lake: str | None = None) -> str:
    name, lake = name or names.new(), lake or names.new()
    return (f"The river {name} rises in the hills of {names.new()} and flows {rng.randrange(20, 900)} kilometres "
            f"into Lake {lake}.")


def company_doc(rng: random.Random, names: Names, name: str | None = None, founder: str | None = None,
                seat: str | None = None, year: str | None = None) -> str:
    name = name or f"{names.new()} {rng.choice(FIRM_KINDS)}"
    founder, seat, year = founder or names.person(), seat or names.new(), year or _year(rng)
    return (f"The firm {name} makes {rng.choice(PRODUCTS)}. It was founded in {year} by {founder} and has its "
            f"seat in the town of {seat}.")


DOCS: tuple[Callable[..., str], ...] = (town_doc, person_doc, river_doc, company_doc)


def _firm(rng: random.Random, names: Names) -> str:
    return f"{names.new((3,))} {rng.choice(FIRM_KINDS)}"


def _qa1_item(rng: random.Random, names: Names) -> tuple[QAItem, list[str]]:
    """A single-hop question, with the names no distractor may mention."""
    kind = rng.randrange(6)
    if kind < 2:
        town, year, river = names.new((3,)), _year(rng), names.new((3,))
        doc = town_doc(rng, names, town, year, river)
        question, answer = ((f"In which year was the town of {town} founded?", year) if kind == 0 else
                            (f"On which river lies the town of {town}?", river))
        subject = town
    elif kind == 2:
        subject, answer = names.person(), names.new((3,))
        doc, question = person_doc(rng, names, subject, answer), f"In which town was {subject} born?"
    elif kind == 3:
        subject, answer = names.new((3,)), names.new((3,))
        doc, question = river_doc(rng, names, subject, answer), f"Into which lake does the river {subject} flow?"
    else:
        subject = _firm(rng, names)
        founder, seat = names.person(), names.new((3,))
        doc = company_doc(rng, names, subject, founder, seat)
        question, answer = ((f"Who founded the firm {subject}?", founder) if kind == 4 else
                            (f"In which town does the firm {subject} have its seat?", seat))
    return QAItem([doc], [], question, [answer]), [subject, answer]


def _qa2_item(rng: random.Random, names: Names) -> tuple[QAItem, list[str]]:
    """A two-hop question: gold[0] holds the answer, gold[1] links the subject to the bridge."""
    kind = rng.randrange(4)
    if kind == 0:
        person, town, river = names.person(), names.new((3,)), names.new((3,))
        link, answer_doc = person_doc(rng, names, person, town), town_doc(rng, names, town, river=river)
        subject, bridge, answer = person, town, river
        question = f"On which river lies the town where {person} was born?"
    elif kind == 1:
        firm, town, year = _firm(rng, names), names.new((3,)), _year(rng)
        other_year = str(1500 + (int(year) - 1500 + rng.randrange(1, 450)) % 450)  # any year but the answer
        link = company_doc(rng, names, firm, seat=town, year=other_year)
        answer_doc = town_doc(rng, names, town, year=year)
        subject, bridge, answer = firm, town, year
        question = f"In which year was the town founded where the firm {firm} has its seat?"
    elif kind == 2:
        firm, founder, town = _firm(rng, names), names.person(), names.new((3,))
        link, answer_doc = company_doc(rng, names, firm, founder=founder), person_doc(rng, names, founder, town)
        subject, bridge, answer = firm, founder, town
        question = f"In which town was the founder of the firm {firm} born?"
    else:
        town, river, lake = names.new((3,)), names.new((3,)), names.new((3,))
        link, answer_doc = town_doc(rng, names, town, river=river), river_doc(rng, names, river, lake)
        subject, bridge, answer = town, river, lake
        question = f"Into which lake flows the river on which the town of {town} lies?"
    return QAItem([answer_doc, link], [], question, [answer]), [subject, bridge, answer]


def _made_up_distractors(rng: random.Random, names: Names, banned: list[str]) -> Iterator[str]:
    """Documents about fresh made-up entities; none mentions a banned string (ignoring case)."""
    banned = [b.lower() for b in banned]
    while True:
        doc = rng.choice(DOCS)(rng, names)
        if not any(b in doc.lower() for b in banned):
            yield doc


# ---------------------------------------------------------------------------------- official dev files
@dataclass(frozen=True)
class QAData:
    """The questions of a dev file and every distinct document in it."""

    items: tuple[QAItem, ...]
    documents: tuple[str, ...]


def _read_json(path: Path):
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TaskError(f"cannot read {path}: {err}") from None


@functools.lru_cache(maxsize=4)
def _squad(path: str, mtime_ns: int) -> QAData:
    data = _read_json(Path(path))
    items, documents = [], {}
    try:
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"].strip()
                documents.setdefault(context, None)
                for qa in paragraph["qas"]:
                    answers = list(dict.fromkeys(a["text"].strip() for a in qa.get("answers", []) if a["text"].strip()))
                    if qa.get("is_impossible") or not answers:
                        continue
                    items.append(QAItem([context], [], qa["question"].strip(), answers))
    except (KeyError, TypeError) as err:
        raise TaskError(f"{path} is not a SQuAD v2 file (data[].paragraphs[].context, .qas[].question, "
                        f".qas[].answers[].text): missing {err}") from None
    if not items:
        raise TaskError(f"{path} holds no answerable question")
    return QAData(tuple(items), tuple(documents))


def hotpot_document(title: str, sentences: list[str]) -> str:
    return f"{title}\n{''.join(sentences).strip()}"


@functools.lru_cache(maxsize=4)
def _hotpot(path: str, mtime_ns: int) -> QAData:
    data = _read_json(Path(path))
    items, documents = [], {}
    try:
        for record in data:
            answer = str(record["answer"]).strip()
            if not answer:
                continue
            paragraphs = {title: hotpot_document(title, sentences) for title, sentences in record["context"]}
            documents.update(dict.fromkeys(paragraphs.values()))
            supporting = list(dict.fromkeys(t for t, _ in record.get("supporting_facts", []) if t in paragraphs))
            supporting = supporting or list(paragraphs)
            # the answer document first (placed at `depth`): a supporting paragraph that holds the answer
            supporting.sort(key=lambda t: answer.lower() not in paragraphs[t].lower())
            items.append(QAItem([paragraphs[t] for t in supporting],
                                [d for t, d in paragraphs.items() if t not in supporting],
                                str(record["question"]).strip(), [answer]))
    except (KeyError, TypeError, ValueError) as err:
        raise TaskError(f"{path} is not a HotpotQA file (a list of {{question, answer, context: [[title, "
                        f"[sentences]], ...]}}): {err!r}") from None
    if not items:
        raise TaskError(f"{path} holds no question")
    return QAData(tuple(items), tuple(documents))


def load(task: str, data_dir: str | Path) -> QAData:
    """The questions of `task`'s dev file in `data_dir` (FILES[task]), read once per file version."""
    if task not in FILES:
        raise TaskError(f"unknown QA task {task!r}; known: {', '.join(FILES)}")
    path = Path(data_dir) / FILES[task]
    if not path.is_file():
        raise TaskError(f"{task}: no {FILES[task]} in {data_dir}")
    reader = _squad if task == "qa_1" else _hotpot
    return reader(str(path.resolve()), path.stat().st_mtime_ns)


def _file_distractors(rng: random.Random, item: QAItem, data: QAData) -> Iterator[str]:
    """The item's own non-answer paragraphs, then the other documents of the file in random order, cycling."""
    own = set(item.gold) | set(item.own_distractors)
    first = list(item.own_distractors)
    rng.shuffle(first)
    yield from first
    others = [d for d in data.documents if d not in own]
    if not others:
        raise TaskError("the QA file has no documents besides the question's own to fill the prompt with")
    while True:
        rng.shuffle(others)
        yield from others


# ------------------------------------------------------------------------------------------- the prompt
def _unit(number: int, text: str) -> str:
    return f"\n\nDocument {number}:\n{text}"


def assemble(task: str, rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None,
             item: QAItem, distractors: Iterator[str]) -> Sample:
    """HEAD, numbered documents, TAIL with the question, exactly `length` tokens: as many whole documents as fit
    (item.gold and distractors drawn in order), item.gold[0] at `depth` of them, the other answer documents at
    random places, then a last distractor cut where the length runs out."""
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise TaskError(f"{task}: depth must be in [0, 1], got {depth}")
    head, tail = HEAD, TAIL.format(question=item.question)
    budget = length - len(encode_prompt(tokenizer, head)) - len(tokenizer.encode(tail))
    gold = len(item.gold)
    where = rng.random() if depth is None else depth
    others = [rng.random() for _ in item.gold[1:]]
    pool: list[str] = []  # distractors drawn so far
    sizes: dict[str, int] = {}

    def size(units: list[str]) -> list[int]:
        missing = [u for u in dict.fromkeys(units) if u not in sizes]
        for unit, ids in zip(missing, tokenizer.encode_many(missing) if missing else []):
            sizes[unit] = len(ids)
        return [sizes[u] for u in units]

    def arrange(n: int) -> tuple[list[str], list[int]]:
        """n documents: the answer documents at their places, distractors in order around them."""
        while len(pool) < n - gold + 1:
            pool.append(next(distractors))
        slots: list[int] = [round(where * (n - 1))]
        free = [i for i in range(n) if i != slots[0]]
        for u in others:
            slots.append(free.pop(min(int(u * len(free)), len(free) - 1)))
        docs: list[str | None] = [None] * n
        for slot, text in zip(slots, item.gold):
            docs[slot] = text
        rest = iter(pool)
        return [_unit(i + 1, d if d is not None else next(rest)) for i, d in enumerate(docs)], slots

    def total(n: int) -> int:
        return sum(size(arrange(n)[0]))

    if budget <= 0 or total(gold) > budget:
        raise TaskError(f"{task}: a length of {length} tokens is too short for the instructions, the question "
                        f"and its {gold} answer document(s)")
    n = gold
    estimate = total(gold) / gold
    while True:  # grow in steps from an estimate of the document size, then one by one
        step = max(1, int((budget - total(n)) / estimate * 0.9))
        if total(n + step) <= budget:
            n += step
            continue
        if step == 1:
            break
        estimate *= 1.1
    units, slots = arrange(n)
    bounds = [0]
    for s in size(units):
        bounds.append(bounds[-1] + s)

    def stream() -> Iterator[str]:
        yield from units
        rest = iter(pool[n - gold:])
        for number in count(n + 1):
            text = next(rest, None)
            yield _unit(number, text if text is not None else next(distractors))

    prompt = build_prompt(tokenizer, length, head, stream(), [], tail, task)
    start = length - budget - len(tokenizer.encode(tail))  # tokens before the first document
    offsets = [start + bounds[s] for s in slots]
    ends = [start + bounds[s + 1] for s in slots]
    target = " " + item.answers[0]
    return Sample(prompt.ids, target, list(item.answers), answer_budget(task, tokenizer, target), offsets, ends)


def sample(task: str, rng: random.Random, tokenizer: Tokenizer, length: int, depth: float | None = None,
           data_dir: str | Path | None = None) -> Sample:
    """A qa_1 or qa_2 sample: made-up documents, or with `data_dir` a random question of the task's dev file
    (FILES) with other questions' paragraphs as distractors."""
    if data_dir is not None:
        data = load(task, data_dir)
        item = data.items[rng.randrange(len(data.items))]
        child = random.Random(rng.getrandbits(64))
        return assemble(task, rng, tokenizer, length, depth, item, _file_distractors(child, item, data))
    names = Names(random.Random(rng.getrandbits(64)))
    item, banned = (_qa1_item if task == "qa_1" else _qa2_item)(rng, names)
    distractors = _made_up_distractors(random.Random(rng.getrandbits(64)), names, banned)
    return assemble(task, rng, tokenizer, length, depth, item, distractors)


TASKS: dict[str, TaskFn] = {name: partial(sample, name) for name in FILES}
