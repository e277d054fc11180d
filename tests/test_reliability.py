"""Bad input gets a clear error that names the thing; saved models come back as they were saved (issue 20).

Config fields are validated by name (type and range, every field), config.json problems name the file, a model
keeps its saved dtype, damaged or truncated weight files are refused naming the file (and the tensor), the loss
of a batch without any label is 0 (with a warning), and bad arguments of forward, generate and the ops name the
argument.
"""

import dataclasses
import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import ConfigError, HSAHybrid, HSAHybridConfig
from ramba.config import CHOICES
from ramba.ops import hsa_aggregate, hsa_retrieve
from ramba.ops.backends import pick

NAN, INF = float("nan"), float("inf")
# bad values for each kind of field; every field of HSAHybridConfig must be listed in FIELD_KINDS
BAD = {
    "bool": ["false", "no", "true", 0, 1, 1.0, None, [True]],
    "positive_int": [0, -1, 2.5, "64", None, True, NAN, [64]],
    "non_negative_int": [-1, 2.5, "2", None, True, NAN, [2]],
    "positive_float": [0, 0.0, -1, -1e-5, NAN, INF, -INF, "1e4", None, True, [1.0]],
    "non_negative_float": [-1, -0.01, NAN, INF, "0.02", None, True, [0.0]],
    "choice": [None, 3, "bogus", ["cls"], True],
    "mixer": [None, 3, "lstm", {"swa": 1}, ["swa", None, "swa", "swa"], ["swa"]],
}
FIELD_KINDS = {
    **dict.fromkeys(["vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "window", "d_state",
                     "d_conv", "expand", "mamba_head_dim", "n_groups", "mamba_chunk_size", "chunk_size",
                     "retrieval_dim", "hsa_every", "topk"], "positive_int"),
    **dict.fromkeys(["n_lower_layers", "encoder_layers", "mamba_horizon", "mamba_reset",
                     "mamba_reset_upper"], "non_negative_int"),
    **dict.fromkeys(["plain_block_mlp", "use_hsa", "retrieve_beyond_window", "softmax_off_by_one",
                     "tie_embeddings", "mamba_reset_stagger"], "bool"),
    **dict.fromkeys(["rope_theta", "norm_eps"], "positive_float"),
    **dict.fromkeys(["gumbel_noise", "initializer_range"], "non_negative_float"),
    **dict.fromkeys(["retrieval_heads", "landmark", "retrieval_weights", "hsa_residual", "swa_backend",
                     "mamba_backend", "ops_backend"], "choice"),
    "local_mixer": "mixer",
    # 0 is a non-negative int, but the model needs one upper block (HSA) and an MLP width
    "n_upper_layers": "positive_int", "intermediate_size": "positive_int",
}
CASES = [(name, bad) for name, kind in FIELD_KINDS.items() for bad in BAD[kind]]


def small_config(**overrides) -> HSAHybridConfig:
    return HSAHybridConfig(**{**dict(vocab_size=64, d_model=32, n_lower_layers=1, n_upper_layers=1, hsa_every=1,
                                     num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64, window=32,
                                     d_state=16, mamba_head_dim=16, chunk_size=16, topk=2, retrieval_dim=16),
                              **overrides})


def test_every_field_has_bad_values():
    assert set(FIELD_KINDS) == {f.name for f in dataclasses.fields(HSAHybridConfig)}


def _not_in(allowed):
    return st.text(max_size=8).filter(lambda t: t not in allowed)


_NOT_NUMBERS = [st.text(max_size=8), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)]
STRATEGIES = {
    "bool": st.one_of(st.text(max_size=8), st.integers(), st.floats(), st.none(), st.lists(st.booleans(), max_size=2)),
    "positive_int": st.one_of(st.integers(max_value=0), st.floats(), *_NOT_NUMBERS),
    "non_negative_int": st.one_of(st.integers(max_value=-1), st.floats(), *_NOT_NUMBERS),
    "positive_float": st.one_of(st.floats(max_value=0.0), st.sampled_from([NAN, INF]), *_NOT_NUMBERS),
    "non_negative_float": st.one_of(st.floats(max_value=0.0, exclude_max=True), st.sampled_from([NAN, INF]),
                                    *_NOT_NUMBERS),
    **{f"choice:{name}": st.one_of(_not_in(allowed), st.integers(), st.none(), st.booleans())
       for name, allowed in CHOICES.items()},
    "mixer": st.one_of(_not_in(("swa", "mamba2")), st.integers(), st.none(), st.booleans(),
                       st.lists(st.sampled_from(["swa", "mamba2", None, 1]), max_size=6)
                       .filter(lambda m: len(m) != 4 or not all(x in ("swa", "mamba2") for x in m))),
}


def _assert_names_field(name, bad):
    with pytest.raises(ConfigError) as err:
        HSAHybridConfig(**{name: bad})
    assert err.value.field == name and f"HSAHybridConfig.{name}" in str(err.value)


@pytest.mark.parametrize("name,bad", CASES)
def test_listed_bad_field_values_name_the_field(name, bad):
    _assert_names_field(name, bad)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_bad_field_value_names_the_field(data):
    name = data.draw(st.sampled_from(sorted(FIELD_KINDS)))
    kind = FIELD_KINDS[name]
    bad = data.draw(STRATEGIES[f"choice:{name}" if kind == "choice" else kind])
    _assert_names_field(name, bad)


@pytest.mark.parametrize("name,value", [("rope_theta", 10000), ("norm_eps", 1e-6), ("initializer_range", 0),
                                        ("gumbel_noise", 1), ("local_mixer", ("swa", "mamba2", "swa", "swa")),
                                        ("use_hsa", False), ("tie_embeddings", False)])
def test_good_values_of_every_kind_still_pass(name, value):
    assert getattr(HSAHybridConfig(**{name: value}), name) == value


@pytest.mark.parametrize("name,bad", [("tie_embeddings", "false"), ("use_hsa", "no"), ("norm_eps", -1),
                                      ("rope_theta", 0), ("rope_theta", NAN), ("rope_theta", "1e4")])
def test_the_reported_configs_are_refused(name, bad):
    with pytest.raises(ConfigError, match=name):
        small_config(**{name: bad})


@pytest.mark.parametrize("text,words", [
    ('{"rope_theta": NaN}', "rope_theta"),
    ('{"norm_eps": Infinity}', "norm_eps"),
    ('[1, 2]', "JSON object"),
    ('{"d_model": 64,', "not valid JSON"),
    ('{"use_hsa": "no"}', "use_hsa"),
])
def test_bad_config_json_names_the_file(tmp_path, text, words):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as err:
        HSAHybridConfig.from_json(path)
    assert str(path) in str(err.value)


def test_bad_config_json_in_a_saved_model_names_the_file(tmp_path):
    HSAHybrid(small_config()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "rope_theta": NAN}))
    with pytest.raises(ConfigError, match="rope_theta") as err:
        HSAHybrid.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


# ---------------------------------------------------------------------------------------------------- save/load
def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_saved_dtype_comes_back(tmp_path, dtype):
    torch.manual_seed(0)
    model = HSAHybrid(small_config()).to(dtype).eval()
    model.save_pretrained(tmp_path)
    loaded = HSAHybrid.from_pretrained(tmp_path).eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)
    asked = HSAHybrid.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in asked.parameters()} == {torch.float32}
    with pytest.raises(TypeError, match="dtype"):
        HSAHybrid.from_pretrained(tmp_path, dtype="bf16")


def test_mixed_saved_dtypes_come_back(tmp_path):
    model = HSAHybrid(small_config(tie_embeddings=False)).to(torch.bfloat16)
    model.norm.float()
    model.save_pretrained(tmp_path)
    loaded = HSAHybrid.from_pretrained(tmp_path)
    assert loaded.norm.weight.dtype == torch.float32 and loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def _header(path) -> tuple[int, dict]:
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return 8 + size, json.loads(data[8:8 + size])


@pytest.mark.parametrize("value", [NAN, INF])
def test_weights_with_nan_are_refused_naming_file_and_tensor(tmp_path, value):
    HSAHybrid(small_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    start, header = _header(path)
    name = "norm.weight"
    begin, _ = header[name]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + begin:start + begin + 4] = struct.pack("<f", value)  # a float32 file: one damaged weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="NaN or inf") as err:
        HSAHybrid.from_pretrained(tmp_path)
    assert str(path) in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("cut", ["half", "last byte", "inside the header", "inside the length", "empty"])
def test_truncated_weight_file_names_the_file(tmp_path, cut):
    HSAHybrid(small_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    keep = {"half": len(data) // 2, "last byte": len(data) - 1, "inside the header": 20, "inside the length": 4,
            "empty": 0}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="damaged or truncated") as err:
        HSAHybrid.from_pretrained(tmp_path)
    assert str(path) in str(err.value)


def test_save_pretrained_onto_a_file_says_so(tmp_path):
    model = HSAHybrid(small_config())
    target = tmp_path / "model.bin"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="model.bin"):
        model.save_pretrained(target)
    with pytest.raises(NotADirectoryError, match="model.bin"):
        model.save_pretrained(target / "inside")
    assert target.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------------------------- loss
def test_loss_is_zero_with_a_warning_when_every_label_is_ignored():
    torch.manual_seed(0)
    model = HSAHybrid(small_config())
    ids = _ids()
    with pytest.warns(RuntimeWarning, match="every label is ignored"):
        out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # padding that covers every target counts as ignored too
    with pytest.warns(RuntimeWarning):
        mask = torch.zeros_like(ids)
        mask[:, 0] = 1
        assert model(ids, labels=ids, attention_mask=mask).loss.item() == 0.0
    # one label left: the usual mean cross entropy, against an independent computation
    labels = torch.full_like(ids, -100)
    labels[0, 7] = 5
    out = model(ids, labels=labels)
    want = -torch.log_softmax(out.logits[0, 6].float(), -1)[5]
    assert torch.allclose(out.loss, want, atol=1e-6)


# --------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("value", [2.5, True, "2"])
def test_logits_to_keep_must_be_an_int(value):
    with pytest.raises(TypeError, match="logits_to_keep"):
        HSAHybrid(small_config())(_ids(), logits_to_keep=value)


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=NAN, do_sample=True), ValueError, "temperature"),
    (dict(max_new_tokens=2, temperature=NAN), ValueError, "temperature"),
    (dict(max_new_tokens=2, temperature="hot", do_sample=True), ValueError, "temperature"),
    (dict(max_new_tokens=2, top_p=NAN, do_sample=True), ValueError, "top_p"),
    (dict(max_new_tokens=2, segment_size=8.0), TypeError, "segment_size"),
])
def test_generate_arguments_named(kwargs, error, word):
    with pytest.raises(error, match=word):
        HSAHybrid(small_config()).generate(_ids(), **kwargs)


def test_bogus_backend_names_it():
    with pytest.raises(ValueError, match="bogus") as err:
        pick("ops", "bogus", torch.device("cpu"))
    assert "triton" in str(err.value)
    q, k, v = torch.randn(1, 4, 2, 32), torch.randn(1, 32, 1, 32), torch.randn(1, 32, 1, 32)
    indices, weights = torch.zeros(1, 4, 1, 1, dtype=torch.long), torch.ones(1, 4, 1, 1)
    with pytest.raises(ValueError, match="bogus"):
        hsa_aggregate(q, k, v, indices, weights, 32, backend="bogus")
    with pytest.raises(ValueError, match="bogus"):
        hsa_retrieve(torch.randn(1, 4, 1, 8), torch.randn(1, 1, 1, 8), 1, 16, backend="bogus")
    with pytest.raises(ValueError, match="bogus"):
        pick("swa", "bogus", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_small_integer_indices_work(dtype, backend):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 32, generator=g)
    k, v = torch.randn(1, 64, 1, 32, generator=g), torch.randn(1, 64, 1, 32, generator=g)
    indices = torch.tensor([[1, 0], [0, -1], [-1, -1], [1, -1], [0, 1]]).view(1, 5, 1, 2)
    weights = torch.rand(1, 5, 1, 2, generator=g)
    want = hsa_aggregate(q, k, v, indices, weights, 32, backend=backend)
    assert torch.equal(hsa_aggregate(q, k, v, indices.to(dtype), weights, 32, backend=backend), want)
    qr, landmarks = torch.randn(1, 40, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    positions = torch.arange(40).view(1, 40)
    want = hsa_retrieve(qr, landmarks, 2, 16, positions, backend=backend)
    got = hsa_retrieve(qr, landmarks, 2, 16, positions.to(dtype), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32])
def test_unsigned_or_float_indices_are_a_clear_type_error(dtype):
    q, k, v = torch.randn(1, 2, 2, 32), torch.randn(1, 32, 1, 32), torch.randn(1, 32, 1, 32)
    with pytest.raises(TypeError, match=f"indices .*{str(dtype).split('.')[-1]}"):
        hsa_aggregate(q, k, v, torch.zeros(1, 2, 1, 1, dtype=dtype), torch.ones(1, 2, 1, 1), 32)


@pytest.mark.parametrize("overrides,field", [(dict(local_mixer=None), "local_mixer"),
                                             (dict(initializer_range=-0.02), "initializer_range")])
def test_reported_model_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        HSAHybrid(small_config(**overrides))


def test_config_error_message_says_what_to_give():
    with pytest.raises(ConfigError) as err:
        HSAHybridConfig(tie_embeddings="false")
    assert "bool" in str(err.value) and "'false'" in str(err.value)
    with pytest.raises(ConfigError, match="finite number > 0"):
        HSAHybridConfig(rope_theta=math.nan)


# ------------------------------------------------------------------------------------------ fault injection
MODEL_SAVER = """
import sys
import torch
from ramba import HSAHybrid, HSAHybridConfig
config = HSAHybridConfig.preset("tiny", vocab_size=32768, tie_embeddings=False)  # 2 x 32 MB of embeddings
model = HSAHybrid(config)
for version in range(1, 10**6):
    with torch.no_grad():
        model.lm_head.weight.fill_(version)
    model.save_pretrained(sys.argv[1])
    print(version, flush=True)
"""


def test_save_pretrained_killed_at_random_moments_leaves_a_whole_model(tmp_path):
    """Fault injection: a process saving a model into one folder in a loop is SIGKILLed at random moments;
    the folder always loads, with the weights of the last version reported or of the one being written."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.monotonic()
    for _ in range(4):
        saver = subprocess.Popen([sys.executable, "-c", MODEL_SAVER, str(tmp_path)], stdout=subprocess.PIPE,
                                 text=True, env=env)
        first = saver.stdout.readline()  # imports done, one model written
        assert first, "the saver died before its first save"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(saver.pid, signal.SIGKILL)
        rest, _ = saver.communicate()
        last = int((first + rest).split()[-1])  # each saver counts its versions from 1
        version = float(HSAHybrid.from_pretrained(tmp_path).lm_head.weight[0, 0])
        assert version in (last, last + 1)
        if time.monotonic() - start > 15:
            break


def test_save_pretrained_that_fails_midway_keeps_the_previous_model(tmp_path, monkeypatch):
    """A save that dies while writing the weights (simulated: half a file, then an error) leaves the folder's
    previous model whole, not a truncated file under the real name."""
    import ramba.model

    model = HSAHybrid(small_config())
    model.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def dies_midway(module, filename):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(ramba.model.safetensors.torch, "save_model", dies_midway)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    loaded = HSAHybrid.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], before[k]) for k in before)
