"""HSAHybridConfig: presets, JSON round trip, validation that names the field."""

import json

import pytest
import torch

from ramba import ConfigError, HSAHybrid, HSAHybridConfig


@pytest.mark.parametrize("name", ["tiny", "small", "ramba-370m"])
def test_preset_json_round_trip(name, tmp_path):
    config = HSAHybridConfig.preset(name)
    config.to_json(tmp_path / "config.json")
    assert HSAHybridConfig.from_json(tmp_path / "config.json") == config
    assert HSAHybridConfig.from_json(config.to_json()) == config


def test_preset_sizes():
    def params(name: str) -> float:
        with torch.device("meta"):
            return HSAHybrid(HSAHybridConfig.preset(name)).num_parameters() / 1e6

    assert 2 < params("tiny") < 10
    assert 80 < params("small") < 130
    assert 330 < params("ramba-370m") < 420
    ramba = HSAHybridConfig.preset("ramba-370m")
    assert (ramba.n_lower_layers, ramba.n_upper_layers, ramba.hsa_every, ramba.d_model) == (24, 24, 8, 1024)
    assert (ramba.num_heads, ramba.num_kv_heads, ramba.head_dim, ramba.chunk_size, ramba.topk) == (16, 1, 64, 64, 8)
    assert ramba.mixers == ["mamba2"] * 48 and ramba.encoder_layers == 1


def test_preset_overrides_and_per_layer_mixers():
    config = HSAHybridConfig.preset("tiny", local_mixer=["mamba2", "swa", "swa", "mamba2"], topk=4)
    assert config.mixers == ["mamba2", "swa", "swa", "mamba2"] and config.topk == 4
    assert [config.is_hsa_layer(i) for i in range(4)] == [False, False, True, False]
    with pytest.raises(ValueError, match="unknown preset"):
        HSAHybridConfig.preset("huge")


@pytest.mark.parametrize("overrides,field,words", [
    (dict(chunk_size=24), "chunk_size", "multiple of 16"),
    (dict(topk=0), "topk", "at least 1"),
    (dict(num_heads=3, num_kv_heads=2), "num_kv_heads", "multiple"),
    (dict(local_mixer="lstm"), "local_mixer", "one of"),
    (dict(local_mixer=["swa", "swa"]), "local_mixer", "entries"),
    (dict(landmark="cls", encoder_layers=0), "landmark", "encoder_layers"),
    (dict(local_mixer="mamba2", retrieve_beyond_window=True), "retrieve_beyond_window", "swa"),
    (dict(retrieval_weights="sparsemax"), "retrieval_weights", "one of"),
    (dict(d_model=0), "d_model", "positive"),
    (dict(n_upper_layers=0), "n_upper_layers", "at least 1"),
    (dict(gumbel_noise=-1.0), "gumbel_noise", "non-negative"),
    (dict(head_dim=33), "head_dim", "even"),
    (dict(window=32, retrieve_beyond_window=True), "retrieve_beyond_window", "window"),
])
def test_invalid_configs_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError, match=words) as err:
        HSAHybridConfig.preset("tiny", **overrides)
    assert err.value.field == field and field in str(err.value)


def test_unknown_field_is_rejected(tmp_path):
    data = HSAHybridConfig().to_dict() | {"chunksize": 64}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="chunksize"):
        HSAHybridConfig.from_json(tmp_path / "config.json")
