"""The whole model: causality, chunk visibility, packed documents, padding, variants, save/load, bad input."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import HSAHybrid, HSAHybridConfig
from ramba.config import ConfigError
from ramba.documents import build_layout
from ramba.layers.blocks import HSABlock
from ramba.layers.hsa import retrieval_weights

S = 16


def small_config(**overrides) -> HSAHybridConfig:
    """A model small enough for many examples per test, with large weights so that any leak shows."""
    base = dict(vocab_size=50, d_model=32, n_lower_layers=1, n_upper_layers=2, hsa_every=1, num_heads=2,
                num_kv_heads=1, head_dim=16, intermediate_size=48, window=24, d_state=8, mamba_head_dim=16,
                mamba_chunk_size=16, chunk_size=S, topk=2, retrieval_dim=8, initializer_range=0.3)
    return HSAHybridConfig(**{**base, **overrides})


MODELS: dict[str, HSAHybrid] = {}


def model_for(mixer: str) -> HSAHybrid:
    if mixer not in MODELS:
        torch.manual_seed(0)
        MODELS[mixer] = HSAHybrid(small_config(local_mixer=mixer)).double().eval()
    return MODELS[mixer]


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
@settings(max_examples=15, deadline=None)
@given(length=st.integers(2, 90), cut=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_causal(mixer, length, cut, seed):
    model = model_for(mixer)
    g = torch.Generator().manual_seed(seed)
    t = min(int(cut * length), length - 2)
    ids = torch.randint(0, 50, (1, length), generator=g)
    changed = ids.clone()
    changed[0, t + 1:] = (ids[0, t + 1:] + torch.randint(1, 50, (length - t - 1,), generator=g)) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-10)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # the later tokens do matter


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_packed_documents_equal_separate_runs(mixer, lengths, seed):
    model = model_for(mixer)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 50, (1, n), generator=g) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        separate = torch.cat([model(d).logits for d in docs], dim=1)
        by_ids = model(packed, doc_ids=doc_ids, return_retrieval=True)
        by_cu = model(packed, cu_seqlens=cu).logits
    assert torch.allclose(by_ids.logits, separate, atol=1e-10)
    assert torch.allclose(by_cu, separate, atol=1e-10)
    # retrieved chunks are complete chunks of the token's own document, strictly before it
    pos_in_doc = torch.cat([torch.arange(n) for n in lengths])[None, :, None, None]
    for indices in by_ids.retrieval:
        assert bool(((indices + 1) * S <= pos_in_doc)[indices >= 0].all())


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_padding_left_and_right(mixer):
    model = model_for(mixer)
    torch.manual_seed(3)
    a, b = torch.randint(0, 50, (1, 40)), torch.randint(0, 50, (1, 57))
    batch = torch.zeros(2, 60, dtype=torch.long)
    mask = torch.zeros(2, 60, dtype=torch.long)
    batch[0, 20:], mask[0, 20:] = a, 1  # left padding
    batch[1, :57], mask[1, :57] = b, 1  # right padding
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        assert torch.allclose(out[0, 20:], model(a).logits[0], atol=1e-10)
        assert torch.allclose(out[1, :57], model(b).logits[0], atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 100), window=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_never_a_future_or_incomplete_chunk(length, window, seed):
    torch.manual_seed(seed)
    model = HSAHybrid(small_config(retrieve_beyond_window=window, topk=4)).eval()
    ids = torch.randint(0, 50, (2, length))
    with torch.no_grad():
        out = model(ids, return_retrieval=True)
    pos = torch.arange(length)[None, :, None, None]
    limit = pos - small_config().window + S if window else pos
    for indices, weights in zip(out.retrieval, out.retrieval_weights, strict=True):
        assert indices.shape == weights.shape == (2, length, 1, 4)
        chosen = indices >= 0
        assert bool((weights[~chosen] == 0).all())  # softmax weights: 1 in all over the chosen chunks
        assert torch.allclose(weights.sum(-1), chosen.any(-1).to(weights.dtype), atol=1e-6)
        assert bool(((indices + 1) * S <= limit)[chosen].all())
        # as many chunks as are visible, up to the 4 slots
        expected = torch.div(limit, S, rounding_mode="floor").clamp(0, 4)[..., 0]
        assert torch.equal(chosen.sum(-1), expected.expand(2, length, 1))


def naive_hsa(layer, x, memory, cfg):
    """HSA of one batch row by loops over tokens and heads, from the layer's own weights; also the weight of
    each chosen chunk, {(token, retrieval head): {chunk: weight}}."""
    L = x.shape[0]
    qr = (x @ layer.qr_proj.weight.T).view(L, cfg.num_retrieval_heads, cfg.retrieval_dim)
    q = (x @ layer.q_proj.weight.T).view(L, cfg.num_heads, cfg.head_dim)
    lmk, k, v = memory.landmarks[0], memory.k[0], memory.v[0]
    G = cfg.num_heads // cfg.num_kv_heads
    out = torch.zeros(L, cfg.num_heads, cfg.head_dim, dtype=x.dtype)
    mixing = {}
    for t in range(L):
        for h in range(cfg.num_heads):
            kv = h // G
            r = kv if cfg.num_retrieval_heads > 1 else 0
            visible = [c for c in range(lmk.shape[0]) if (c + 1) * S <= t]
            s = {c: float(qr[t, r] @ lmk[c, r]) / math.sqrt(cfg.retrieval_dim) for c in visible}
            chosen = sorted(sorted(visible, key=lambda c: (-s[c], -c))[:cfg.topk], reverse=True)
            if not chosen:
                continue
            w = torch.softmax(torch.tensor([s[c] for c in chosen], dtype=x.dtype), 0)
            mixing[t, r] = {c: float(wi) for wi, c in zip(w, chosen)}
            for wi, c in zip(w, chosen):
                att = torch.softmax(k[c * S:(c + 1) * S, kv] @ q[t, h] / math.sqrt(cfg.head_dim), 0)
                out[t, h] += wi * (att @ v[c * S:(c + 1) * S, kv])
    return out.reshape(L, -1) @ layer.o_proj.weight.T, mixing


@pytest.mark.parametrize("retrieval_heads", ["per_kv_head", "shared"])
def test_hsa_layer_matches_naive_loops(retrieval_heads):
    torch.manual_seed(4)
    cfg = small_config(num_heads=4, num_kv_heads=2, retrieval_heads=retrieval_heads, topk=3)
    model = HSAHybrid(cfg).double()
    layer = model.upper[0].hsa
    x = torch.randn(1, 83, cfg.d_model, dtype=torch.float64)
    layout = build_layout((1, 83), x.device)
    memory = model.encoder(model.memory_norm(x))
    with torch.no_grad():
        out, indices, weights = layer(x, memory, layout)
    expected, mixing = naive_hsa(layer, x[0], memory, cfg)
    assert torch.allclose(out[0], expected, atol=1e-10)
    for t in range(83):
        for r in range(cfg.num_retrieval_heads):
            chosen = indices[0, t, r] >= 0
            got = dict(zip(indices[0, t, r][chosen].tolist(), weights[0, t, r][chosen].tolist()))
            assert got == pytest.approx(mixing.get((t, r), {}), abs=1e-12)
            assert bool((weights[0, t, r][~chosen] == 0).all())


def test_retrieval_weights_match_formulas():
    torch.manual_seed(5)
    scores = torch.randn(3, 6, dtype=torch.float64)
    indices = torch.tensor([[5, 3, 2, 0, -1, -1], [4, 3, 2, 1, 0, -1], [-1] * 6])
    for kind in ("softmax", "stick_breaking"):
        w = retrieval_weights(scores.masked_fill(indices < 0, float("-inf")), indices, kind)
        for row in range(3):
            n = int((indices[row] >= 0).sum())
            s = scores[row, :n]
            if kind == "softmax":
                want = torch.softmax(s, 0) if n else s
            else:
                want = torch.stack([torch.exp(s[i] - torch.nn.functional.softplus(s[:i + 1]).sum()) for i in range(n)]) \
                    if n else s
            assert torch.allclose(w[row, :n], want)
            assert bool((w[row, n:] == 0).all())


@pytest.mark.parametrize("overrides", [
    dict(landmark="mean"), dict(landmark="mean", encoder_layers=0), dict(encoder_layers=2),
    dict(retrieval_weights="stick_breaking"), dict(hsa_residual="standard"), dict(softmax_off_by_one=True),
    dict(retrieve_beyond_window=True), dict(num_heads=4, num_kv_heads=2, retrieval_heads="shared"),
    dict(local_mixer=["mamba2", "swa", "mamba2"]), dict(plain_block_mlp=False, n_upper_layers=3, hsa_every=2),
    dict(tie_embeddings=False), dict(gumbel_noise=1.0), dict(use_hsa=False),
])
def test_variants_train(overrides):
    torch.manual_seed(6)
    model = HSAHybrid(small_config(**overrides))
    ids = torch.randint(0, 50, (2, 70))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 70, 50) and torch.isfinite(out.loss)
    out.loss.backward()
    if not model.config.use_hsa:  # the mixer-only baseline has no chunk memory at all
        assert model.encoder is None and not any(isinstance(b, HSABlock) for b in model.upper)
        return
    # retrieval is learned: gradients reach the retrieval queries and the landmarks
    assert model.upper[0].hsa.qr_proj.weight.grad.abs().sum() > 0
    assert model.encoder.lmk_proj.weight.grad.abs().sum() > 0


def test_bypass_keeps_hsa_out_of_the_residual_stream():
    torch.manual_seed(7)
    for rule in ("bypass", "standard"):
        block = HSAHybrid(small_config(hsa_residual=rule)).upper[0]
        x = torch.randn(1, 40, 32)
        layout = build_layout((1, 40), x.device)
        memory = HSAHybrid(small_config()).encoder(x)
        out, _, _ = block(x, None, memory, layout)
        mixed = x + block.mixer(block.mixer_norm(x), None)
        h, _, _ = block.hsa(block.hsa_norm(mixed), memory, layout)
        base = mixed if rule == "bypass" else mixed + h
        assert torch.allclose(out, base + block.mlp(block.mlp_norm(mixed + h)), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    torch.manual_seed(8)
    model = HSAHybrid(small_config(initializer_range=0.02))
    ids = torch.randint(0, 50, (2, 50))
    ref = model(ids).logits
    out = model.to(dtype)(ids).logits
    assert out.dtype == dtype
    assert (out.float() - ref).norm() / ref.norm() < 5e-2


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    torch.manual_seed(9)
    model = HSAHybrid(small_config(local_mixer="mamba2", tie_embeddings=tie)).eval()
    model.save_pretrained(tmp_path)
    loaded = HSAHybrid.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, 50, (2, 45))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HSAHybrid.from_pretrained(tmp_path)
    HSAHybrid(small_config()).save_pretrained(tmp_path)
    small_config(d_model=48).to_json(tmp_path / "config.json")
    with pytest.raises(Exception, match="d_model|shape|size"):
        HSAHybrid.from_pretrained(tmp_path)


def test_from_pretrained_overrides(tmp_path):
    model = HSAHybrid(small_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = HSAHybrid.from_pretrained(tmp_path, softmax_off_by_one=True).eval()
    assert loaded.config.softmax_off_by_one and not model.config.softmax_off_by_one
    expected = HSAHybrid(small_config(softmax_off_by_one=True)).eval()
    expected.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 45))
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, loaded(ids).logits)
        assert not torch.allclose(model(ids).logits, loaded(ids).logits)
    with pytest.raises(ValueError, match="overrides \\['d_model'\\]"):
        HSAHybrid.from_pretrained(tmp_path, d_model=48)
    with pytest.raises(ConfigError, match="no_such_field"):
        HSAHybrid.from_pretrained(tmp_path, no_such_field=1)


def test_bad_input_is_rejected_with_a_clear_message():
    model = HSAHybrid(small_config())
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(1, 10))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, -2, 3]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="cross"):
        model(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 10]))
    with pytest.raises(ValueError, match="every token"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.zeros(1, 5))
    with pytest.raises(TypeError, match="doc_ids"):
        model(torch.zeros(1, 5, dtype=torch.long), doc_ids=torch.zeros(1, 5))


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(10)
    model = HSAHybrid(small_config())
    ids = torch.randint(0, 50, (2, 30))
    labels = ids.clone()
    labels[0, :10] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), -1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(29) if labels[b, t + 1] != -100]
    assert torch.allclose(out.loss.double(), torch.stack(terms).mean(), atol=1e-5)


def test_compiled_blocks_match_eager():
    """compile_blocks (train.compile) changes the kernels, not the results: on packed documents the loss and
    every gradient of the compiled Mamba2 hybrid match the eager model's, and the weights keep their names."""
    torch.manual_seed(5)
    config = HSAHybridConfig.preset("tiny", local_mixer="mamba2")
    eager = HSAHybrid(config)
    compiled = copy.deepcopy(eager).compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 256))
    docs = (torch.arange(256) >= 100).long().expand(2, -1)
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids, doc_ids=docs).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
