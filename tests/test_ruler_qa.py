"""RULER's QA tasks (ramba.data.tasks.ruler_qa): made-up documents, the SQuAD / HotpotQA loaders on tiny fixtures
(tests/data/ruler_qa), registration and the benchmark command."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from benchmarks import ruler as ruler_bench
from ramba.data.tasks import SCORES, TASKS, Key, TaskError, make_sample, ruler, ruler_qa, sample_rng, score
from ramba.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
DATA = Path(__file__).parent / "data" / "ruler_qa"
QA = ("qa_1", "qa_2")


def text_of(sample) -> str:
    return TOK.decode(sample.prompt_ids.tolist())


def documents(text: str) -> dict[int, str]:
    """Document number -> its text (the last one may be cut)."""
    body = text.split("\n\nQuestion: ")[0]
    parts = re.split(r"\n\nDocument (\d+):\n", body)
    return {int(n): doc for n, doc in zip(parts[1::2], parts[2::2])}


def answer_document(sample) -> str:
    return TOK.decode(sample.prompt_ids[sample.insert_offsets[0]:sample.insert_ends[0]].tolist())


def test_registered_with_match_part() -> None:
    for task in QA:
        assert task in TASKS and SCORES[task] is ruler.match_part
        assert task in ruler_bench.TASKS and task in ruler_bench.parse_tasks("all")
    assert list(TASKS)[:-2] == [t for t in TASKS if t not in QA]  # appended: the other tasks keep their order


@pytest.mark.parametrize("task", QA)
def test_exact_length_deterministic_and_scored(task: str) -> None:
    for length in (512, 2048, 8192):
        key = Key(task, length, 0.5, 2)
        a, b, other = make_sample(key, TOK, 0), make_sample(key, TOK, 0), make_sample(key, TOK, 1)
        assert a.prompt_ids.numel() == length and a.prompt_ids.dtype == torch.int32 and a.prompt_ids[0] == TOK.bos_id
        assert torch.equal(a.prompt_ids, b.prompt_ids) and a.references == b.references and a.target == b.target
        assert not torch.equal(a.prompt_ids, other.prompt_ids)
        assert torch.equal(a.prompt_ids, TASKS[task](sample_rng(0, key), TOK, length, 0.5).prompt_ids)
        assert score(task, a.target, a.references) == 1.0 and score(task, a.target.upper(), a.references) == 1.0
        assert score(task, " nothing", a.references) == 0.0 and score(task, other.target, a.references) == 0.0
        assert a.max_new_tokens >= 32 and text_of(a).endswith("\nAnswer:")
    with pytest.raises(TaskError, match=f"{task}: a length of 200 tokens is too short"):
        make_sample(Key(task, 200, None, 0), TOK)


@pytest.mark.parametrize("task", QA)
def test_answer_document_at_depth(task: str) -> None:
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        for index in range(3):
            sample = make_sample(Key(task, 8192, depth, index), TOK)
            docs = documents(text_of(sample))
            gold = answer_document(sample)
            number = int(re.match(r"\n\nDocument (\d+):\n", gold).group(1))
            assert docs[number].startswith(gold.split(":\n", 1)[1]) and sample.references[0] in gold
            last = max(docs)  # the whole documents: all, or all but the last, cut one
            assert number - 1 in {round(depth * (n - 1)) for n in (last - 1, last)}
            assert abs(sample.insert_offsets[0] / 8192 - depth) < 0.05


def test_qa_1_distractors_lack_the_answer() -> None:
    for index in range(20):
        sample = make_sample(Key("qa_1", 4096, None, index), TOK)
        text, answer = text_of(sample), sample.references[0]
        holding = [n for n, doc in documents(text).items() if answer.lower() in doc.lower()]
        assert len(holding) == 1 and answer in answer_document(sample)
        question = re.search(r"Question: (.*)\n", text).group(1)
        subject = re.search(r"(?:town of|river|firm|was) ([A-Z][a-z]+(?: [A-Z][a-z]+)?)", question).group(1)
        assert [n for n, doc in documents(text).items() if subject in doc] == holding


def test_qa_2_bridge() -> None:
    kinds = set()
    for index in range(24):
        sample = make_sample(Key("qa_2", 4096, None, index), TOK)
        text, answer = text_of(sample), sample.references[0]
        answer_doc, link = (TOK.decode(sample.prompt_ids[s:e].tolist())
                            for s, e in zip(sample.insert_offsets, sample.insert_ends))
        question = re.search(r"Question: (.*)\n", text).group(1)
        kinds.add(question.split()[2])
        assert answer in answer_doc and answer.lower() not in link.lower()
        assert [d for d in documents(text).values() if answer.lower() in d.lower()] == [answer_doc.split(":\n", 1)[1]]
        # the bridge: a name the link document shares with the answer document and with no other document
        names = set(re.findall(r"\b[A-Z][a-z]{3,}\b", link.split(":\n", 1)[1])) - {"Lake", *ruler_qa.FIRM_KINDS}
        bridges = [name for name in names if name in answer_doc and name not in question]
        assert any(sum(name in d for d in documents(text).values()) == 2 for name in bridges), (question, link)
        words = [w for w in re.findall(r"[A-Z][a-z]{3,}", question.split(" ", 1)[1]) if w not in ruler_qa.FIRM_KINDS]
        subject = [d for d in documents(text).values() if any(w in d for w in words)]
        assert subject == [link.split(":\n", 1)[1]]
    assert len(kinds) >= 3  # several question shapes


# ----------------------------------------------------------------------------------------- loaders
def test_squad_loader() -> None:
    data = ruler_qa.load("qa_1", DATA)
    assert len(data.documents) == 4 and len(data.items) == 5  # two unanswerable questions left out
    assert data.items[0].answers == ["1843", "in 1843"] and "Verasko" in data.items[0].gold[0]
    seen = set()
    for seed in range(12):
        sample = ruler_qa.sample("qa_1", random.Random(seed), TOK, 2048, 0.5, DATA)
        assert sample.prompt_ids.numel() == 2048 and score("qa_1", sample.target, sample.references) == 1.0
        item = next(i for i in data.items if i.answers == sample.references)
        assert item.question in text_of(sample) and answer_document(sample).endswith(item.gold[0])
        assert set(documents(text_of(sample)).values()) >= set(data.documents) - {item.gold[0]}
        seen.add(item.question)
    assert len(seen) >= 3


def test_hotpot_loader() -> None:
    data = ruler_qa.load("qa_2", DATA)
    assert len(data.items) == 3 and len(data.documents) == 10
    first = data.items[0]
    assert first.answers == ["Tamsel"] and first.gold[0].startswith("Melbrook\n")  # the answer paragraph first
    assert first.gold[1].startswith("Lorin Vask\n") and len(first.own_distractors) == 2
    for seed in range(6):
        sample = ruler_qa.sample("qa_2", random.Random(seed), TOK, 1024, 1.0, DATA)
        assert sample.prompt_ids.numel() == 1024 and score("qa_2", sample.target, sample.references) == 1.0
        item = next(i for i in data.items if i.answers == sample.references)
        for start, end, gold in zip(sample.insert_offsets, sample.insert_ends, item.gold):
            assert TOK.decode(sample.prompt_ids[start:end].tolist()).endswith(gold)


def test_loader_errors(tmp_path) -> None:
    with pytest.raises(TaskError, match="no dev-v2.0.json"):
        ruler_qa.load("qa_1", tmp_path)
    (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(TaskError, match="not a HotpotQA file"):
        ruler_qa.load("qa_2", tmp_path)


# --------------------------------------------------------------------------------------- benchmark
def summary_of(out: Path) -> dict:
    rows = json.loads((out / "summary.json").read_text())["by_length"]
    return {(r["task"], r["length"]): r["accuracy"] for r in rows}


@pytest.mark.parametrize("data_dir", [None, DATA])
def test_benchmark_oracle(tmp_path, data_dir) -> None:
    argv = ["--checkpoint", "oracle", "--tasks", "qa_1,qa_2", "--lengths", "1k", "--samples", "2", "--device",
            "cpu", "--out", str(tmp_path)]
    table = ruler_bench.main(argv + (["--qa-data-dir", str(data_dir)] if data_dir else []))
    assert "qa_1" in table and "qa_2" in table
    assert summary_of(tmp_path) == {("qa_1", 1024): 100.0, ("qa_2", 1024): 100.0}
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


def test_benchmark_depths_and_missing_dir(tmp_path) -> None:
    keys = ruler_bench.keys(["qa_1", "vt"], [1024], [0.0, 1.0], 1, {})
    assert sorted((k.task, k.depth) for k in keys) == [("qa_1", 0.0), ("qa_1", 1.0), ("vt", None)]
    with pytest.raises(SystemExit, match="no dev-v2.0.json"):
        ruler_bench.main(["--checkpoint", "oracle", "--tasks", "qa_1", "--lengths", "1k", "--samples", "1",
                          "--out", str(tmp_path), "--qa-data-dir", str(tmp_path)])
