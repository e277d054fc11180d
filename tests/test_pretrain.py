"""recipes/pretrain.py end to end on the CPU: a few steps lower the held-out loss and leave a loadable model."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.synthetic import make_batch
from ramba.tokenizer import ByteTokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("pretrain", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_lowers_the_loss_and_saves(tmp_path):
    recipe = load_recipe()
    final = recipe.main(["--steps", "12", "--batch-size", "2", "--seq-len", "256", "--warmup", "2", "--lr", "3e-3",
                         "--eval-size", "2", "--output-dir", str(tmp_path)])
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    trained = HSAHybrid.from_pretrained(final)
    torch.manual_seed(0)  # the recipe's seed: the same initial weights
    untrained = HSAHybrid(HSAHybridConfig.preset("tiny"))
    batch = make_batch(12345, 4, 256, ByteTokenizer())
    before, _ = recipe.evaluate(untrained, batch)
    after, _ = recipe.evaluate(trained, batch)
    assert after < before - 1.0


def test_pretrain_rejects_bad_arguments(capsys):
    recipe = load_recipe()
    with pytest.raises(SystemExit):
        recipe.main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset"):
        recipe.main(["--preset", "nope"])
