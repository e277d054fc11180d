"""Static decoding (ramba.decoding): every fixed-shape step gives the logits of the cached forward pass, over
enough steps that chunks complete while decoding; its ops against the references; the caches it refuses;
generate(static_decode=...); the captured CUDA graphs (on a GPU only)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ramba.generation
from ramba import HSAHybrid, HSAHybridConfig
from ramba.decoding import StaticDecoder
from ramba.ops.aggregate import aggregate_decode, aggregate_reference
from ramba.ops.retrieve import retrieve_decode, retrieve_reference
from ramba.ops.ssd import causal_conv1d_ref, causal_conv1d_step
from ramba.ops.swa import swa_cached_reference, swa_decode
from ramba.parallel.group import ContextParallel
from test_model import small_config

STEPS = 150  # chunk_size 16: every row completes at least 9 chunks while decoding
VARIANTS = {
    "swa": dict(local_mixer="swa"),
    "mamba2-reset-stagger-horizon": dict(local_mixer="mamba2", mamba_reset=11, mamba_reset_upper=13,
                                         mamba_reset_stagger=True, mamba_horizon=20),
    "swa-upper-shortcut": dict(local_mixer=["mamba2", "swa", "swa"]),
    "beyond-window": dict(local_mixer="swa", retrieve_beyond_window=True, window=40),
    # stick-breaking weights, one shared retrieval head over 2 kv heads, off-by-one softmax, the standard
    # residual, mean landmarks without encoder layers, plain blocks without MLP, and more slots than chunks
    "options": dict(local_mixer=["swa", "mamba2", "swa"], retrieval_weights="stick_breaking", retrieval_heads="shared",
                    num_kv_heads=2, softmax_off_by_one=True, hsa_residual="standard", landmark="mean",
                    encoder_layers=0, plain_block_mlp=False, hsa_every=2, topk=12),
}
MODELS: dict[str, HSAHybrid] = {}


def model_for(variant: str) -> HSAHybrid:
    if variant not in MODELS:
        torch.manual_seed(1)
        MODELS[variant] = HSAHybrid(small_config(initializer_range=0.2, **VARIANTS[variant])).eval()
    return MODELS[variant]


def prefilled(model: HSAHybrid, ids: torch.Tensor, mask: torch.Tensor, cut: int, keep: int):
    """A cache after the prompt ids [B, L] (left padding where mask is 0) in two segments split at `cut`, the
    last with logits_to_keep=keep (0 leaves an all-SWA upper stack stale)."""
    cache = model.new_cache(ids.shape[0])
    with torch.no_grad():
        if 0 < cut < ids.shape[1]:
            model(ids[:, :cut], cache=cache, attention_mask=mask[:, :cut], logits_to_keep=0)
            model(ids[:, cut:], cache=cache, logits_to_keep=keep)
        else:
            model(ids, cache=cache, attention_mask=mask, logits_to_keep=keep)
    return cache


def assert_steps_match(model: HSAHybrid, lengths: list[int], cut: int, keep: int, seed: int, steps: int = STEPS):
    """Rows of the given prompt lengths (left-padded to the longest): the static step's logits equal the cached
    forward pass's at every one of `steps` steps, within 1e-5 of the logits' scale (float32)."""
    g = torch.Generator().manual_seed(seed)
    vocab, L = model.config.vocab_size, max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), L + steps), generator=g)
    mask = torch.stack([(torch.arange(L) >= L - n).long() for n in lengths])
    cut = max(cut, L - min(lengths) + 1)  # padding only in the first segment
    static, eager = (prefilled(model, ids[:, :L], mask, cut, keep) for _ in range(2))
    assert static.upper_stale == (keep == 0 and model.upper_all_swa)
    decoder = StaticDecoder(model, static, steps)
    for t in range(steps):
        token = ids[:, L + t]
        with torch.no_grad():
            expected = model(token[:, None], cache=eager).logits[:, -1]
        got = decoder.step(token)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()),
                                   msg=lambda m: f"step {t}: {m}")
    assert torch.equal(decoder.positions, eager.lengths)
    assert model.encoder is None or torch.equal(decoder.count, eager.store.count)


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=2, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3), cut=st.integers(0, 60), keep=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**31 - 1))
@example(lengths=[1, 5, 40], cut=0, keep=0, seed=0)  # shorter than a chunk and than the window, left padding
def test_static_steps_equal_the_cached_forward(variant, lengths, cut, keep, seed):
    assert_steps_match(model_for(variant), lengths, cut, keep, seed)


def test_default_chunk_size_and_a_model_without_memory():
    """chunk_size 64 (the tiny preset, made smaller) over two completed chunks; use_hsa=False (no memory)."""
    torch.manual_seed(2)
    tiny = HSAHybridConfig.preset("tiny", vocab_size=60, d_model=64, head_dim=16, intermediate_size=96, window=48,
                                  retrieval_dim=16, topk=4, initializer_range=0.2)
    assert tiny.chunk_size == 64
    assert_steps_match(HSAHybrid(tiny).eval(), [100, 30], cut=50, keep=1, seed=3)
    plain = HSAHybrid(small_config(use_hsa=False, local_mixer="mamba2", initializer_range=0.2)).eval()
    assert_steps_match(plain, [7, 20], cut=0, keep=1, seed=4, steps=40)


# ------------------------------------------------------------------------------------------------- the ops
@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 12), heads=st.integers(1, 2), topk=st.integers(1, 14),
       window=st.sampled_from([None, 16, 40]), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_retrieve_decode_selects_as_the_reference(batch, chunks, heads, topk, window, ties, seed):
    """Same indices and scores as retrieve_reference; ties go to the more recent chunk; slots past count hold
    NaN and are never read."""
    S, g = 16, torch.Generator().manual_seed(seed)
    qr = torch.randn(batch, 1, heads, 8, generator=g)
    landmarks = torch.randn(batch, chunks, heads, 8, generator=g)
    if ties:  # repeated chunks have equal scores
        landmarks = landmarks[:, torch.randint(0, 3, (chunks,), generator=g).clamp(max=chunks - 1)]
    count = torch.randint(0, chunks + 1, (batch,), generator=g)
    positions = count * S + torch.randint(0, S, (batch,), generator=g)  # the token after its row's last chunk
    landmarks = landmarks.masked_fill((torch.arange(chunks)[None] >= count[:, None])[..., None, None], float("nan"))
    indices, scores = retrieve_decode(qr[:, 0], landmarks, count, positions, topk, S, window)
    ref_indices, ref_scores = retrieve_reference(qr, landmarks, topk, S, positions[:, None], window)
    assert torch.equal(indices, ref_indices[:, 0])
    torch.testing.assert_close(scores, ref_scores[:, 0])


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 6), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       topk=st.integers(1, 4), off_by_one=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_aggregate_decode_equals_the_reference(batch, chunks, kv_heads, group, topk, off_by_one, seed):
    """One query per row, chunks not selected hold NaN and are never read, empty slots (-1) give nothing."""
    S, D, g = 16, 8, torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, kv_heads * group, D, generator=g)
    k, v = (torch.randn(batch, chunks * S, kv_heads, D, generator=g) for _ in range(2))
    indices = torch.randint(-1, chunks, (batch, 1, kv_heads, topk), generator=g)
    weights = torch.rand(batch, 1, kv_heads, topk, generator=g)
    unread = torch.ones(batch, chunks, kv_heads, dtype=torch.bool)
    for b, h, c in (indices[:, 0] >= 0).nonzero().tolist():
        unread[b, indices[b, 0, h, c], h] = False
    unread = unread.repeat_interleave(S, dim=1)[..., None]
    k, v = k.masked_fill(unread, float("nan")), v.masked_fill(unread, float("inf"))
    out = aggregate_decode(q[:, 0], k, v, indices[:, 0], weights[:, 0], S, D ** -0.5, off_by_one)
    expected = aggregate_reference(q, k, v, indices, weights, S, D ** -0.5, off_by_one)[:, 0]
    torch.testing.assert_close(out, expected)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), seen=st.integers(0, 20), window=st.integers(1, 12), group=st.integers(1, 2),
       seed=st.integers(0, 2**31 - 1))
def test_swa_and_conv_steps_equal_the_cached_references(batch, seen, window, group, seed):
    """swa_decode over a shuffled buffer of the last `window` keys (some invalid) equals the cached reference;
    causal_conv1d_step equals the full conv's last output, and keeps the last k-1 inputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, 2 * group, 8, generator=g)
    k, v = (torch.randn(batch, seen + 1, 2, 8, generator=g) for _ in range(2))
    key_valid = torch.rand(batch, seen + 1, generator=g) < 0.7
    key_valid[:, -1] = True
    expected = swa_cached_reference(q, k, v, window, key_valid)[:, 0]
    last = slice(max(0, seen + 1 - window), seen + 1)
    order = torch.randperm(last.stop - last.start, generator=g)
    buffer = [t[:, last][:, order] for t in (k, v, key_valid)]
    torch.testing.assert_close(swa_decode(q[:, 0], *buffer), expected)

    x = torch.randn(batch, 4 + seen, 6, generator=g)
    weight, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    out, state = causal_conv1d_step(x[:, -1], weight, bias, x[:, -4:-1])
    torch.testing.assert_close(out, causal_conv1d_ref(x, weight, bias)[:, -1])
    assert torch.equal(state, x[:, -3:])


# ------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_fix():
    model = model_for("swa")
    ids = torch.randint(0, 50, (2, 20))
    with pytest.raises(ValueError, match="prefill it first"):
        StaticDecoder(model, model.new_cache(2), 4)
    offloaded = model.new_cache(2, offload=True)
    with torch.no_grad():
        model(ids, cache=offloaded)
    with pytest.raises(ValueError, match="offload=False"):
        StaticDecoder(model, offloaded, 4)
    cache = prefilled(model, ids, torch.ones_like(ids), 0, 1)
    with pytest.raises(ValueError, match="model.new_cache"):
        StaticDecoder(model_for("options"), cache, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticDecoder(model, cache, -1)
    model.train()
    try:
        with pytest.raises(ValueError, match=r"model.eval\(\)"):
            StaticDecoder(model, cache, 4)
    finally:
        model.eval()
    cache.context_parallel = ContextParallel()
    with pytest.raises(ValueError, match="context_parallel"):
        StaticDecoder(model, cache, 4)
    cache.context_parallel = None
    decoder = StaticDecoder(model, cache, 1)
    with pytest.raises(ValueError, match=r"tokens must be \[2\]"):
        decoder.step(ids[:, 0:1])
    decoder.step(ids[:, 0])
    with pytest.raises(ValueError, match="larger max_new_tokens"):
        decoder.step(ids[:, 0])


# ----------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("variant", ["swa", "mamba2-reset-stagger-horizon"])
def test_generate_static_decode_gives_the_same_tokens(variant):
    """float64, so that no argmax is a near tie; left padding, several prefill segments, a stop token."""
    model = HSAHybrid(small_config(**VARIANTS[variant])).double().eval()
    prompt = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    mask[0, :12] = 0
    kwargs = dict(attention_mask=mask, segment_size=16)
    eager = model.generate(prompt, 60, static_decode=False, **kwargs)
    assert torch.equal(model.generate(prompt, 60, static_decode=True, **kwargs), eager)
    stop = int(eager[1, 70])
    assert torch.equal(model.generate(prompt, 60, static_decode=True, stop_tokens=[stop], **kwargs),
                       model.generate(prompt, 60, static_decode=False, stop_tokens=[stop], **kwargs))
    sampled = [model.generate(prompt, 30, do_sample=True, static_decode=s, generator=torch.Generator().manual_seed(0),
                              **kwargs) for s in (True, False)]
    assert torch.equal(*sampled)


def test_generate_refuses_static_decode_where_it_cannot_and_keeps_the_cpu_default(monkeypatch):
    model = model_for("swa")
    prompt = torch.randint(0, 50, (1, 20))
    with pytest.raises(ValueError, match="offload=True"):
        model.generate(prompt, 4, offload=True, static_decode=True)
    with pytest.raises(ValueError, match="return_retrieval=True"):
        model.generate(prompt, 4, return_retrieval=True, static_decode=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the default, and None on CPU, decode with model calls")

    monkeypatch.setattr(ramba.generation, "StaticDecoder", refuse)
    assert model.generate(prompt, 4).shape == (1, 24)
    assert model.generate(prompt, 4, static_decode=None).shape == (1, 24)


# ------------------------------------------------------------------------------------------------ CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_captured_steps_equal_eager_steps_on_cuda(mixer, monkeypatch):
    """Both step variants get captured and replayed; their logits equal the same decoder's steps run eagerly
    and the cached forward pass's; generate picks the static decoder on CUDA and gives the same tokens."""
    torch.manual_seed(6)
    config = small_config(local_mixer=mixer, mamba_reset=11, mamba_horizon=20, initializer_range=0.2,
                          mamba_backend="torch")
    model = HSAHybrid(config).cuda().eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (3, 40 + STEPS), generator=g).cuda()
    mask = torch.ones(3, 40, dtype=torch.long, device="cuda")
    mask[1, :30] = 0
    graphed, plain, eager = (prefilled(model, ids[:, :40], mask, 0, 1) for _ in range(3))
    graphed, plain = StaticDecoder(model, graphed, STEPS), StaticDecoder(model, plain, STEPS, graphs=False)
    for t in range(STEPS):
        token = ids[:, 40 + t]
        with torch.no_grad():
            expected = model(token[:, None], cache=eager).logits[:, -1]
        got = graphed.step(token)
        torch.testing.assert_close(got, plain.step(token), rtol=0, atol=1e-6 * float(expected.abs().max()))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert set(graphed._captured) == {False, True} and not plain._captured
    made = []
    monkeypatch.setattr(ramba.generation, "StaticDecoder", lambda *args: made.append(StaticDecoder(*args)) or made[-1])
    model.double()
    assert torch.equal(model.generate(ids[:, :40], 50, attention_mask=mask, static_decode=None),
                       model.generate(ids[:, :40], 50, attention_mask=mask, static_decode=False))
    assert len(made) == 1 and made[0]._captured
