"""The one entry of each op (backend="auto") against the references, in the full and the cached forms;
the document index forms against plain loops; the mixers' own inference states."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import HSAHybrid
from ramba.ops import DocIndex, causal_conv1d, gated_rms_norm, sliding_window_attention, ssd_scan
from ramba.ops.ssd import causal_conv1d_ref, gated_rms_norm_ref, ssd_scan_ref
from ramba.ops.swa import swa_cached_reference, swa_reference
from ramba.ops.utils import ids_from_cu_seqlens
from test_model import small_config


def random_ids(gen: torch.Generator, batch: int, length: int, p: float) -> torch.Tensor:
    return (torch.rand(batch, length, generator=gen) < p).long().cumsum(1) * 7 % 5  # ids may repeat later


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 40), p=st.sampled_from([0.0, 0.1, 0.5]),
       seed=st.integers(0, 2**31 - 1))
def test_doc_index_forms_match_loops(batch, length, p, seed):
    ids = random_ids(torch.Generator().manual_seed(seed), batch, length, p)
    docs = DocIndex(ids)
    starts, seq_idx, bounds = [], [], []
    for b in range(batch):
        row_starts = [t == 0 or int(ids[b, t]) != int(ids[b, t - 1]) for t in range(length)]
        starts.append(row_starts)
        running, row_idx = 0, []
        for t, s in enumerate(row_starts):
            running += s
            row_idx.append(running)
            if s:
                bounds.append(b * length + t)
        seq_idx.append(row_idx)
    bounds.append(batch * length)
    assert docs.starts.tolist() == starts
    assert docs.seq_idx.tolist() == seq_idx and docs.seq_idx.dtype == torch.int32
    assert docs.cu_seqlens.tolist() == bounds and docs.cu_seqlens.dtype == torch.int32
    assert docs.max_seqlen == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    assert docs.starts is docs.starts  # derived once, then kept
    numbered = ids_from_cu_seqlens(docs.cu_seqlens, batch, length)
    assert torch.equal(DocIndex(numbered).starts, docs.starts)


def test_doc_index_rejects_bad_ids():
    with pytest.raises(ValueError, match="integer"):
        DocIndex(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2-D"):
        DocIndex(torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="DocIndex"):
        sliding_window_attention(*(torch.randn(1, 4, 2, 8),) * 3, 2, [0, 0, 1, 1])


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 50), window=st.integers(1, 80), p=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**31 - 1))
def test_swa_entry_full_form(length, window, p, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    ids = random_ids(gen, 2, length, p) if p else None
    want = swa_reference(q, k, v, window, ids)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, ids), want)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, None if ids is None else DocIndex(ids),
                                                        backend="torch"), want)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 30), cached=st.integers(0, 40), window=st.integers(1, 2**20),
       seed=st.integers(0, 2**31 - 1))
def test_swa_entry_cached_form(length, cached, window, seed):
    """Windows far longer than the keys (up to 2**20) give the reference's result without allocating for them."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, length, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, cached + length, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    key_valid = torch.rand(2, cached + length, generator=gen) < 0.8
    got = sliding_window_attention(q, k, v, window, key_valid=key_valid)
    want = swa_cached_reference(q, k, v, min(window, cached + length), key_valid)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="documents"):
        sliding_window_attention(q, k, v, window, torch.zeros(2, length, dtype=torch.long), key_valid=key_valid)


def scan_inputs(gen: torch.Generator, b: int, l: int) -> tuple[torch.Tensor, ...]:
    h, p, g, n = 4, 3, 2, 5
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, dtype=torch.float64))
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.1
    B, C = (torch.randn(b, l, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    return x, dt, A, B, C, D


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 30), cut=st.integers(0, 30), p=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**31 - 1))
def test_ssd_entries_full_and_cached_forms(length, cut, p, seed):
    gen = torch.Generator().manual_seed(seed)
    cut = min(cut, length)
    x, dt, A, B, C, D = scan_inputs(gen, 2, length)
    ids = random_ids(gen, 2, length, p) if p else None
    starts = None if ids is None else DocIndex(ids).starts
    full = ssd_scan_ref(x, dt, A, B, C, 8, D, starts)
    torch.testing.assert_close(ssd_scan(x, dt, A, B, C, 8, D, None if ids is None else DocIndex(ids)), full)
    if ids is None:  # cached form: the first `cut` tokens, then the rest one token or one segment at a time
        y1, state = ssd_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 8, D, return_final_state=True)
        parts = [y1]
        for t in range(cut, length):
            y, state = ssd_scan(x[:, t:t + 1], dt[:, t:t + 1], A, B[:, t:t + 1], C[:, t:t + 1], 8, D,
                                initial_state=state, return_final_state=True)
            parts.append(y)
        torch.testing.assert_close(torch.cat(parts, 1), full)

    xc = torch.randn(2, length, 6, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    conv = causal_conv1d_ref(xc, weight, bias, starts)
    torch.testing.assert_close(causal_conv1d(xc, weight, bias, None if ids is None else DocIndex(ids)), conv)
    if ids is None:
        state = torch.zeros(2, 3, 6, dtype=torch.float64)
        first, state = causal_conv1d(xc[:, :cut], weight, bias, initial_state=state, return_final_state=True)
        second, state = causal_conv1d(xc[:, cut:], weight, bias, initial_state=state, return_final_state=True)
        torch.testing.assert_close(torch.cat([first, second], 1), conv)
        torch.testing.assert_close(state, torch.nn.functional.pad(xc, (0, 0, 3, 0))[:, -3:])

    y, z = torch.randn(2, length, 8, generator=gen), torch.randn(2, length, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    torch.testing.assert_close(gated_rms_norm(y, z, w, 4, 1e-5), gated_rms_norm_ref(y, z, w, 4, 1e-5))


def test_entries_reject_unknown_backends():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="'torch'"):
        sliding_window_attention(q, q, q, 2, backend="bogus")
    x, dt, A, B, C, D = scan_inputs(torch.Generator().manual_seed(0), 1, 4)
    with pytest.raises(ValueError, match="bogus"):
        ssd_scan(x, dt, A, B, C, 8, D, backend="bogus")
    with pytest.raises(ValueError, match="\\[b, l, c\\]"):
        causal_conv1d(torch.randn(4, 3), torch.randn(3, 4))


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_mixers_allocate_their_own_state(mixer):
    model = HSAHybrid(small_config(local_mixer=mixer)).to(torch.bfloat16)
    cache = model.new_cache(3)
    cfg = model.config
    for block, state in zip([*model.lower, *model.upper], cache.states):
        if mixer == "swa":
            assert state.k.shape == state.v.shape == (3, 0, cfg.num_kv_heads, cfg.head_dim)
            assert state.k.dtype == torch.bfloat16 and state.valid is None  # no padding seen yet
        else:
            conv_dim = cfg.d_inner + 2 * cfg.n_groups * cfg.d_state
            assert state.conv.shape == (3, cfg.d_conv - 1, conv_dim) and state.conv.dtype == torch.bfloat16
            heads = cfg.d_inner // cfg.mamba_head_dim
            assert state.ssm.shape == (3, heads, cfg.mamba_head_dim, cfg.d_state)
            assert state.ssm.dtype == torch.float32


def test_swa_state_keeps_at_most_window_minus_one_keys():
    model = HSAHybrid(small_config(local_mixer="swa")).eval()
    cache = model.new_cache(1)
    W = model.config.window
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 3)), cache=cache)
        assert cache.states[0].k.shape[1] == min(3, W - 1)
        model(torch.randint(0, 50, (1, W + 5)), cache=cache)
        assert cache.states[0].k.shape[1] == W - 1


def test_huge_window_cache_allocates_nothing_for_it():
    model = HSAHybrid(small_config(local_mixer="swa", window=2**30)).eval()
    cache = model.new_cache(2)
    ids = torch.randint(0, 50, (2, 70))
    with torch.no_grad():
        out = torch.cat([model(ids[:, :40], cache=cache).logits, model(ids[:, 40:], cache=cache).logits], 1)
        torch.testing.assert_close(out, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert cache.states[0].k.shape[1] == 70


def test_cache_made_before_a_cast_says_so():
    model = HSAHybrid(small_config(local_mixer="swa")).eval()
    cache = model.new_cache(1)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="new_cache"):
        model(torch.randint(0, 50, (1, 5)), cache=cache)


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_cache_under_autocast_matches_full_forward(mixer):
    """A cache allocated for float32 weights takes bf16 keys under autocast: segments then one token give the
    logits of one full pass under the same autocast."""
    torch.manual_seed(0)
    model = HSAHybrid(small_config(local_mixer=mixer)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 41))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).logits.float()
        cache = model.new_cache(2)
        parts = [model(ids[:, a:b], cache=cache).logits.float() for a, b in ((0, 17), (17, 40), (40, 41))]
    got = torch.cat(parts, dim=1)
    assert float((got - full).norm() / full.norm()) < 2e-2
