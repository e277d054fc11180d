"""benchmarks.learnability: its batches, its scoring, and a short run end to end."""

import random
import re

import pytest
import torch

from benchmarks.learnability import ANSWER_ROOM, answer_scores, main, task_batch
from ramba.data.tasks.passkey import NEEDLE
from ramba import HSAHybrid
from ramba.tokenizer import ByteTokenizer


@pytest.mark.parametrize("max_depth", [0.0, 0.3, 1.0])
def test_batches_label_only_the_key_and_keep_the_needle_shallow(max_depth):
    tok = ByteTokenizer()
    ids, labels, _ = task_batch(random.Random(3), tok, 6, 200, 300, max_depth)
    assert ids.shape == labels.shape == (6, 300 + ANSWER_ROOM)
    for row_ids, row_labels in zip(ids, labels):
        answer = row_labels[row_labels != -100].tolist()
        assert answer[-1] == tok.eos_id
        answer = tok.decode(answer[:-1])
        assert re.fullmatch(r" \d{5,7}", answer)
        start = int((row_labels != -100).nonzero()[0])
        assert 200 <= start <= 300
        prompt = tok.decode(row_ids[:start].tolist())
        needle = NEEDLE.format(key=answer.strip())
        assert needle in prompt
        assert prompt.index(needle) <= max_depth * start + len(needle) + 64  # depth is a fraction of the haystack


def test_answer_scores_on_a_hand_made_case():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, 7, 8, -100]])
    logits = torch.full((2, 4, 10), -1.0)
    # position t predicts labels[t + 1]: row 0 gets 5 and 6 right, row 1 gets 7 right and 8 wrong
    logits[0, 0, 5] = logits[0, 1, 6] = 1.0
    logits[1, 0, 7] = logits[1, 1, 2] = 1.0
    tokens, keys = answer_scores(logits, labels)
    assert tokens == pytest.approx(3 / 4)
    assert keys == pytest.approx(1 / 2)


def test_short_run_writes_its_table(tmp_path):
    out = tmp_path / "table.md"
    main(["--length", "160", "--min-length", "128", "--steps", "3", "--batch-size", "2", "--eval-every", "2",
          "--eval-batches", "1", "--set", "window=32", "--out", str(out), "--device", "cpu", "--save", str(tmp_path / "model")])
    lines = out.read_text().splitlines()
    assert lines[0].startswith("`python -m benchmarks.learnability --length 160")
    steps = [int(line.split("|")[1]) for line in lines[4:]]
    assert steps == [2, 3]
    for line in lines[4:]:
        loss, held_out, tokens, keys = (float(x) for x in line.split("|")[2:6])
        assert loss > 0 and held_out > 0 and 0 <= keys <= tokens <= 1
    saved = HSAHybrid.from_pretrained(tmp_path / "model")
    assert saved.config.window == 32


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="windw"):
        main(["--set", "windw=32", "--steps", "1"])
    with pytest.raises(SystemExit, match="min-length"):
        main(["--length", "64", "--min-length", "128", "--steps", "1"])
    with pytest.raises(SystemExit, match="too short.*raise --min-length"):
        main(["--length", "64", "--min-length", "32", "--steps", "1"])
    with pytest.raises(SystemExit, match="niah_multikey_1"):
        main(["--task", "niah_multikey", "--steps", "1"])
    with pytest.raises(SystemExit, match="does not fit"):
        main(["--task", "cwe", "--length", "2048", "--min-length", "1024", "--steps", "1"])


def test_multikey_batches_ask_one_of_several_keys():
    tok = ByteTokenizer()
    ids, labels, _ = task_batch(random.Random(5), tok, 4, 500, 600, 1.0, task="niah_multikey_1")
    for row_ids, row_labels in zip(ids, labels):
        answer = tok.decode(row_labels[row_labels != -100].tolist()[:-1]).strip()
        start = int((row_labels != -100).nonzero()[0])
        prompt = tok.decode(row_ids[:start].tolist())
        numbers = re.findall(r"\d{7}", prompt)
        assert answer in numbers and len(set(numbers)) >= 2  # the asked value among the others


def test_init_starts_from_the_saved_weights_with_the_config_changed(tmp_path):
    first = HSAHybrid.from_pretrained(_train(tmp_path / "first", ["--set", "window=32"]))
    again = HSAHybrid.from_pretrained(_train(tmp_path / "again", ["--init", str(tmp_path / "first"), "--set",
                                                                   "window=16", "--lr", "0"]))
    assert (first.config.window, again.config.window) == (32, 16)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # lr 0: the step left every weight as loaded


def test_init_that_does_not_fit_is_named(tmp_path):
    _train(tmp_path / "first", [])
    with pytest.raises(SystemExit, match="does not fit"):
        _train(tmp_path / "again", ["--init", str(tmp_path / "first"), "--set", "d_model=96"])
    with pytest.raises(SystemExit, match="config.json not found"):
        _train(tmp_path / "again", ["--init", str(tmp_path / "missing")])


def _train(folder, extra):
    main(["--length", "160", "--min-length", "128", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
          "--eval-batches", "1", "--device", "cpu", "--save", str(folder), *extra])
    return folder


def test_min_lr_ratio_out_of_range_is_named():
    with pytest.raises(SystemExit, match="min-lr-ratio"):
        main(["--min-lr-ratio", "1.5", "--steps", "1"])
