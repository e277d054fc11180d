"""ByteTokenizer and the synthetic long-context documents and batches."""

import random
import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba.data.synthetic import make_batch, needle_span, training_mixture
from ramba.data.tasks import kv, passkey
from ramba.data.tasks.filler import filler
from ramba.data.tasks.passkey import QUESTION as PASSKEY_QUESTION
from ramba.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
MAX_SENTENCE = 80
NEEDLE = r"The pass key is (\d{5,7})\. Remember it\. (\d+) is the pass key\."


@dataclass(frozen=True)
class TextSample:
    """A task sample as text (byte tokens: one character each): the prompt without bos and its leading space, the
    answer, and the character span of the fact that holds the answer (the mixture's needle span)."""

    prompt: str
    answer: str
    needle_start: int
    needle_end: int


def as_text(sample) -> TextSample:
    text = TOK.decode(sample.prompt_ids.tolist())
    lead = 1 + len(text) - len(text.lstrip())  # bos, then the leading space
    start, end = needle_span(sample, TOK)
    return TextSample(text.lstrip(), sample.target, start - lead, end - lead)


def passkey_document(rng: random.Random, length_chars: int, depth: float | None = None) -> TextSample:
    """A mixture pass-key document whose prompt and answer take `length_chars` - 2 to `length_chars` characters."""
    return as_text(passkey.sample(rng, TOK, length_chars - 6, depth, haystack="essay"))


def kv_recall_document(rng: random.Random, length_chars: int, n_pairs: int) -> TextSample:
    """A mixture key-value document whose prompt and answer take `length_chars` - 1 characters."""
    return as_text(kv.sample(rng, TOK, length_chars - 6, n_pairs=n_pairs))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip(text: str) -> None:
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == text


def test_specials() -> None:
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.vocab_size) == (256, 257, 258, 259)
    ids = TOK.encode("hé", add_bos=True, add_eos=True)
    assert ids == [257, 104, 0xC3, 0xA9, 258]
    assert TOK.decode(ids + [256], skip_special=False) == "<bos>hé<eos><pad>"
    assert TOK.decode(torch.tensor(ids)) == "hé"


def test_load_tokenizer_bytes(tmp_path) -> None:
    for tok in (load_tokenizer("byte"), load_tokenizer(), load_tokenizer(None, tmp_path)):  # no tokenizer files
        assert isinstance(tok, ByteTokenizer) and tok.name == "byte"
    assert TOK.encode_many(["hé", ""]) == [[104, 0xC3, 0xA9], []]


def test_decode_errors() -> None:
    assert TOK.decode([0xC3, 104]) == "\ufffdh"
    for bad in (-1, 259):
        with pytest.raises(ValueError, match="outside"):
            TOK.decode([104, bad])


def test_batch_encode() -> None:
    out = TOK.batch_encode(["ab", "", "abcd"], 4)
    assert out.dtype == torch.long and out.tolist() == [[97, 98, 256, 256], [256] * 4, [97, 98, 99, 100]]
    assert TOK.batch_encode([], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="longer than length"):
        TOK.batch_encode(["abcde"], 4)
    with pytest.raises(ValueError, match="pad=False"):
        TOK.batch_encode(["abc"], 4, pad=False)
    assert TOK.batch_encode(["abcd"], 4, pad=False).shape == (1, 4)


def test_filler() -> None:
    for n in (0, 2, 3, 50, 1000):
        text = filler(random.Random(n), n)
        assert n - 3 <= len(text) <= n and text.isascii()
        assert not re.search(r"\d", text)
    text = filler(random.Random(0), 2000)
    assert text[0].isupper() and text.endswith((".", "?")) and len(set(text.split())) > 50


@pytest.mark.parametrize("make", [lambda r: passkey_document(r, 1500), lambda r: kv_recall_document(r, 1500, 5)])
def test_deterministic(make) -> None:
    assert make(random.Random(1)) == make(random.Random(1))
    assert make(random.Random(1)) != make(random.Random(2))


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.9, 1.0])
def test_passkey_depth(depth: float) -> None:
    for seed in range(5):
        s = passkey_document(random.Random(seed), 3000, depth=depth)
        needle = re.match(NEEDLE, s.prompt[s.needle_start:])
        assert needle and needle[1] == needle[2] == s.answer.strip() and s.answer == " " + needle[1]
        assert s.needle_start == 0 or s.prompt[s.needle_start - 2:s.needle_start] in (". ", "? ")
        assert s.prompt[s.needle_start:s.needle_end] == needle[0]
        n_filler = len(s.prompt) - len(needle[0]) - len(PASSKEY_QUESTION) - 2
        assert abs(s.needle_start - depth * n_filler) <= MAX_SENTENCE / 2 + 1
        assert s.prompt.endswith(" " + PASSKEY_QUESTION)
        assert 3000 - 4 <= len(s.prompt + s.answer) <= 3000


def test_passkey_errors() -> None:
    with pytest.raises(ValueError, match="depth"):
        passkey_document(random.Random(0), 1000, depth=1.5)
    with pytest.raises(ValueError, match="too short"):
        passkey_document(random.Random(0), 50)


def test_kv_recall() -> None:
    for seed in range(10):
        s = kv_recall_document(random.Random(seed), 2000, 8)
        facts = re.findall(r"Key ([A-Z0-9]{4}-[A-Z0-9]{4}) has value (\d{6})\.", s.prompt)
        assert len(facts) == 8 and len({k for k, _ in facts}) == 8
        asked = re.search(r"What is the value of key (\S+)\? The value is$", s.prompt)[1]
        assert s.answer == " " + dict(facts)[asked]
        assert s.prompt[s.needle_start:s.needle_end] == f"Key {asked} has value {s.answer.strip()}."
    with pytest.raises(ValueError, match="n_pairs"):
        kv_recall_document(random.Random(0), 2000, 0)


@pytest.mark.parametrize("seq_len", [256, 1024])
def test_training_mixture(seq_len: int) -> None:
    stream = training_mixture(3, seq_len, TOK)
    kinds = set()
    for _ in range(40):
        ids, labels = next(stream)
        assert ids.shape == labels.shape == (seq_len,) and ids.dtype == labels.dtype == torch.long
        pad = ids == TOK.pad_id
        n = int((~pad).sum())
        assert torch.equal(labels == -100, pad) and torch.equal(labels[~pad], ids[~pad])
        assert not pad[:n].any() and 0.7 * seq_len <= n <= seq_len
        assert ids[0] == TOK.bos_id and ids[n - 1] == TOK.eos_id
        kinds.add("pass key" in TOK.decode(ids))
    assert kinds == {True, False}
    a, b = training_mixture(3, seq_len, TOK), training_mixture(4, seq_len, TOK)
    assert torch.equal(next(a)[0], next(training_mixture(3, seq_len, TOK))[0])
    assert not torch.equal(next(a)[0], next(b)[0])


def test_training_mixture_short() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        training_mixture(0, 100, TOK)


def test_make_batch() -> None:
    batch = make_batch(5, 6, 512, TOK)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["answer_mask"].shape == (6, 512)
    assert batch["answer_mask"].dtype == torch.bool
    stream = training_mixture(5, 512, TOK)
    for row in range(6):
        ids, labels = next(stream)
        assert torch.equal(batch["input_ids"][row], ids) and torch.equal(batch["labels"][row], labels)
        mask = batch["answer_mask"][row]
        where = mask.nonzero().flatten()
        first, last = int(where[0]), int(where[-1])
        assert torch.equal(where, torch.arange(first, last + 1))
        text = TOK.decode(ids[:first])
        answer = TOK.decode(ids[mask])
        assert re.fullmatch(r" \d{5,7}", answer) and text.endswith(" is")
        assert ids[last + 1] == TOK.eos_id
        assert answer.strip() in text


def test_make_batch_needle_span() -> None:
    """needle_pos and needle_end are the token span of the fact that holds the answer."""
    batch = make_batch(7, 8, 1024, TOK)
    for ids, start, end, mask in zip(batch["input_ids"], batch["needle_pos"], batch["needle_end"],
                                     batch["answer_mask"]):
        fact = TOK.decode(ids[start:end])
        answer = TOK.decode(ids[mask]).strip()
        assert fact.startswith(("The pass key is", "Key ")) and fact.endswith(".") and answer in fact
