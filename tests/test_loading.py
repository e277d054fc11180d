"""ramba.load_model: checkpoint specs -> models on a device in a dtype, and clear errors."""

import pytest
import torch

from ramba import HSAHybrid, HSAHybridConfig, load_model
from ramba.loading import resolve_dtype
from test_model import small_config


def test_a_saved_directory_loads_with_its_weights_in_the_asked_dtype(tmp_path):
    torch.manual_seed(1)
    model = HSAHybrid(small_config())
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", "cpu", "bfloat16")
    assert not loaded.training and loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.bfloat16(), b), name
    assert load_model(str(tmp_path / "m")).embed.weight.dtype == torch.float32  # auto on the CPU


def test_the_builtin_model_is_the_tiny_preset_with_seed_0():
    torch.manual_seed(0)
    fresh = HSAHybrid(HSAHybridConfig.preset("tiny"))
    torch.manual_seed(123)
    loaded = load_model("builtin:tiny-random")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loaded.state_dict().values()))


def test_auto_dtype_follows_the_device():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


def test_bad_specs_say_what_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not load a model from .*empty.*save_pretrained"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:huge'; known: builtin:tiny-random"):
        load_model("builtin:huge")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_model("builtin:tiny-random", "cuda")
