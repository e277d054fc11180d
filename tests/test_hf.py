"""The Hugging Face integration: a ramba folder is a transformers model, checked against HSAHybrid itself."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer,  # noqa: E402
                          StoppingCriteria, StoppingCriteriaList, pipeline)

from transformers.generation.streamers import BaseStreamer  # noqa: E402

import ramba  # noqa: E402,F401  (registers model type "ramba")
from ramba import HSAHybrid, HSAHybridConfig  # noqa: E402
from ramba.config import ConfigError  # noqa: E402
from ramba.integrations import hf  # noqa: E402
from ramba.integrations.hf import modeling  # noqa: E402
from ramba.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "swa-passkey"
MIXERS = ["swa", "mamba2"]


def tiny(mixer: str, seed: int = 0, **overrides) -> HSAHybrid:
    torch.manual_seed(seed)
    config = HSAHybridConfig.preset("tiny", local_mixer=mixer, chunk_size=16, window=32, d_model=64, head_dim=16,
                                    intermediate_size=128, retrieval_dim=16, d_state=16, mamba_head_dim=16,
                                    mamba_chunk_size=16, initializer_range=0.1, **overrides)
    return HSAHybrid(config).eval()


def random_ids(seed: int, shape: tuple[int, int], high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("tie", [True, False])
def test_auto_model_round_trip(tmp_path, mixer, tie):
    model = tiny(mixer, tie_embeddings=tie)
    model.save_pretrained(tmp_path / "ramba")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "ramba"), hf.RambaConfig)
    wrapped = AutoModelForCausalLM.from_pretrained(tmp_path / "ramba").eval()
    assert isinstance(wrapped, hf.RambaForCausalLM)
    ids = random_ids(1, (2, 100))
    with torch.no_grad():
        assert torch.equal(wrapped(ids).logits, model(ids).logits)
    wrapped.save_pretrained(tmp_path / "hf")  # transformers' writer: the same weight names, its own config keys
    back = HSAHybrid.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.config == model.config


def test_shipped_model_and_its_tokenizer():
    model = HSAHybrid.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    wrapped = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    ids = random_ids(2, (1, 300))
    with torch.no_grad():
        assert torch.allclose(wrapped(ids).logits, model(ids).logits, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    assert isinstance(tok, hf.RambaByteTokenizer)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (258, 256, 257)
    assert isinstance(load_tokenizer(None, SHIPPED), ByteTokenizer)  # ramba's own loader, without transformers


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=40))
def test_byte_tokenizer_equals_ramba_byte_tokenizer(text):
    tok, ours = hf.RambaByteTokenizer(), ByteTokenizer()
    ids = tok(text)["input_ids"]
    assert ids == ours.encode(text)  # no specials added, and a literal "<eos>" stays bytes
    assert tok.decode(ids) == ours.decode(ids)
    assert tok.decode([*ids, ours.eos_id], skip_special_tokens=True) == ours.decode(ids)


def left_padded(prompts: list[torch.Tensor], pad: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([(torch.arange(width) >= width - len(p)).long() for p in prompts])
    return ids, mask


@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_generate_equals_ramba_generate(mixer, monkeypatch):
    """Left-padded prompts longer than the prefill segment (set to 48 tokens here), token for token."""
    monkeypatch.setattr(modeling, "SEGMENT", 48)
    model = tiny(mixer)
    wrapped = hf.RambaForCausalLM.from_hybrid(model).eval()
    ids, mask = left_padded([random_ids(3, (1, 130))[0], random_ids(4, (1, 71))[0]])
    ours = model.generate(ids, max_new_tokens=12, attention_mask=mask, segment_size=48)
    theirs = wrapped.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=256,
                              output_logits=True, return_dict_in_generate=True)
    assert torch.equal(theirs.sequences, ours)
    assert len(set(ours[:, ids.shape[1]:].reshape(-1).tolist())) > 2  # not one token repeated
    logits = torch.stack(theirs.logits, dim=1)  # [B, 12, vocab], from the cache
    with torch.no_grad():
        for row in range(2):  # the whole unpadded row at once, without a cache
            tokens = ours[row][mask[row].bool().tolist() + [True] * 12]
            assert torch.allclose(logits[row], model(tokens[None]).logits[0, -13:-1], atol=1e-4)


@pytest.mark.parametrize("mixer", MIXERS)
def test_beam_search_and_sampling_on_the_cache_equal_the_uncached_model(mixer):
    """Beam search reorders the cache (HSACache.select_rows); without a cache every step recomputes it all."""
    wrapped = hf.RambaForCausalLM.from_hybrid(tiny(mixer)).eval()
    ids, mask = left_padded([random_ids(5, (1, 60))[0], random_ids(6, (1, 41))[0]])
    common = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=256)
    beams = [wrapped.generate(ids, num_beams=3, num_return_sequences=2, use_cache=c, **common) for c in (True, False)]
    assert torch.equal(beams[0], beams[1])
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        samples.append(wrapped.generate(ids, do_sample=True, top_p=0.9, temperature=1.5, use_cache=use_cache,
                                        **common))
    assert torch.equal(samples[0], samples[1])


class Collect(BaseStreamer):
    def __init__(self):
        self.pieces = []

    def put(self, value):
        self.pieces.append(value.reshape(-1).tolist())

    def end(self):
        self.pieces.append("end")


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamer_stopping_criteria_eos_and_pipeline():
    model = HSAHybrid.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    wrapped = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    prompt = "The pass key is 48213. Remember it. " + "The sky is blue. " * 12 + "What is the pass key? The pass key is"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    ours = model.generate(ids, max_new_tokens=10, stop_tokens=[258])
    streamer = Collect()
    theirs = wrapped.generate(ids, max_new_tokens=10, streamer=streamer)  # eos from the folder's config
    assert torch.equal(theirs, ours) and theirs[0, -1] == 258  # it stopped at its eos
    assert streamer.pieces[0] == ids[0].tolist() and streamer.pieces[-1] == "end"
    assert sum(streamer.pieces[1:-1], []) == theirs[0, ids.shape[1]:].tolist()
    short = wrapped.generate(ids, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAfter(ids.shape[1] + 3)]))
    assert torch.equal(short, ours[:, :ids.shape[1] + 3])
    text = pipeline("text-generation", model=wrapped, tokenizer=tok)(prompt, max_new_tokens=10, do_sample=False)
    assert text[0]["generated_text"] == prompt + tok.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)


def test_lora_adapter_trains_saves_and_loads(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny("mamba2", seed=3)
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "in_proj", "out_proj"],
                                                init_lora_weights=True))
    ids = random_ids(8, (2, 80))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(after, before)  # the adapter changed the model
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, after, atol=1e-6)


def test_bad_input_is_named(tmp_path, monkeypatch):
    config = {"model_type": "gpt2", "n_layer": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gpt2' model's config, not a ramba"):
        hf.RambaConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model_type"):
        HSAHybridConfig.from_json(tmp_path / "config.json")
    wrapped = hf.RambaForCausalLM.from_hybrid(tiny("swa"))
    ids = random_ids(9, (1, 20))
    for name, value in (("assistant_model", wrapped), ("prompt_lookup_num_tokens", 3),
                        ("cache_implementation", "static"), ("output_attentions", True)):
        with pytest.raises(ValueError, match=f"{name}.*not supported"):
            wrapped.generate(ids, max_new_tokens=2, **{name: value})
    with pytest.raises(TypeError, match="token_type_ids"):
        wrapped(ids, token_type_ids=ids)
    with pytest.raises(ValueError, match="invalid|must be a positive"):
        hf.RambaConfig(window=0)
    monkeypatch.setattr(hf, "version", lambda name: "4.57.0")
    with pytest.raises(ImportError, match=r"transformers>=5\.25\.0.*found 4\.57\.0"):
        hf._check_transformers()


def test_training_mode_and_activation_checkpointing_reach_the_hybrid():
    wrapped = hf.RambaForCausalLM.from_hybrid(tiny("mamba2", seed=4)).train()
    ids = random_ids(10, (2, 50))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    plain = wrapped.embed.weight.grad.clone()
    wrapped.zero_grad()
    wrapped.activation_checkpointing_enable()
    assert wrapped.hybrid.gradient_checkpointing and wrapped.hybrid.training
    wrapped(input_ids=ids, labels=ids).loss.backward()
    assert torch.allclose(wrapped.embed.weight.grad, plain, atol=1e-6)
    wrapped.activation_checkpointing_disable()
    assert not wrapped.hybrid.gradient_checkpointing
    assert not wrapped.eval().hybrid.training
