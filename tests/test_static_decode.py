"""Static decoding (ramba.decoding): every fixed-shape step gives the logits of the cached forward pass, over
enough steps that chunks complete while decoding; its ops against the references; the caches it refuses;
generate(static_decode=...); offloaded caches (memory keys/values in CPU memory); the captured CUDA graphs and
the reads and writes of pinned CPU memory (on a GPU only)."""

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
from ramba.ops.utils import write_chunks, write_chunks_reference
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


def prefilled(model: HSAHybrid, ids: torch.Tensor, mask: torch.Tensor, cut: int, keep: int, offload: bool = False):
    """A cache after the prompt ids [B, L] (left padding where mask is 0) in two segments split at `cut`, the
    last with logits_to_keep=keep (0 leaves an all-SWA upper stack stale)."""
    cache = model.new_cache(ids.shape[0], offload=offload)
    with torch.no_grad():
        if 0 < cut < ids.shape[1]:
            model(ids[:, :cut], cache=cache, attention_mask=mask[:, :cut], logits_to_keep=0)
            model(ids[:, cut:], cache=cache, logits_to_keep=keep)
        else:
            model(ids, cache=cache, attention_mask=mask, logits_to_keep=keep)
    return cache


def assert_steps_match(model: HSAHybrid, lengths: list[int], cut: int, keep: int, seed: int, steps: int = STEPS,
                       offload: bool = False):
    """Rows of the given prompt lengths (left-padded to the longest): the static step's logits equal the cached
    forward pass's at every one of `steps` steps, within 1e-5 of the logits' scale (float32). offload: both
    caches keep their memory keys/values in CPU memory."""
    g = torch.Generator().manual_seed(seed)
    vocab, L = model.config.vocab_size, max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), L + steps), generator=g)
    mask = torch.stack([(torch.arange(L) >= L - n).long() for n in lengths])
    cut = max(cut, L - min(lengths) + 1)  # padding only in the first segment
    static, eager = (prefilled(model, ids[:, :L], mask, cut, keep, offload) for _ in range(2))
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
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=3), cut=st.integers(0, 60),
       keep=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
@example(lengths=[1, 5, 40], cut=0, keep=0, seed=0)  # shorter than a chunk and than the window, left padding
def test_static_steps_equal_the_cached_forward(variant, lengths, cut, keep, seed):
    assert_steps_match(model_for(variant), lengths, cut, keep, seed)


@pytest.mark.parametrize("variant", ["swa", "options"])
def test_static_steps_of_an_offloaded_cache(variant):
    """offload=True: the decoder continues the store's CPU buffers (on a CPU-only machine the model's device)."""
    assert_steps_match(model_for(variant), [33, 50], cut=20, keep=1, seed=8, steps=60, offload=True)


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


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 40), heads=st.integers(1, 2), topk=st.integers(1, 9),
       window=st.sampled_from([None, 16, 40]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_retrieve_decode_triton_selects_as_the_torch_path(batch, chunks, heads, topk, window, dtype, seed):
    """The Triton path (CPU interpreter here) against the PyTorch one: counts below and at what the positions
    see, slots past count holding NaN; scores of bf16 inputs within rounding, the same chunks (random scores
    have no near ties)."""
    S, g = 16, torch.Generator().manual_seed(seed)
    qr = torch.randn(batch, heads, 8, generator=g).to(dtype)
    landmarks = torch.randn(batch, chunks, heads, 8, generator=g).to(dtype)
    count = torch.randint(0, chunks + 1, (batch,), generator=g)
    positions = count * S + torch.randint(-3 * S, 2 * S, (batch,), generator=g)  # some see fewer, some more
    positions = positions.clamp(min=0)
    landmarks = landmarks.masked_fill((torch.arange(chunks)[None] >= count[:, None])[..., None, None], float("nan"))
    indices, scores = retrieve_decode(qr, landmarks, count, positions, topk, S, window, backend="triton")
    expected, expected_scores = retrieve_decode(qr, landmarks, count, positions, topk, S, window, backend="torch")
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


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


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 2), chunks=st.integers(1, 5), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       topk=st.integers(1, 4), off_by_one=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_aggregate_decode_triton_equals_the_reference(batch, chunks, kv_heads, group, topk, off_by_one, dtype, seed):
    """The Triton path (CPU interpreter here) at a shape its kernel takes (chunks of 32, head dim 32)."""
    S, D, g = 32, 32, torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 1, kv_heads * group, D, generator=g).to(dtype)
    k, v = (torch.randn(batch, chunks * S, kv_heads, D, generator=g).to(dtype) for _ in range(2))
    indices = torch.randint(-1, chunks, (batch, 1, kv_heads, topk), generator=g)
    weights = torch.rand(batch, 1, kv_heads, topk, generator=g)
    out = aggregate_decode(q[:, 0], k, v, indices[:, 0], weights[:, 0], S, D ** -0.5, off_by_one, backend="triton")
    expected = aggregate_reference(q.double(), k.double(), v.double(), indices, weights.double(), S, D ** -0.5,
                                   off_by_one)[:, 0]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 4), heads=st.integers(1, 3), dim=st.sampled_from([4, 8, 24]),
       size=st.sampled_from([1, 2, 16]), backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 2**31 - 1))
def test_write_chunks_writes_the_masked_rows_at_their_slots(batch, chunks, heads, dim, size, backend, seed):
    """Rows in the mask get the chunk at their slot (clamped to the last), cast to the buffer's dtype; every
    other value of the buffer stays as it was (compared with a copy written by plain indexing)."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(batch, chunks * size, heads, dim, generator=g).bfloat16()
    chunk = torch.randn(batch, size, heads, dim, generator=g)
    slot = torch.randint(0, chunks + 2, (batch,), generator=g)
    mask = torch.rand(batch, generator=g) < 0.6
    expected = buffer.clone()
    for b in range(batch):
        if mask[b]:
            at = min(int(slot[b]), chunks - 1)
            expected[b, at * size:(at + 1) * size] = chunk[b].bfloat16()
    write_chunks(buffer, chunk, slot, mask, backend=backend)
    assert torch.equal(buffer, expected)
    reference = expected.clone()
    write_chunks_reference(reference, chunk, slot, mask)
    assert torch.equal(reference, expected)


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


# ------------------------------------------------------------------------------------- pinned CPU memory (GPU)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_cache_decodes_in_captured_steps_on_cuda():
    """offload=True on a GPU: the captured steps read the memory keys/values from pinned CPU memory and write the
    chunks completed while decoding there; logits equal the cached forward pass of an offloaded cache and of one
    on the GPU, and the written chunks equal those the cached forward pass stored."""
    torch.manual_seed(9)
    model = HSAHybrid(small_config(head_dim=32, chunk_size=32, num_heads=4, num_kv_heads=2, topk=3,
                                   initializer_range=0.2)).cuda().eval()
    steps, g = 100, torch.Generator().manual_seed(10)
    ids = torch.randint(0, 50, (2, 70 + steps), generator=g).cuda()
    mask = torch.ones(2, 70, dtype=torch.long, device="cuda")
    mask[0, :25] = 0
    offloaded, eager, on_gpu = (prefilled(model, ids[:, :70], mask, 0, 1, offload) for offload in (True, True, False))
    assert offloaded.store.k.device.type == "cpu" and offloaded.store.k.is_pinned()
    decoder = StaticDecoder(model, offloaded, steps)
    on_gpu = StaticDecoder(model, on_gpu, steps)
    for t in range(steps):
        token = ids[:, 70 + t]
        with torch.no_grad():
            expected = model(token[:, None], cache=eager).logits[:, -1]
        got = decoder.step(token)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale, msg=lambda m: f"step {t}: {m}")
        torch.testing.assert_close(got, on_gpu.step(token), rtol=0, atol=1e-5 * scale)
    assert decoder._captured and torch.equal(decoder.count, eager.store.count)
    torch.cuda.synchronize()
    chunks = int(eager.store.count.max()) * 32
    torch.testing.assert_close(offloaded.store.k[:, :chunks], eager.store.k[:, :chunks], rtol=0, atol=1e-5)
    torch.testing.assert_close(offloaded.store.v[:, :chunks], eager.store.v[:, :chunks], rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_ops_read_and_write_pinned_memory_on_cuda(dtype):
    """aggregate_decode with k, v in pinned CPU memory equals it with k, v on the GPU; write_chunks into a
    pinned buffer equals the reference on the GPU."""
    g = torch.Generator().manual_seed(11)
    B, C, S, H, G, D, K = 3, 40, 64, 2, 6, 64, 8
    q = torch.randn(B, H * G, D, generator=g).to(dtype).cuda()
    k, v = (torch.randn(B, C * S, H, D, generator=g).to(dtype).pin_memory() for _ in range(2))
    indices = torch.randint(-1, C, (B, H, K), generator=g).cuda()
    weights = torch.rand(B, H, K, generator=g).cuda()
    out = aggregate_decode(q, k, v, indices, weights, S, D ** -0.5)
    expected = aggregate_decode(q, k.cuda(), v.cuda(), indices, weights, S, D ** -0.5, backend="torch")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)
    with pytest.raises(RuntimeError, match="Triton backend"):
        aggregate_decode(q, k, v, indices, weights, S, D ** -0.5, backend="torch")
    with pytest.raises(ValueError, match="pinned"):
        aggregate_decode(q, k.clone(), v.clone(), indices, weights, S, D ** -0.5)
    chunk = torch.randn(B, S, H, D, generator=g).to(dtype).cuda()
    slot, rows = torch.tensor([3, 0, 39]).cuda(), torch.tensor([True, False, True]).cuda()
    expected = k.cuda()
    write_chunks_reference(expected, chunk, slot, rows)
    write_chunks(k, chunk, slot, rows)
    torch.cuda.synchronize()
    assert torch.equal(k.cuda(), expected)
