"""The long-context benchmarks (benchmarks/passkey.py, ruler.py, babilong.py and their machinery), on the CPU,
offline; the task generators themselves are tested in test_tasks.py."""

import json
import random
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from benchmarks import babilong, passkey, ruler
from benchmarks.answering import ModelAnswerer, answer_greedy, load_answerer
from benchmarks.common import BenchmarkError, parse_lengths
from benchmarks.runner import ResultsLog, sweep
from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.tasks import TASKS, Key, score
from ramba.data.tasks.passkey import QUESTION as PASSKEY_QUESTION
from ramba.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def text_of(sample) -> str:
    return TOK.decode(sample.prompt_ids.tolist())


def tiny_model() -> HSAHybrid:
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=96,
                                    retrieval_dim=32)
    return HSAHybrid(config).eval()


class PasskeyReader(torch.nn.Module):
    """An oracle with the model interface: reads the pass key out of the ids it is fed, then spells it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int | None]] = []  # (tokens fed, logits_to_keep) per forward

    def new_cache(self, batch_size: int, offload: bool = False) -> dict:
        return {"seen": []}

    def forward(self, input_ids: torch.Tensor, cache: dict, logits_to_keep: int | None = None) -> SimpleNamespace:
        self.calls.append((input_ids.shape[1], logits_to_keep))
        cache["seen"] += input_ids[0].tolist()
        text = bytes(i for i in cache["seen"] if i < 256).decode()
        key = re.search(r"The pass key is (\d+)\.", text)
        answer = list(f" {key.group(1) if key else ''}".encode()) + [TOK.eos_id]
        written = len(text.rsplit(PASSKEY_QUESTION, 1)[1]) if PASSKEY_QUESTION in text else 0
        keep = input_ids.shape[1] if logits_to_keep is None else logits_to_keep
        logits = torch.zeros(1, keep, TOK.vocab_size)
        if keep:
            logits[0, -1, answer[min(written, len(answer) - 1)]] = 1.0
        return SimpleNamespace(logits=logits)


class Counting:
    """An answerer that answers right, counts its calls and can fail after some of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.name, self.tokenizer, self.calls, self.fail_after = "counting", TOK, 0, fail_after

    def answer(self, sample) -> str:
        if self.calls == self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        return sample.target


def summary_of(out) -> dict:
    return {(r["model"], r["task"], r["length"]): r["accuracy"]
            for r in json.loads((out / "summary.json").read_text())["by_length"]}


# ---------------------------------------------------------------------------------------------- lengths
def test_parse_lengths() -> None:
    assert parse_lengths("64k,4k,1m,64m,4096") == [4096, 65536, 2**20, 64 * 2**20]
    for bad in ("4x", "0", "", "k"):
        with pytest.raises(BenchmarkError, match="bad length"):
            parse_lengths(bad)


# ---------------------------------------------------------------------------------------------- scoring
def test_ruler_score() -> None:
    refs = ["1234567", "Blue-Sky", "7654321"]
    assert ruler.score("niah_multivalue", "1234567, blue-sky, 7654321", refs) == 1.0
    assert ruler.score("niah_multivalue", " 1234567 and BLUE-SKY", refs) == pytest.approx(2 / 3)
    assert ruler.score("niah_multivalue", " nothing", refs) == 0.0
    assert ruler.score("qa_1", "it is blue-sky", refs) == 1.0 and ruler.score("qa_1", "none", refs) == 0.0


# -------------------------------------------------------------------------------------------- answering
def test_answer_greedy_matches_generate() -> None:
    model = tiny_model().double()
    prompt = passkey.make_sample(Key("passkey", 700, 0.5, 0), TOK).prompt_ids
    ours = answer_greedy(model, prompt, 6, segment=128)
    full = model.generate(prompt[None].long(), max_new_tokens=6, segment_size=700)[0, 700:].tolist()
    assert ours == full


def test_oracle_module_scores_100() -> None:
    reader = PasskeyReader()
    answerer = ModelAnswerer("reader", reader, TOK, segment=256)
    for key in passkey.keys([512, 1024], [0.0, 0.5, 1.0], 2):
        sample = passkey.make_sample(key, TOK)
        reader.calls.clear()
        assert score("passkey", answerer.answer(sample), sample.references) == 1.0
        prefill = [(256, 0)] * (key.length // 256 - 1) + [(256, 1)]  # segment-wise, one logit at the end
        assert reader.calls == prefill + [(1, None)] * len(sample.target)  # then one token at a time until eos


def test_random_model_near_chance(tmp_path) -> None:
    answerer = ModelAnswerer("random", tiny_model(), TOK, segment=256)
    log = ResultsLog(tmp_path, {})
    keys = passkey.keys([512, 1024], [0.0, 1.0], 1)
    sweep(answerer, keys, passkey.make_sample, score, log, progress=False)
    assert len(log.rows) == len(keys) and sum(r["score"] for r in log.rows) / len(keys) <= 0.1


# ------------------------------------------------------------------------------------- resume and output
def test_sweep_resumes(tmp_path) -> None:
    keys = passkey.keys([512], [0.0, 0.5, 1.0], 3)
    first = Counting(fail_after=4)
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep(first, keys, passkey.make_sample, score, ResultsLog(tmp_path, {"seed": 0}), progress=False)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"model": "counting", "task": "pass')  # a write cut short by the interruption
    second = Counting()
    log = ResultsLog(tmp_path, {"seed": 0})
    assert sweep(second, keys, passkey.make_sample, score, log, progress=False) == len(keys) - 4
    assert second.calls == len(keys) - 4
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(keys) == len({(r["length"], r["depth"], r["index"]) for r in rows})
    third = Counting()
    assert sweep(third, keys, passkey.make_sample, score, ResultsLog(tmp_path, {"seed": 0})) == 0
    assert third.calls == 0
    with pytest.raises(BenchmarkError, match="other settings"):
        ResultsLog(tmp_path, {"seed": 1})


def test_passkey_command_writes_tables_and_plots(tmp_path) -> None:
    out = tmp_path / "pk"
    passkey.main(["--checkpoint", "builtin:tiny-random", "--lengths", "512", "--depths", "0", "--samples", "1",
                  "--out", str(out), "--device", "cpu"])
    table = passkey.main(["--checkpoint", "oracle", "--lengths", "512,1k", "--depths", "0,1", "--samples", "2",
                          "--out", str(out)])
    acc = summary_of(out)
    assert acc["oracle", "passkey", 512] == acc["oracle", "passkey", 1024] == 100.0
    assert acc["builtin:tiny-random", "passkey", 512] == 0.0
    assert "| oracle | passkey | 100.0 | 100.0 |" in table and (out / "summary.md").read_text().strip() == table
    assert "| 1 | 100.0 | 100.0 |" in table  # the depth-by-length table
    for name in ("accuracy.png", "heatmap_passkey_oracle.png", "heatmap_passkey_builtin_tiny-random.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.jsonl").read_text().splitlines()) == 1 + 8


def test_ruler_command_oracle(tmp_path) -> None:
    ruler.main(["--checkpoint", "oracle", "--lengths", "2k", "--samples", "1", "--out", str(tmp_path)])
    acc = summary_of(tmp_path)
    assert set(acc.values()) == {100.0} and len(acc) == len(ruler.TASKS)
    assert (tmp_path / "accuracy.png").is_file()


def test_ruler_jsonl_files(tmp_path) -> None:
    records = [{"index": i, "input": f"Context {i}. Question: where is it?", "outputs": [f"place{i}", "there"],
                "length": 3900, "answer_prefix": " Answer:"} for i in range(3)]
    path = tmp_path / "qa_1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = ruler.load_ruler_file(str(path))
    assert (task.name, task.length, len(task.records)) == ("qa_1", 4096, 3)
    assert ruler.load_ruler_file(f"{path}@8k", limit=2).length == 8192
    sample = ruler.make_sample(Key("qa_1", 4096, None, 1), TOK, files={("qa_1", 4096): task})
    assert text_of(sample) == "Context 1. Question: where is it? Answer:" and sample.target == " place1"
    out = tmp_path / "out"
    ruler.main(["--checkpoint", "oracle", "--data", str(path), "--out", str(out)])
    assert summary_of(out) == {("oracle", "qa_1", 4096): 100.0}
    path.write_text('{"input": "x"}\n')
    with pytest.raises(BenchmarkError, match="outputs"):
        ruler.load_ruler_file(str(path))


def test_babilong_command_generated_and_files(tmp_path) -> None:
    babilong.main(["--checkpoint", "oracle", "--lengths", "1k,2k", "--samples", "2", "--out", str(tmp_path / "gen")])
    acc = summary_of(tmp_path / "gen")
    assert set(acc.values()) == {100.0} and len(acc) == 10
    (tmp_path / "data" / "4k").mkdir(parents=True)
    rows = [{"input": "Mary went to the garden.", "question": "Where is Mary?", "target": "garden"}] * 2
    (tmp_path / "data" / "4k" / "qa1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    babilong.main(["--checkpoint", "oracle", "--data-dir", str(tmp_path / "data"), "--tasks", "qa1",
                   "--lengths", "4k", "--samples", "2", "--out", str(tmp_path / "files")])
    assert summary_of(tmp_path / "files") == {("oracle", "qa1", 4096): 100.0}
    with pytest.raises(SystemExit, match="no BABILong file for qa2"):
        babilong.main(["--checkpoint", "oracle", "--data-dir", str(tmp_path / "data"), "--tasks", "qa2",
                       "--lengths", "4k", "--out", str(tmp_path / "files2")])


def test_checkpoint_directory(tmp_path) -> None:
    tiny_model().save_pretrained(tmp_path / "model")
    answerer = load_answerer(f"mine={tmp_path / 'model'}")
    assert answerer.name == "mine" and isinstance(answerer.tokenizer, ByteTokenizer)
    passkey.main(["--checkpoint", f"mine={tmp_path / 'model'}", "--lengths", "512", "--depths", "0.5",
                  "--samples", "1", "--out", str(tmp_path / "out")])
    assert ("mine", "passkey", 512) in summary_of(tmp_path / "out")


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path) -> None:
    common = ["--checkpoint", "oracle", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"unknown RULER task\(s\) 'niah_single_9'.*known: niah_single_1"):
        ruler.main(common + ["--tasks", "niah_single_1,niah_single_9"])
    with pytest.raises(SystemExit, match="cwe: a length of 600 tokens is too short"):
        ruler.main(common + ["--tasks", "niah_single_1,cwe", "--lengths", "600,4k"])
    with pytest.raises(SystemExit, match="niah_multiquery: a length of 200 tokens is too short"):
        ruler.main(common + ["--tasks", "niah_multiquery", "--lengths", "200"])
    with pytest.raises(SystemExit, match="passkey: a length of 64 tokens is too short"):
        passkey.main(common + ["--lengths", "64"])
    with pytest.raises(SystemExit, match="unknown BABILong task"):
        babilong.main(common + ["--tasks", "qa1,qa9"])
    with pytest.raises(SystemExit, match="depths must lie in"):
        passkey.main(common + ["--depths", "0,1.5"])
    assert not (tmp_path / "out" / "results.jsonl").exists()  # nothing ran


def test_bad_checkpoints(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"garbage")
    for bad in ("empty", "broken", "missing"):
        with pytest.raises(SystemExit, match=f"could not load a model from '{tmp_path / bad}'"):
            passkey.main(["--checkpoint", str(tmp_path / bad), "--lengths", "512", "--out", str(tmp_path / "out")])
    with pytest.raises(BenchmarkError, match="unknown built-in model"):
        load_answerer("builtin:huge")


class PairTokenizer:
    """A stand-in for `tokenizers.Tokenizer`: two bytes per token, ids 0-2 for specials."""

    vocab = {"<s>": 1, "</s>": 2}

    @classmethod
    def from_file(cls, path: str) -> "PairTokenizer":
        assert path.endswith("tokenizer.json")
        return cls()

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[SimpleNamespace]:
        out = []
        for text in texts:
            data = text.encode()
            out.append(SimpleNamespace(ids=[3 + data[i] * 257 + (data[i + 1] + 1 if i + 1 < len(data) else 0)
                                            for i in range(0, len(data), 2)]))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        for i in ids:
            if i >= 3:
                first, second = divmod(i - 3, 257)
                data += bytes([first] + ([second - 1] if second else []))
        return data.decode(errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def get_vocab_size(self) -> int:
        return 3 + 256 * 257


def test_hf_tokenizer_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "tokenizers", SimpleNamespace(Tokenizer=PairTokenizer))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}')
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2) and tok.decode(tok.encode(" hello")) == " hello"
    assert tok.decode(tok.encode_many(["hello"])[0]) == "hello"
    for task in TASKS:
        sample = TASKS[task](random.Random(0), tok, 2000)
        assert sample.prompt_ids.numel() == 2000 and sample.prompt_ids[0] == 1
    sample = passkey.make_sample(Key("passkey", 1001, 0.5, 0), tok)
    assert sample.prompt_ids.numel() == 1001 and sample.references[0] in tok.decode(sample.prompt_ids.tolist())
    passkey.main(["--checkpoint", "oracle", "--tokenizer", str(tmp_path / "tok"), "--lengths", "1k,2k",
                  "--depths", "0,1", "--samples", "1", "--out", str(tmp_path / "out")])
    assert set(summary_of(tmp_path / "out").values()) == {100.0}
    with pytest.raises(SystemExit, match="has 65795 ids but the model"):
        passkey.main(["--checkpoint", "builtin:tiny-random", "--tokenizer", str(tmp_path / "tok"), "--lengths", "1k",
                      "--out", str(tmp_path / "out2")])


def test_hf_tokenizer_needs_a_library(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="needs the `transformers` or `tokenizers` package"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(SystemExit, match="needs the `transformers` or `tokenizers` package"):
        passkey.main(["--checkpoint", "oracle", "--tokenizer", str(tmp_path), "--out", str(tmp_path / "out")])
    assert isinstance(load_tokenizer(None, str(tmp_path)), ByteTokenizer)  # no tokenizer files: bytes
