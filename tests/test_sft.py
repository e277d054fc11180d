"""Fine-tuning on long-context tasks: the example stream and recipes/sft.py end to end."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from ramba import HSAHybrid, HSAHybridConfig
from ramba.tokenizer import ByteTokenizer
from ramba.training.config import DataSection
from ramba.training.data import task_examples

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOK = ByteTokenizer()


def test_task_examples_put_the_loss_on_the_answer_only():
    data = DataSection(source="tasks", seq_len=768, min_len=200, tasks=["passkey", "vt", "qa1", "niah_multikey_1"])
    rows = list(itertools.islice(task_examples(data, TOK, seed=3), 24))
    assert rows[0]["input_ids"].equal(next(task_examples(data, TOK, seed=3))["input_ids"])  # deterministic
    lengths = set()
    for row in rows:
        labeled = (row["labels"] != -100).nonzero()[:, 0]
        start, end = int(labeled[0]), int(labeled[-1]) + 1
        assert labeled.tolist() == list(range(start, end))  # one contiguous answer span
        assert row["input_ids"][end - 1] == TOK.eos_id and row["answer_mask"].sum() == end - start - 1
        assert bool((row["input_ids"][end:] == TOK.pad_id).all())
        assert 200 <= start < 768
        lengths.add(start)
    assert len(lengths) > 12  # prompt lengths are mixed


def test_task_examples_reject_unknown_tasks():
    with pytest.raises(ValueError, match="known tasks"):
        next(task_examples(DataSection(source="tasks", tasks=["passkey", "sudoku"]), TOK, seed=0))


def test_sft_recipe_fine_tunes_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = HSAHybrid(HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=128))
    base.save_pretrained(tmp_path / "base")
    spec = importlib.util.spec_from_file_location("sft", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    final = sft.main([f"model.checkpoint={tmp_path / 'base'}", "train.steps=3", "train.batch_size=2",
                      "data.seq_len=384", "data.min_len=200", "data.tasks=[passkey, vt]", "data.eval_sequences=2",
                      f"train.output_dir={tmp_path / 'run'}"])
    tuned = HSAHybrid.from_pretrained(final)
    assert tuned.config == base.config
    assert not torch.equal(tuned.embed.weight, base.embed.weight)
