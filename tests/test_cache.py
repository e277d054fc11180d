"""Inference with a cache: segment-wise prefill and decoding equal one full forward pass."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import HSAHybrid
from ramba.ops.ssd import ssd_scan, ssd_step
from test_model import small_config

# the third has an all-SWA upper stack (the shortcut); the last restarts its Mamba2 states (lower: every 11
# tokens, upper: every 13)
MIXERS = ["swa", "mamba2", ["mamba2", "swa", "swa"], "mamba2-reset"]
MODELS: dict[str, HSAHybrid] = {}


def model_for(mixer) -> HSAHybrid:
    key = str(mixer)
    if key not in MODELS:
        torch.manual_seed(0)
        config = (small_config(local_mixer="mamba2", mamba_reset=11, mamba_reset_upper=13, mamba_reset_stagger=True)
                  if mixer == "mamba2-reset"
                  else small_config(local_mixer=mixer))
        MODELS[key] = HSAHybrid(config).double().eval()
    return MODELS[key]


def segments(draw_cuts: list[int], length: int) -> list[tuple[int, int]]:
    cuts = sorted({c for c in draw_cuts if 0 < c < length})
    bounds = [0, *cuts, length]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("mixer", MIXERS, ids=str)
@settings(max_examples=8, deadline=None)
@given(length=st.integers(1, 110), cuts=st.lists(st.integers(1, 109), max_size=5), decode=st.integers(0, 6),
       seed=st.integers(0, 2**31 - 1))
def test_segments_then_decoding_equal_full_forward(mixer, offload, length, cuts, decode, seed):
    model = model_for(mixer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (2, length + decode), generator=g)
    with torch.no_grad():
        full = model(ids, return_retrieval=True)
        cache = model.new_cache(2, offload=offload)
        pieces = [model(ids[:, a:b], cache=cache, return_retrieval=True) for a, b in segments(cuts, length)]
        pieces += [model(ids[:, t:t + 1], cache=cache, return_retrieval=True) for t in range(length, length + decode)]
    assert torch.allclose(torch.cat([p.logits for p in pieces], dim=1), full.logits, atol=1e-9)
    for block, (indices, weights) in enumerate(zip(full.retrieval, full.retrieval_weights, strict=True)):
        assert torch.equal(torch.cat([p.retrieval[block] for p in pieces], dim=1), indices)
        assert torch.allclose(torch.cat([p.retrieval_weights[block] for p in pieces], dim=1), weights, atol=1e-9)
    assert cache.lengths.tolist() == [length + decode] * 2
    assert cache.store.count.tolist() == [(length + decode) // 16] * 2


@pytest.mark.parametrize("mixer", MIXERS, ids=str)
@settings(max_examples=8, deadline=None)
@given(length=st.integers(60, 200), keep=st.integers(1, 5), cuts=st.lists(st.integers(1, 199), max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_logits_to_keep_and_the_swa_shortcut(mixer, length, keep, cuts, seed):
    """Only the last `keep` logits: without a cache, and after a prefill that skipped the upper stack."""
    model = model_for(mixer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (1, length + 2), generator=g)
    with torch.no_grad():
        full = model(ids).logits
        assert torch.allclose(model(ids[:, :length], logits_to_keep=keep).logits, full[:, length - keep:length],
                              atol=1e-9)
        cache = model.new_cache(1)
        parts = segments(cuts, length)
        for a, b in parts[:-1]:
            assert model(ids[:, a:b], cache=cache, logits_to_keep=0).logits.shape == (1, 0, 50)
        a, b = parts[-1]
        last = model(ids[:, a:b], cache=cache, logits_to_keep=min(keep, b - a)).logits
        decoded = [model(ids[:, t:t + 1], cache=cache).logits for t in (length, length + 1)]
    assert torch.allclose(last, full[:, length - min(keep, b - a):length], atol=1e-9)
    assert torch.allclose(torch.cat(decoded, dim=1), full[:, length:], atol=1e-9)


@pytest.mark.parametrize("mixer", MIXERS, ids=str)
def test_left_padded_batch_equals_rows_alone(mixer):
    model = model_for(mixer)
    torch.manual_seed(1)
    a, b = torch.randint(0, 50, (1, 70)), torch.randint(0, 50, (1, 37))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 33, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :33] = 0
    with torch.no_grad():
        cache = model.new_cache(2)
        first = model(batch, attention_mask=mask, cache=cache).logits
        step = model(torch.tensor([[5], [7]]), cache=cache).logits
        ref_a = model(torch.cat([a, torch.tensor([[5]])], dim=1)).logits
        ref_b = model(torch.cat([b, torch.tensor([[7]])], dim=1)).logits
    assert torch.allclose(first[0], ref_a[0, :70], atol=1e-9) and torch.allclose(step[0], ref_a[0, 70:], atol=1e-9)
    assert torch.allclose(first[1, 33:], ref_b[0, :37], atol=1e-9) and torch.allclose(step[1], ref_b[0, 37:], atol=1e-9)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("mixer", MIXERS, ids=str)
@settings(max_examples=4, deadline=None)
@given(lengths=st.lists(st.integers(1, 90), min_size=3, max_size=3), rows=st.lists(st.integers(0, 2), min_size=1,
       max_size=4), seed=st.integers(0, 2**31 - 1))
def test_select_rows_continues_the_chosen_rows(mixer, offload, lengths, rows, seed):
    """After select_rows, each kept row decodes as that row's prompt alone does (left padding included)."""
    model = model_for(mixer)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 50, (n,), generator=g) for n in lengths]
    width = max(lengths)
    batch = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    nxt = torch.randint(0, 50, (len(rows), 3), generator=g)
    with torch.no_grad():
        cache = model.new_cache(3, offload=offload)
        model(batch, attention_mask=mask, cache=cache)
        cache.select_rows(torch.tensor(rows))
        steps = torch.cat([model(nxt[:, t:t + 1], cache=cache).logits for t in range(3)], dim=1)
        for r, row in enumerate(rows):
            alone = model(torch.cat([prompts[row], nxt[r]])[None]).logits[0, -3:]
            assert torch.allclose(steps[r], alone, atol=1e-9)
    assert cache.batch_size == len(rows) and cache.lengths.tolist() == [lengths[r] + 3 for r in rows]
    with pytest.raises(ValueError, match="row indices"):
        cache.select_rows(torch.tensor([len(rows)]))


def test_generate_greedy_matches_full_forward_argmax():
    torch.manual_seed(2)
    model = HSAHybrid(small_config(local_mixer=["mamba2", "swa", "swa"])).eval()
    prompt = torch.randint(0, 50, (2, 45))
    out = model.generate(prompt, 12, segment_size=16)
    ref = prompt
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_generate_padding_stop_tokens_and_sampling():
    torch.manual_seed(3)
    model = HSAHybrid(small_config()).eval()
    short = torch.randint(0, 50, (1, 20))
    alone = model.generate(short, 6)
    padded = torch.cat([torch.zeros(1, 10, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, torch.randint(0, 50, (1, 30))])
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, :10] = 0
    out = model.generate(batch, 6, attention_mask=mask)
    assert torch.equal(out[0, 30:], alone[0, 20:])
    stop = int(alone[0, 22])
    stopped = model.generate(short, 6, stop_tokens=[stop], pad_token_id=49)
    first_stop = int((stopped[0, 20:] == stop).nonzero()[0])
    assert bool((stopped[0, 21 + first_stop:] == 49).all())
    sample = [model.generate(short, 8, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(0))
              for _ in range(2)]
    assert torch.equal(sample[0], sample[1])
    nucleus = model.generate(short, 8, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, model.generate(short, 8))  # a tiny nucleus keeps only the most likely token


def test_cache_misuse_is_rejected():
    model, other = HSAHybrid(small_config()), HSAHybrid(small_config())
    ids = torch.randint(0, 50, (2, 10))
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:1], cache=cache)
    with pytest.raises(ValueError, match="another model"):
        other(ids, cache=cache)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="first call"):
        model(ids, cache=cache, attention_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="left padding"):
        model(ids, cache=model.new_cache(2), attention_mask=torch.tensor([[1] * 9 + [0]] * 2))
    with pytest.raises(ValueError, match="packed documents"):
        model(ids, cache=model.new_cache(2), doc_ids=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=11)
    with pytest.raises(ValueError, match="right-padded|left padding"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1] * 9 + [0]] * 2))


def test_memory_that_does_not_fit_says_to_offload(monkeypatch):
    import ramba.memory

    model = HSAHybrid(small_config())
    monkeypatch.setattr(ramba.memory, "_available_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="offload=True"):
        model(torch.randint(0, 50, (1, 40)), cache=model.new_cache(1))


@pytest.mark.parametrize("offload", [False, True])
@settings(max_examples=6, deadline=None)
@given(reserve=st.integers(0, 120), length=st.integers(1, 120), seed=st.integers(0, 2**31 - 1))
def test_reserved_memory_gives_the_same_logits_without_regrowing(offload, reserve, length, seed):
    model = model_for("swa")
    ids = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        plain = model(ids, cache=model.new_cache(2, offload=offload)).logits
        cache = model.new_cache(2, offload=offload, max_tokens=reserve)
        reserved = -(-reserve // 16)  # chunks of 16 tokens
        assert cache.store.capacity == reserved and cache.store.k.shape[1] == reserved * 16
        got = model(ids, cache=cache).logits
    assert torch.allclose(got, plain, atol=1e-9)
    assert cache.store.capacity == (reserved if length // 16 <= reserved else max(length // 16, 2 * reserved, 16))


def test_reserving_more_than_fits_fails_at_once(monkeypatch):
    import ramba.memory

    model = HSAHybrid(small_config())
    monkeypatch.setattr(ramba.memory, "_available_bytes", lambda device: 10**6)
    with pytest.raises(MemoryError, match="offload=True"):
        model.new_cache(1, max_tokens=10**6)
    assert model.new_cache(1, max_tokens=160).store.capacity == 10
    with pytest.raises(ValueError, match="max_tokens"):
        model.new_cache(1, max_tokens=-1)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 70), cut=st.integers(0, 70), starts=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_ssd_scan_state_in_and_out(length, cut, starts, seed):
    """Two scans chained through their states, and token-by-token steps, equal one scan."""
    g = torch.Generator().manual_seed(seed)
    b, h, p, gr, n = 2, 4, 3, 2, 5
    x = torch.randn(b, length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(b, length, h, generator=g, dtype=torch.float64)
    A = -torch.rand(h, generator=g, dtype=torch.float64) * 2
    B = torch.randn(b, length, gr, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, gr, n, generator=g, dtype=torch.float64)
    D = torch.randn(h, generator=g, dtype=torch.float64)
    seq_start = (torch.rand(b, length, generator=g) < 0.1) if starts else None
    full, final = ssd_scan(x, dt, A, B, C, 16, D, seq_start, return_final_state=True)
    cut = min(cut, length)
    first = None if seq_start is None else seq_start[:, :cut]
    second = None if seq_start is None else seq_start[:, cut:]
    y1, s1 = ssd_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 16, D, first, return_final_state=True)
    y2, s2 = ssd_scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], 16, D, second, initial_state=s1,
                      return_final_state=True)
    assert torch.allclose(torch.cat([y1, y2], dim=1), full, atol=1e-10) and torch.allclose(s2, final, atol=1e-10)
    if seq_start is None:
        state = torch.zeros(b, h, p, n, dtype=torch.float64)
        steps = []
        for t in range(length):
            y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
            steps.append(y)
        assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-10) and torch.allclose(state, final, atol=1e-10)
