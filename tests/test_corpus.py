"""The Debian real-text corpus builder (recipes/data/debian_corpus.py), its shipped sample, text haystacks."""

import gzip
import importlib.util
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import passkey as passkey_bench
from benchmarks import ruler as ruler_bench
from ramba.data.tasks import Key, TaskError, check_haystack, passkey, sample_rng
from ramba.data.tasks.passkey import NEEDLE, QUESTION
from ramba.data.tasks.ruler import NIAH
from ramba.tokenizer import ByteTokenizer
from ramba.training.config import DataSection, RunConfig, RunConfigError
from ramba.training.data import corpus_documents, task_examples

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "recipes" / "data" / "sample"
TOK = ByteTokenizer()
WORDS = "river garden lantern harbor meadow quiet copper window orchard distant morning letter".split()


def corpus_module():
    spec = importlib.util.spec_from_file_location("debian_corpus", ROOT / "recipes" / "data" / "debian_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["debian_corpus"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def prose(i: int) -> str:
    """A distinct document of a few paragraphs."""
    sentences = [f"The {WORDS[(i + k) % 12]} and the {WORDS[(3 * i + k) % 12]} were seen on day {i}-{k}."
                 for k in range(30)]
    return "\n\n".join(" ".join(sentences[j:j + 5]) for j in range(0, 30, 5)) + "\n"


def fake_package(folder: Path, name: str = "fakedoc", docs: int = 40) -> Path:
    """An extracted package tree: text, gzip'd text, HTML, a duplicate, and files that are no documents."""
    root = folder / f"{name}_1.2-3"
    doc = root / "usr/share/doc" / name
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nCopyright: nobody\nLicense: CC0-1.0\n Public domain dedication.\n")
    for i in range(docs - 2):
        (doc / f"part{i:02d}.txt").write_text(prose(i).replace("\n", "  \r\n"))
    (doc / "manual.txt.gz").write_bytes(gzip.compress(prose(100).encode()))
    (doc / "guide.html").write_text(
        "<html><head><title>t</title><style>p {color: red}</style><script>var x = 1;</script></head><body>"
        "<div class='related' role='navigation'><a href='x'>navigation junk</a></div><h1>The Guide</h1>"
        + "".join(f"<p>{p.replace(chr(10), ' ')}</p>" for p in prose(101).split("\n\n")) + "<p>Fish &amp; chips "
        "&lt;here&gt;.</p></body></html>")
    (doc / "copy-of-part00.txt").write_text(prose(0).replace("\n", "  \r\n"))  # a duplicate
    (doc / "changelog.gz").write_bytes(gzip.compress(b"fakedoc (1.2-3) unstable; urgency=low\n" * 20))
    (doc / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (doc / "data.bin").write_bytes(bytes(range(256)) * 8)
    (root / "usr/share/man/man1").mkdir(parents=True)
    (root / "usr/share/man/man1/fake.1.gz").write_bytes(gzip.compress(prose(102).encode()))
    return root


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build(module, source: Path, out: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    module.main(["--out", str(out), "--from-debs", str(source), "--cache", str(out.parent / "cache"), *extra])
    return read(out / "train.jsonl"), read(out / "validation.jsonl")


# --------------------------------------------------------------------------------------------- the builder
def test_build_from_extracted_folder(tmp_path) -> None:
    module = corpus_module()
    fake_package(tmp_path / "debs")
    train, val = build(module, tmp_path / "debs", tmp_path / "a", "--validation-fraction", "0.25", "--seed", "3",
                       "--validation-longest", "0")
    docs = train + val
    paths = [d["path"] for d in docs]
    assert len(docs) == 40 and len(set(paths)) == 40  # 38 text files, gz, html; the duplicate dropped
    assert {d["source"] for d in docs} == {"fakedoc"}
    assert not set(d["path"] for d in train) & set(d["path"] for d in val)  # split by document
    assert len(val) == 10  # round(0.25 * 40)
    assert not any(re.search(r"changelog|copyright|\.png|\.bin|/man/", p) for p in paths)
    by_path = {d["path"]: d["text"] for d in docs}
    assert by_path["usr/share/doc/fakedoc/manual.txt.gz"] == prose(100)  # gzip'd text read
    assert by_path["usr/share/doc/fakedoc/part05.txt"] == prose(5)  # \r\n and trailing spaces normalised
    page = by_path["usr/share/doc/fakedoc/guide.html"]
    assert page.startswith("The Guide\n\n") and "Fish & chips <here>." in page
    assert "navigation junk" not in page and "color" not in page and "var x" not in page and "<p>" not in page
    assert prose(101).split("\n\n")[2].strip() in page
    sources = (tmp_path / "a" / "SOURCES.md").read_text()
    assert re.search(r"\| fakedoc \| 1\.2-3 \| 40 \(30 / 10\) \| [\d,]+ \| CC0-1\.0 \|", sources)
    # deterministic for a seed, another split for another seed
    train2, val2 = build(module, tmp_path / "debs", tmp_path / "b", "--validation-fraction", "0.25", "--seed", "3",
                         "--validation-longest", "0")
    assert (train2, val2) == (train, val)
    _, val3 = build(module, tmp_path / "debs", tmp_path / "c", "--validation-fraction", "0.25", "--seed", "4",
                    "--validation-longest", "0")
    assert {d["path"] for d in val3} != {d["path"] for d in val}
    # a byte cap and a document cap
    train4, val4 = build(module, tmp_path / "debs", tmp_path / "d", "--validation-fraction", "0.25",
                         "--max-bytes", "20000", "--max-doc-bytes", "900")
    size = sum(len(p.read_bytes()) for p in (tmp_path / "d").glob("*.jsonl"))
    assert size <= 20000 and val4 and train4 and max(len(d["text"].encode()) for d in train4 + val4) <= 900


def test_validation_holds_out_the_longest_documents(tmp_path) -> None:
    """--validation-longest N: the N longest documents (by bytes) are held out beside the random fraction."""
    module = corpus_module()
    fake_package(tmp_path / "debs")
    train, val = build(module, tmp_path / "debs", tmp_path / "a", "--validation-fraction", "0.25",
                       "--validation-longest", "2")
    docs = train + val
    longest = sorted(docs, key=lambda d: -len(d["text"].encode()))[:2]
    assert len(docs) == 40 and len(val) == 12  # 2 longest + round(0.25 * 40)
    assert all(d in val for d in longest)
    assert max(len(d["text"].encode()) for d in train) <= min(len(d["text"].encode()) for d in longest)
    _, only = build(module, tmp_path / "debs", tmp_path / "b", "--validation-fraction", "0",
                    "--validation-longest", "1")
    assert only == longest[:1]
    with pytest.raises(SystemExit):
        build(module, tmp_path / "debs", tmp_path / "c", "--validation-longest", "-1")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_build_from_deb_file(tmp_path) -> None:
    root = fake_package(tmp_path / "tree", "fakedeb", docs=6)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text("Package: fakedeb\nVersion: 2.0-1\nArchitecture: all\n"
                                         "Maintainer: Nobody <nobody@example.org>\nDescription: a test package\n")
    (tmp_path / "debs").mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(tmp_path / "debs" / "fakedeb.deb")],
                   check=True, capture_output=True)
    train, val = build(corpus_module(), tmp_path / "debs", tmp_path / "out", "--validation-fraction", "0.2",
                       "--validation-longest", "0")
    assert len(train) + len(val) == 6 and len(val) == 1
    assert "| fakedeb | 2.0-1 | 6 (5 / 1) |" in (tmp_path / "out" / "SOURCES.md").read_text()


def test_clear_errors(tmp_path, caplog) -> None:
    module = corpus_module()
    fake_package(tmp_path / "debs")
    with pytest.raises(SystemExit):
        build(module, tmp_path / "debs", tmp_path / "a", "--packages", "fakedoc,no-such-package")
    assert "no package 'no-such-package'" in caplog.text
    with pytest.raises(SystemExit):
        build(module, tmp_path / "nowhere", tmp_path / "b")
    assert "no such folder" in caplog.text


# ------------------------------------------------------------------------------------------ the sample
def test_shipped_sample_is_small_and_loads() -> None:
    files = [SAMPLE / "train.jsonl", SAMPLE / "validation.jsonl"]
    assert sum(f.stat().st_size for f in files) <= 300_000
    train, val = (read(f) for f in files)
    assert train and val and not {d["path"] for d in train} & {d["path"] for d in val}
    assert all(d["source"] == "bible-kjv-text" for d in train + val)
    assert "public domain" in (SAMPLE / "SOURCES.md").read_text()
    docs = list(corpus_documents(DataSection(source=str(SAMPLE / "train.jsonl"), text_field="text"), 0))
    assert sorted(docs) == sorted(d["text"] for d in train)


# ------------------------------------------------------------------------------------------ text haystacks
def corpus_text(path: Path) -> str:
    return " ".join(" ".join(d["text"].split()) for d in read(path))


def test_passkey_in_corpus_text() -> None:
    kind = f"text:{SAMPLE / 'validation.jsonl'}"
    corpus = corpus_text(SAMPLE / "validation.jsonl")
    for length, depth in ((512, 0.0), (2048, 0.5), (6000, 1.0)):
        key = Key("passkey", length, depth, 0)
        sample = passkey.sample(sample_rng(0, key), TOK, length, depth, kind)
        again = passkey.sample(sample_rng(0, key), TOK, length, depth, kind)
        assert sample.prompt_ids.numel() == length and torch.equal(sample.prompt_ids, again.prompt_ids)
        text = TOK.decode(sample.prompt_ids.tolist())
        needle = NEEDLE.format(key=sample.references[0])
        assert needle in text and text.endswith(QUESTION)
        filler = text.replace(needle, "").replace(QUESTION, "")
        assert not re.search(r"\d", filler)  # numbers in the prompt are the key's only
        sentences = [s for s in re.split(r"(?<=[.!?:;]) ", " ".join(filler.split())) if len(s) > 20][1:-1]
        assert len(sentences) >= 3 and all(s[-30:] in corpus for s in sentences)
        assert sum(s in corpus for s in sentences) >= 0.9 * len(sentences)  # (a title may run into a sentence)
    starts = {TOK.decode(passkey.sample(sample_rng(0, Key("passkey", 512, 0.5, i)), TOK, 512, 0.5,
                                        kind).prompt_ids[1:60].tolist()) for i in range(4)}
    assert len(starts) > 1  # a random start in the text


def test_text_haystack_errors_and_benchmarks(tmp_path) -> None:
    with pytest.raises(TaskError, match="no such file"):
        check_haystack(f"text:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(TaskError, match="unknown haystack 'poetry'"):
        check_haystack("poetry")
    assert check_haystack("essay") == "essay"
    common = ["--checkpoint", "oracle", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="no such file"):
        passkey_bench.main(common + ["--haystack", f"text:{tmp_path / 'missing.jsonl'}"])
    with pytest.raises(SystemExit, match="no such file"):
        ruler_bench.main(common + ["--haystack", f"text:{tmp_path / 'missing.txt'}"])
    kind = f"text:{SAMPLE / 'validation.jsonl'}"
    corpus = corpus_text(SAMPLE / "validation.jsonl")
    key = Key("niah_single_2", 1500, 0.5, 0)
    sample = ruler_bench.make_sample(key, TOK, 0, haystack=kind)
    text = TOK.decode(sample.prompt_ids.tolist())
    assert sample.prompt_ids.numel() == 1500 and sample.references[0] in text
    body = text.split("\n")[1]
    assert " ".join(body.split()[5:25]) in corpus
    plain = ruler_bench.make_sample(key, TOK, 0)
    assert NIAH["niah_single_2"].haystack == "essay" and not torch.equal(plain.prompt_ids, sample.prompt_ids)
    table = passkey_bench.main(common + ["--haystack", kind, "--lengths", "1k", "--depths", "0.5",
                                         "--samples", "1"])
    assert "100" in table


def test_fine_tuning_examples_in_corpus_text(tmp_path) -> None:
    """data.haystack puts corpus text around passkey's and the niah tasks' needles; vt keeps its noise."""
    kind = f"text:{SAMPLE / 'validation.jsonl'}"
    corpus = corpus_text(SAMPLE / "validation.jsonl")
    tasks = ["passkey", "niah_single_1", "vt"]
    data = DataSection(source="tasks", tasks=tasks, seq_len=900, min_len=500, haystack=kind)
    rows = list(itertools.islice(task_examples(data, TOK, seed=2), 12))
    assert {int(r["task"]) for r in rows} == {0, 1, 2}
    for row in rows:
        text = TOK.decode(row["input_ids"][row["labels"] == -100].tolist())
        noise = "The sky is clear and the sea is calm." in text
        words = re.sub(r"\s+", " ", text).split(" ")
        starts = range(0, len(words) - 8, 8)  # runs of 8 words (skipped sentences with digits break some)
        in_corpus = sum(" ".join(words[i:i + 8]) in corpus for i in starts)
        if tasks[int(row["task"])] == "vt":
            assert noise and in_corpus == 0
        else:
            assert not noise and in_corpus >= max(3, len(starts) // 4)
    plain = DataSection(source="tasks", tasks=tasks, seq_len=900, min_len=500)
    assert not next(task_examples(plain, TOK, seed=2))["input_ids"].equal(rows[0]["input_ids"])


def test_fine_tuning_haystack_errors(tmp_path) -> None:
    def config(**data) -> RunConfig:
        return RunConfig(data=DataSection(**data))
    missing = config(source="tasks", haystack=f"text:{tmp_path / 'missing.jsonl'}")
    missing.validate()  # a file made later (a corpus built on the training machine) is looked for at the start
    with pytest.raises(ValueError, match="data.haystack: .*no such file"):
        next(task_examples(missing.data, TOK, seed=0))
    for bad in ("poetry", "text:"):
        with pytest.raises(RunConfigError, match="data.haystack must be noise, essay or text:PATH"):
            config(source="tasks", haystack=bad).validate()
    with pytest.raises(RunConfigError, match="data.haystack applies to data.source=tasks"):
        config(source=str(SAMPLE / "train.jsonl"), haystack="essay").validate()
    config(source="tasks", haystack=f"text:{SAMPLE / 'train.jsonl'}").validate()
