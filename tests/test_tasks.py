"""The long-context task generators (ramba.data.tasks): exact lengths, determinism, answers, scoring."""

import random
import re
from collections import Counter

import pytest
import torch

from ramba.data.tasks import SCORES, TASKS, Key, TaskError, babilong, make_sample, passkey, ruler, sample_rng, score
from ramba.data.tasks.passkey import QUESTION as PASSKEY_QUESTION
from ramba.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NAMES = ["passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa1", "qa2", "qa3", "qa4",
         "qa5", "qa_1", "qa_2"]


def text_of(sample) -> str:
    return TOK.decode(sample.prompt_ids.tolist())


def passkey_sample(key: Key, seed: int = 0, haystack: str = "noise"):
    return passkey.sample(sample_rng(seed, key), TOK, key.length, key.depth, haystack)


# ------------------------------------------------------------------------------------------- registry
def test_registry_names() -> None:
    assert list(TASKS) == NAMES and set(SCORES) == set(TASKS)
    with pytest.raises(TaskError, match="unknown task 'qa6'"):
        make_sample(Key("qa6", 1024, None, 0), TOK)
    with pytest.raises(TaskError, match="unknown task"):
        score("qa_9", "x", ["x"])


@pytest.mark.parametrize("task", NAMES)
def test_every_task_exact_length_and_scores_its_answers(task: str) -> None:
    for seed, depth in ((0, None), (1, 0.5)):
        sample = TASKS[task](random.Random(seed), TOK, 1024, depth)
        assert sample.prompt_ids.numel() == 1024 and sample.prompt_ids.dtype == torch.int32
        assert sample.prompt_ids[0] == TOK.bos_id and sample.max_new_tokens > 0 and sample.references
        assert score(task, sample.target, sample.references) == 1.0
        assert score(task, ", ".join(sample.references), sample.references) == 1.0
        assert score(task, " nothing", sample.references) == 0.0
    key = Key(task, 1024, 0.5, 3)
    assert torch.equal(make_sample(key, TOK, 7).prompt_ids, TASKS[task](sample_rng(7, key), TOK, 1024, 0.5).prompt_ids)


# ------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("haystack", ["noise", "essay"])
def test_passkey_prompt_exact_deterministic(haystack: str) -> None:
    for length in (300, 512, 1000, 2048):
        key = Key("passkey", length, 0.5, 3)
        a, b = (passkey_sample(key, 0, haystack) for _ in range(2))
        other = passkey_sample(key, 1, haystack)
        assert a.prompt_ids.numel() == length and a.prompt_ids.dtype == torch.int32
        assert torch.equal(a.prompt_ids, b.prompt_ids) and a.references == b.references
        assert a.references != other.references and not torch.equal(a.prompt_ids, other.prompt_ids)
        assert re.fullmatch(r"\d{5,7}", a.references[0]) and a.target == " " + a.references[0]
        assert text_of(a).endswith(PASSKEY_QUESTION) and a.prompt_ids[0] == TOK.bos_id


class ListBytes:
    """The byte tokenizer seen only through the generic interface (lists of ids), as a Hugging Face one is."""

    name, vocab_size, bos_id, eos_id, pad_id = "list-bytes", TOK.vocab_size, TOK.bos_id, TOK.eos_id, TOK.pad_id

    def encode(self, text: str) -> list[int]:
        return TOK.encode(text)

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return [TOK.encode(text) for text in texts]


@pytest.mark.parametrize("task", ["passkey", "niah_single_2", "niah_multikey_1", "qa1"])
def test_the_byte_tokenizers_fast_haystack_equals_the_generic_one(task: str) -> None:
    for length, depth, seed in ((700, 0.0, 1), (5000, 0.3, 2), (20000, 1.0, 3)):
        key = Key(task, length, depth, seed)
        assert torch.equal(make_sample(key, TOK, seed).prompt_ids, make_sample(key, ListBytes(), seed).prompt_ids)


@pytest.mark.parametrize("haystack", ["noise", "essay"])
def test_needle_at_depth(haystack: str) -> None:
    length = 8192
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        sample = passkey_sample(Key("passkey", length, depth, 0), 0, haystack)
        (offset,) = sample.insert_offsets
        assert abs(offset / length - depth) < 0.025
        assert TOK.decode(sample.prompt_ids[offset:].tolist()).startswith(f" The pass key is {sample.references[0]}.")



@pytest.mark.parametrize("task, fact", [
    ("passkey", r" The pass key is (\d+)\. Remember it\. \1 is the pass key\."),
    ("niah_multikey_1", r" One hidden number for [a-z]+-[a-z]+ is \d{7}\."),
    ("vt", r" VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})\."),
])
def test_insert_spans_hold_the_inserted_facts(task: str, fact: str) -> None:
    """[insert_offsets[i], insert_ends[i]) is exactly the i-th inserted fact, and it follows a whole sentence."""
    for seed in range(3):
        sample = TASKS[task](random.Random(seed), TOK, 2048, 1.0)
        assert len(sample.insert_ends) == len(sample.insert_offsets) > 0
        for start, end in zip(sample.insert_offsets, sample.insert_ends):
            assert re.fullmatch(fact, TOK.decode(sample.prompt_ids[start:end].tolist()))
            assert TOK.decode(sample.prompt_ids[start - 1:start].tolist()) in ".\n"

@pytest.mark.parametrize("task", ruler.TASKS)
def test_ruler_deterministic_exact(task: str) -> None:
    key = Key(task, 2048, None, 1)
    a, b, other = make_sample(key, TOK, 0), make_sample(key, TOK, 0), make_sample(key, TOK, 1)
    assert a.prompt_ids.numel() == 2048
    assert torch.equal(a.prompt_ids, b.prompt_ids) and a.references == b.references
    assert not torch.equal(a.prompt_ids, other.prompt_ids) and a.references != other.references


@pytest.mark.parametrize("task", list(ruler.NIAH))
def test_niah_needles(task: str) -> None:
    spec = ruler.NIAH[task]
    sample = make_sample(Key(task, 4096, 0.25, 0), TOK)
    text = text_of(sample)
    question = text.rsplit("\n", 2)[-2]
    assert len(sample.references) == spec.values * spec.queries
    for value in sample.references:
        key = re.search(rf"One hidden {spec.value_kind} for (\S+) is {value}\.", text).group(1)
        assert key in question
    assert abs(text.index(sample.references[0]) / 4096 - 0.25) < 0.05  # the first asked needle: at the asked depth
    assert len(re.findall(r"One hidden", text)) >= (30 if spec.haystack == "needles" else spec.keys * spec.values)


def test_vt_chain() -> None:
    sample = make_sample(Key("vt", 2048, None, 0), TOK)
    value = re.search(r"hold the value (\d+)", text_of(sample)).group(1)
    holding = {value}
    for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", text_of(sample)):
        if source.removeprefix("VAR ") in holding:
            holding.add(name)
    assert sorted(holding - {value}) == sorted(sample.references) and len(sample.references) == 5


@pytest.mark.parametrize("task, top", [("cwe", 10), ("fwe", 3)])
def test_common_and_frequent_words(task: str, top: int) -> None:
    for index in range(3):
        sample = make_sample(Key(task, 4096, None, index), TOK)
        haystack = text_of(sample).split("\n")[1]
        counts = Counter(haystack.split())
        rest = max(c for w, c in counts.items() if w not in sample.references)
        assert len(sample.references) == top and min(counts[w] for w in sample.references) >= rest
        if task == "cwe":
            assert min(counts[w] for w in sample.references) > rest  # strictly more common


def test_babilong_generator() -> None:
    for task in babilong.TASKS:
        for index in range(4):
            key = Key(task, 2048, None, index)
            a, b, other = (make_sample(key, TOK, seed) for seed in (0, 0, 1))
            assert a.prompt_ids.numel() == 2048 and torch.equal(a.prompt_ids, b.prompt_ids)
            assert not torch.equal(a.prompt_ids, other.prompt_ids)
            assert a.insert_offsets == sorted(a.insert_offsets)  # facts stay in story order
            assert re.search(rf"\b{a.references[0]}\b", text_of(a)[:-60])  # the answer is in the facts


def test_babilong_qa1_answer_follows_from_facts() -> None:
    for index in range(10):
        sample = make_sample(Key("qa1", 2048, None, index), TOK)
        text = text_of(sample)
        person = re.search(r"Question: Where is (\w+)\?", text).group(1)
        moves = re.findall(rf"{person} (?:{'|'.join(babilong.MOVE)}) the (\w+)\.", text)
        assert moves and moves[-1] == sample.references[0]


def test_too_short() -> None:
    for task, length in (("passkey", 64), ("cwe", 600), ("niah_multiquery", 200)):
        with pytest.raises(TaskError, match=f"{task}: a length of {length} tokens is too short"):
            make_sample(Key(task, length, None, 0), TOK)


# ---------------------------------------------------------------------------------------------- scoring
def test_passkey_score() -> None:
    ref = ["12345"]
    assert passkey.score(" 12345.", ref) == 1.0
    assert passkey.score("is 12345 and 999", ref) == 1.0
    for wrong in (" 1234", " 123456", "", "no key", " 54321 12345"):
        assert passkey.score(wrong, ref) == 0.0


def test_ruler_match() -> None:
    refs = ["1234567", "Blue-Sky", "7654321"]
    assert ruler.match_all("1234567, blue-sky, 7654321", refs) == 1.0
    assert ruler.match_all(" 1234567 and BLUE-SKY", refs) == pytest.approx(2 / 3)
    assert ruler.match_all(" nothing", refs) == 0.0
    assert ruler.match_part("it is blue-sky", refs) == 1.0 and ruler.match_part("none", refs) == 0.0


def test_babilong_score() -> None:
    assert babilong.score(" The Kitchen.", ["kitchen"]) == 1.0
    assert babilong.score(" kitchens", ["kitchen"]) == 0.0
    assert babilong.score("", ["kitchen"]) == 0.0
    assert babilong.score("milk and apple", ["apple,milk"]) == 1.0
    assert babilong.score("apple", ["apple,milk"]) == 0.0
