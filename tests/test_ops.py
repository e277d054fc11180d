"""hsa_retrieve and hsa_aggregate against naive loops over tokens, heads and slots."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba.ops import hsa_aggregate, hsa_retrieve
from ramba.ops.aggregate import aggregate_dense, aggregate_reference


def naive_retrieve(qr, landmarks, topk, S, positions, window):
    """Loop over (b, t, h): list the visible chunks, rank by (score, recency), keep K, order most recent first."""
    B, L, Hr, dr = qr.shape
    C = landmarks.shape[1]
    indices = torch.full((B, L, Hr, topk), -1, dtype=torch.long)
    scores = torch.full((B, L, Hr, topk), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            p = int(positions[b, t])
            for h in range(Hr):
                visible = [c for c in range(C)
                           if (c + 1) * S <= p and (window is None or (c + 1) * S <= p - window + S)]
                s = {c: float(qr[b, t, h].double() @ landmarks[b, c, h].double()) / math.sqrt(dr) for c in visible}
                chosen = sorted(visible, key=lambda c: (-s[c], -c))[:topk]
                for i, c in enumerate(sorted(chosen, reverse=True)):
                    indices[b, t, h, i] = c
                    scores[b, t, h, i] = s[c]
    return indices, scores


def naive_aggregate(q, k, v, indices, weights, S, scale, off_by_one):
    B, L, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    out = torch.zeros(B, L, HQ, D, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            for hq in range(HQ):
                h = hq // G
                for i in range(indices.shape[-1]):
                    c = int(indices[b, t, h, i])
                    if c < 0:
                        continue
                    keys = k[b, c * S:(c + 1) * S, h].double()
                    vals = v[b, c * S:(c + 1) * S, h].double()
                    logits = keys @ q[b, t, hq].double() * scale
                    e = torch.exp(logits - logits.max())
                    denom = e.sum() + (torch.exp(-logits.max()) if off_by_one else 0.0)
                    out[b, t, hq] += float(weights[b, t, h, i]) * (e / denom) @ vals
    return out


@st.composite
def retrieve_case(draw):
    S = draw(st.sampled_from([16, 32, 64]))
    B = draw(st.integers(1, 2))
    L = draw(st.integers(1, 3 * S + 7))
    Hr = draw(st.integers(1, 2))
    dr = draw(st.sampled_from([4, 8, 16]))
    C = draw(st.integers(0, 6))
    topk = draw(st.integers(1, 8))
    window = draw(st.sampled_from([None, S, 2 * S, 3 * S - 5]))
    shifted = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())
    return S, B, L, Hr, dr, C, topk, window, shifted, seed, ties


@settings(max_examples=60, deadline=None)
@given(retrieve_case())
def test_retrieve_matches_naive_loops(case):
    S, B, L, Hr, dr, C, topk, window, shifted, seed, ties = case
    g = torch.Generator().manual_seed(seed)
    qr = torch.randn(B, L, Hr, dr, generator=g, dtype=torch.float64)
    landmarks = torch.randn(B, C, Hr, dr, generator=g, dtype=torch.float64)
    if ties and C >= 2:  # identical landmarks give equal scores: the more recent chunk must win
        # integer values, so that every score is exact: a matmul may round equal dot products differently
        qr = torch.randint(-2, 3, (B, L, Hr, dr), generator=g).double()
        landmarks = torch.randint(-2, 3, (B, C, Hr, dr), generator=g).double()
        landmarks[:, 1::2] = landmarks[:, 0:1]
    positions = torch.arange(L).expand(B, L).clone()
    if shifted:  # a segment that starts later in the sequence
        positions += torch.randint(0, 3 * S, (B, 1), generator=g)
    indices, scores = hsa_retrieve(qr, landmarks, topk, S, positions=positions, window=window)
    want_idx, want_scores = naive_retrieve(qr, landmarks, topk, S, positions, window)
    assert indices.shape == (B, L, Hr, topk) and indices.dtype == torch.long
    assert torch.equal(indices, want_idx)
    assert torch.allclose(scores, want_scores, atol=1e-12)
    # never a future or incomplete chunk
    assert bool(((indices + 1) * S <= positions[:, :, None, None]).where(indices >= 0, True).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_retrieve_low_precision_picks_a_valid_topk(dtype):
    torch.manual_seed(0)
    qr = torch.randn(2, 300, 2, 32).to(dtype)
    landmarks = torch.randn(2, 4, 2, 32).to(dtype)
    indices, scores = hsa_retrieve(qr, landmarks, 3, 64)
    _, full = naive_retrieve(qr, landmarks, 4, 64, torch.arange(300).expand(2, -1), None)
    assert scores.dtype == torch.float32
    for b, t, h in [(0, 299, 0), (1, 200, 1), (0, 130, 1)]:
        visible = full[b, t, h][full[b, t, h] > float("-inf")]
        best = visible.sort(descending=True).values[: 3]
        got = scores[b, t, h][indices[b, t, h] >= 0].double().sort(descending=True).values
        assert torch.allclose(got, best, atol=1e-2)


def test_retrieve_gradcheck():
    torch.manual_seed(1)
    qr = torch.randn(1, 150, 2, 4, dtype=torch.float64, requires_grad=True)
    landmarks = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)

    def scores(a, b):
        idx, s = hsa_retrieve(a, b, 2, 64)
        return s.masked_fill(idx < 0, 0.0)

    assert torch.autograd.gradcheck(scores, (qr, landmarks), fast_mode=True)


@st.composite
def aggregate_case(draw):
    S = draw(st.sampled_from([16, 32]))
    B = draw(st.integers(1, 2))
    L = draw(st.integers(1, 9))
    H = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([4, 8]))
    C = draw(st.integers(0, 4))
    K = draw(st.integers(1, 5))
    off_by_one = draw(st.booleans())
    empty_rate = draw(st.sampled_from([0.0, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return S, B, L, H, G, D, C, K, off_by_one, empty_rate, seed


def make_aggregate_inputs(S, B, L, H, G, D, C, K, empty_rate, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H * G, D, generator=g, dtype=dtype)
    k = torch.randn(B, C * S, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, C * S, H, D, generator=g, dtype=dtype)
    indices = torch.randint(0, max(C, 1), (B, L, H, K), generator=g)
    empty = (torch.rand(B, L, H, K, generator=g) < empty_rate) | (C == 0)
    indices = indices.masked_fill(empty, -1)
    weights = torch.randn(B, L, H, K, generator=g, dtype=dtype)
    return q, k, v, indices, weights


@settings(max_examples=60, deadline=None)
@given(aggregate_case())
def test_aggregate_matches_naive_loops(case):
    S, B, L, H, G, D, C, K, off_by_one, empty_rate, seed = case
    q, k, v, indices, weights = make_aggregate_inputs(S, B, L, H, G, D, C, K, empty_rate, seed)
    want = naive_aggregate(q, k, v, indices, weights, S, 1 / math.sqrt(D), off_by_one)
    out = hsa_aggregate(q, k, v, indices, weights, S, softmax_off_by_one=off_by_one)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.allclose(out, want, atol=1e-10)
    # both PyTorch formulations, whichever hsa_aggregate picked for this size
    for impl in (aggregate_reference, aggregate_dense) if C else (aggregate_reference,):
        assert torch.allclose(impl(q, k, v, indices, weights, S, 1 / math.sqrt(D), off_by_one), want, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_aggregate_low_precision(dtype, tol):
    q, k, v, indices, weights = make_aggregate_inputs(32, 2, 7, 2, 2, 16, 3, 4, 0.3, 5, dtype)
    want = naive_aggregate(q, k, v, indices, weights, 32, 0.25, False)
    for impl in (aggregate_reference, aggregate_dense):
        out = impl(q, k, v, indices, weights, 32, 0.25)
        assert out.dtype == dtype
        assert (out.double() - want).norm() / want.norm() < tol


@pytest.mark.parametrize("impl", [aggregate_reference, aggregate_dense])
@pytest.mark.parametrize("off_by_one", [False, True])
def test_aggregate_gradcheck(impl, off_by_one):
    q, k, v, indices, weights = make_aggregate_inputs(16, 1, 3, 2, 2, 4, 3, 3, 0.3, 7)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, weights))
    assert torch.autograd.gradcheck(lambda a, b, c, w: impl(a, b, c, indices, w, 16, 0.5, off_by_one), inputs,
                                    fast_mode=True)


def test_aggregate_empty_slots_get_no_gradient():
    q, k, v, indices, weights = make_aggregate_inputs(16, 1, 4, 1, 2, 8, 2, 4, 0.5, 11)
    weights.requires_grad_()
    hsa_aggregate(q, k, v, indices, weights, 16).sum().backward()
    assert bool((weights.grad[indices < 0] == 0).all())
    assert bool((weights.grad[indices >= 0] != 0).all())


def test_bad_inputs_raise_before_computing():
    q, k, v, indices, weights = make_aggregate_inputs(16, 1, 4, 1, 2, 8, 2, 4, 0.0, 3, torch.float32)
    with pytest.raises(IndexError, match="indices must lie in"):
        hsa_aggregate(q, k, v, indices + 5, weights, 16)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        hsa_aggregate(q, k[:, :-1], v[:, :-1], indices, weights, 16)
    with pytest.raises(TypeError, match="integer"):
        hsa_aggregate(q, k, v, indices.float(), weights, 16)
    with pytest.raises(ValueError, match=r"\[B, L, H, K\]"):
        hsa_aggregate(q, k, v, indices[:, :2], weights, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        hsa_aggregate(q[:, :, :1], k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1), indices, weights, 16)
    qr, lmk = torch.randn(1, 5, 1, 8), torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="topk"):
        hsa_retrieve(qr, lmk, 0, 16)
    with pytest.raises(ValueError, match="agree"):
        hsa_retrieve(qr, torch.randn(1, 2, 2, 8), 2, 16)
    with pytest.raises(ValueError, match="positions"):
        hsa_retrieve(qr, lmk, 2, 16, positions=torch.arange(4)[None])
    with pytest.raises(ValueError, match="window"):
        hsa_retrieve(qr, lmk, 2, 16, window=8)
