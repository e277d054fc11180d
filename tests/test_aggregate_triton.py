"""The Triton hsa_aggregate (forward and backward) against the float64 reference; its reverse index; its errors.

Without CUDA the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small here; the tests marked `gpu` repeat them at larger shapes on CUDA.
"""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ramba.ops.aggregate.fused as fused
from ramba.ops import hsa_aggregate
from ramba.ops.aggregate import aggregate_reference
from ramba.ops.aggregate.fused import aggregate_triton, route_pairs, split_segments

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# relative norm error allowed per dtype (float32 dots run in tf32 on the GPU)
TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


class _PoisonedTorch:
    """torch, except that empty / empty_like return NaN-filled tensors: every unwritten element shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _poison(torch.empty_like(*args, **kwargs))


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


def poisoned():
    return mock.patch.object(fused, "torch", _PoisonedTorch())


def make_inputs(S, B, L, H, G, D, C, K, empty_rate, empty_rows, seed, dtype, device=DEVICE):
    """Random q [B, L, H*G, D], k, v [B, C*S, H, D], indices, weights [B, L, H, K] (-1 in empty slots)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H * G, D, generator=g)
    k = torch.randn(B, C * S, H, D, generator=g)
    v = torch.randn(B, C * S, H, D, generator=g)
    indices = torch.randint(0, C, (B, L, H, K), generator=g)
    empty = torch.rand(B, L, H, K, generator=g) < empty_rate
    if empty_rows:  # every slot of the first token of each (b, h) is empty
        empty[:, 0] = True
    indices = indices.masked_fill(empty, -1)
    # non-negative, as the softmax / stick-breaking weights the model passes: with signed weights the slots of
    # a repeated chunk can cancel, and a relative error of the (near-zero) result says nothing at bf16
    weights = torch.rand(B, L, H, K, generator=g)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to), indices.to(**to),
            weights.to(dtype=dtype, **to))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """‖out - ref‖ <= tol ‖ref‖ in float64; NaN never passes, and a zero reference needs an exact zero."""
    err = float((out.detach().double() - ref.detach().double()).norm())
    norm = float(ref.detach().double().norm())
    assert err <= tol * norm, f"{what}: error {err:.3g}, reference norm {norm:.3g}"


def check_against_reference(q, k, v, indices, weights, S, off_by_one, tol):
    """Forward and the four gradients of aggregate_triton (outputs poisoned) against float64 aggregate_reference."""
    scale = 1 / math.sqrt(q.shape[-1])
    inputs = [t.detach().requires_grad_() for t in (q, k, v, weights)]
    with poisoned():
        out = aggregate_triton(inputs[0], inputs[1], inputs[2], indices, inputs[3], S, scale, off_by_one)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, dout)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, weights)]
    ref = aggregate_reference(ref_inputs[0], ref_inputs[1], ref_inputs[2], indices, ref_inputs[3], S, scale,
                              off_by_one)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.double())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, tol, "o")
    for name, grad, ref_grad, x in zip(("dq", "dk", "dv", "dweights"), grads, ref_grads, (q, k, v, weights)):
        assert grad.shape == x.shape and grad.dtype == x.dtype
        assert_close(grad, ref_grad, tol, name)
    assert bool((grads[3][indices < 0] == 0).all()), "empty slots must get a zero weight gradient"
    chosen = torch.zeros(k.shape[0], k.shape[1] // S, k.shape[2], dtype=torch.bool, device=k.device)
    for b in range(k.shape[0]):
        for h in range(k.shape[2]):
            sel = indices[b, :, h][indices[b, :, h] >= 0]
            chosen[b, sel, h] = True
    unchosen = ~chosen.repeat_interleave(S, dim=1)
    assert bool((grads[1][unchosen] == 0).all() and (grads[2][unchosen] == 0).all()), "unselected chunks: dk, dv = 0"


@st.composite
def small_case(draw):
    S = draw(st.sampled_from([32, 64]))
    D = draw(st.sampled_from([32, 64]))
    B = draw(st.integers(1, 2))
    L = draw(st.integers(1, 5))
    H = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 3, 16]))
    C = draw(st.integers(1, 4))
    K = draw(st.integers(1, 12))
    off_by_one = draw(st.booleans())
    empty_rate = draw(st.sampled_from([0.0, 0.3, 1.0]))
    empty_rows = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return S, B, L, H, G, D, C, K, off_by_one, empty_rate, empty_rows, dtype, seed


@settings(max_examples=50, deadline=None)
@given(small_case())
def test_matches_reference(case):
    S, B, L, H, G, D, C, K, off_by_one, empty_rate, empty_rows, dtype, seed = case
    q, k, v, indices, weights = make_inputs(S, B, L, H, G, D, C, K, empty_rate, empty_rows, seed, dtype)
    check_against_reference(q, k, v, indices, weights, S, off_by_one, TOL[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,D,G,H,K", [(64, 64, 16, 1, 8), (32, 128, 1, 4, 32), (128, 32, 3, 2, 12),
                                        (64, 128, 2, 2, 8), (128, 64, 80, 1, 4)])
@pytest.mark.parametrize("off_by_one", [False, True])
def test_matches_reference_large(dtype, S, D, G, H, K, off_by_one):
    q, k, v, indices, weights = make_inputs(S, 2, 300, H, G, D, 24, K, 0.1, True, S + D + G + K, dtype)
    check_against_reference(q, k, v, indices, weights, S, off_by_one, TOL[dtype])


@gpu
def test_skewed_selection_on_gpu():
    """Every token selects chunk 0: one chunk's pair list is split over many programs that add up atomically."""
    q, k, v, indices, weights = make_inputs(64, 1, 4096, 1, 16, 64, 8, 8, 0.0, False, 3, torch.bfloat16)
    indices[..., 0] = 0
    check_against_reference(q, k, v, indices, weights, 64, False, TOL[torch.bfloat16])


@pytest.mark.parametrize("B,L,H,K,C", [(2, 9, 3, 5, 4), (1, 40, 1, 12, 2), (3, 1, 2, 1, 7)])
@pytest.mark.parametrize("seg_len", [1, 3, 64])
def test_reverse_index_lists_every_pair_once_under_its_chunk(B, L, H, K, C, seg_len):
    g = torch.Generator().manual_seed(B * 100 + L)
    indices = torch.randint(0, C, (B, L, H, K), generator=g).masked_fill(torch.rand(B, L, H, K, generator=g) < 0.3, -1)
    wild = indices.masked_fill(torch.rand(B, L, H, K, generator=g) < 0.1, C)  # out of range: routed as empty slots
    wild = wild.masked_fill(torch.rand(B, L, H, K, generator=g) < 0.1, -3)
    indices = torch.where((wild >= 0) & (wild < C), wild, -1)
    pairs, offsets = route_pairs(wild.to(DEVICE), C)
    pairs, offsets = pairs.cpu(), offsets.cpu()
    n_valid = int((indices >= 0).sum())
    assert offsets.shape == (B * H * C + 1,) and int(offsets[0]) == 0 and int(offsets[-1]) == n_valid
    assert sorted(pairs.tolist()) == list(range(B * L * H * K))  # a permutation: each pair exactly once
    flat = indices.flatten()
    assert bool((flat[pairs[n_valid:]] == -1).all())  # empty slots after every chunk's list
    for key in range(B * H * C):
        b, h, c = key // C // H, key // C % H, key % C
        listed = pairs[offsets[key]:offsets[key + 1]]
        bb, hh = listed // K // H // L, listed // K % H
        assert bool((flat[listed] == c).all() and (bb == b).all() and (hh == h).all())
        assert int(listed.numel()) == int((indices[b, :, h] == c).sum())
        assert bool((listed[1:] > listed[:-1]).all())  # stable: in token order
    n_segs = min(B * H * C, n_valid) + -(-B * L * H * K // seg_len)
    key, start, end = split_segments(offsets.to(DEVICE), seg_len, n_segs).cpu()
    covered = torch.zeros(n_valid, dtype=torch.long)
    for kk, s, e in zip(key.tolist(), start.tolist(), end.tolist()):
        assert 0 <= e - s <= seg_len
        if e > s:
            assert offsets[kk] <= s and e <= offsets[kk + 1]
            covered[s:e] += 1
    assert bool((covered == 1).all())


@settings(max_examples=25, deadline=None)
@given(n_keys=st.integers(1, 2600), seg_len=st.integers(1, 40), spare=st.integers(0, 1500),
       skew=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_segments_cover_each_key_in_order(n_keys, seg_len, spare, skew, seed):
    """split_segments against a plain loop, over more keys and segments than one block of its kernel holds."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 3 * seg_len, (n_keys,), generator=g) * (torch.rand(n_keys, generator=g) < 0.7)
    if skew:  # one key holds most of the pairs, as when every token selects the first chunk
        counts[int(torch.randint(0, n_keys, (1,), generator=g))] += 50 * seg_len
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    expected = [(key, start, min(start + seg_len, int(offsets[key + 1])))
                for key in range(n_keys) for start in range(int(offsets[key]), int(offsets[key + 1]), seg_len)]
    n_segs = len(expected) + spare
    key, start, end = split_segments(offsets.to(DEVICE), seg_len, n_segs).cpu().tolist()
    assert list(zip(key, start, end))[:len(expected)] == expected
    assert key[len(expected):] == start[len(expected):] == end[len(expected):] == [0] * spare

def test_noncontiguous_and_expanded_inputs():
    """Views as the model passes them: q with a strided head dim, indices/weights shared by kv heads (stride 0)."""
    q, k, v, indices, weights = make_inputs(32, 1, 4, 2, 2, 32, 3, 5, 0.3, False, 1, torch.float32)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    shared_idx, shared_w = indices[:, :, :1].expand(-1, -1, 2, -1), weights[:, :, :1].expand(-1, -1, 2, -1)
    k_expanded, v_expanded = k[:, :, :1].expand(-1, -1, 2, -1), v[:, :, :1].expand(-1, -1, 2, -1)
    check_against_reference(q_t, k_expanded, v_expanded, shared_idx, shared_w, 32, False, TOL[torch.float32])


def test_gradients_for_some_inputs_only():
    q, k, v, indices, weights = make_inputs(32, 1, 3, 1, 2, 32, 2, 3, 0.0, False, 2, torch.float32)
    qg, wg = q.clone().requires_grad_(), weights.clone().requires_grad_()
    out = aggregate_triton(qg, k, v, indices, wg, 32, 0.2, True)
    dq, dw = torch.autograd.grad(out.square().sum(), (qg, wg))
    qr, wr = q.double().requires_grad_(), weights.double().requires_grad_()
    ref = aggregate_reference(qr, k.double(), v.double(), indices, wr, 32, 0.2, True)
    ref_dq, ref_dw = torch.autograd.grad(ref.square().sum(), (qr, wr))
    assert_close(dq, ref_dq, 1e-3, "dq")
    assert_close(dw, ref_dw, 1e-3, "dweights")


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_unchecked_out_of_range_indices_are_empty_slots(impl):
    """check_indices=False: an index outside [-1, C) reads nothing on every path, forward and backward."""
    q, k, v, indices, weights = make_inputs(32, 2, 5, 2, 2, 32, 3, 4, 0.2, False, 7, torch.float32)
    g = torch.Generator().manual_seed(8)
    wild = torch.tensor([-7, -2, 3, 4, 1000])[torch.randint(0, 5, indices.shape, generator=g)].to(indices.device)
    bad = torch.where(torch.rand(indices.shape, generator=g).to(indices.device) < 0.4, wild, indices)
    as_empty = torch.where((bad >= 0) & (bad < 3), bad, -1)
    inputs = [t.detach().requires_grad_() for t in (q, k, v, weights)]
    if impl == "reference":
        out = aggregate_reference(*inputs[:3], bad, inputs[3], 32, 0.2)
    else:
        out = hsa_aggregate(*inputs[:3], bad, inputs[3], 32, 0.2, backend=impl, check_indices=False)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, weights)]
    ref = aggregate_reference(*ref_inputs[:3], as_empty, ref_inputs[3], 32, 0.2)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.double())
    assert_close(out, ref, TOL[torch.float32], "o")
    for name, grad, ref_grad in zip(("dq", "dk", "dv", "dweights"), grads, ref_grads):
        assert_close(grad, ref_grad, TOL[torch.float32], name)
    assert bool((grads[3][as_empty < 0] == 0).all())
    with pytest.raises(IndexError, match="indices must lie in"):
        hsa_aggregate(q, k, v, bad, weights, 32, 0.2, backend=impl if impl != "reference" else "torch")

@pytest.mark.parametrize("L,C,K", [(0, 2, 3), (3, 0, 3), (3, 2, 0)])
def test_degenerate_shapes(L, C, K):
    q, k, v, indices, weights = make_inputs(32, 1, L, 1, 2, 32, max(C, 1), K, 0.0, False, 4, torch.float32)
    if C == 0:
        k, v, indices = k[:, :0], v[:, :0], indices.fill_(-1)
    out = aggregate_triton(q, k, v, indices, weights, 32, 0.2)
    assert out.shape == q.shape and bool((out == aggregate_reference(q, k, v, indices, weights, 32, 0.2)).all())


def test_hsa_aggregate_dispatches_to_triton():
    q, k, v, indices, weights = make_inputs(32, 1, 3, 1, 2, 32, 2, 3, 0.3, False, 6, torch.float32)
    with mock.patch.object(fused, "aggregate_triton", wraps=fused.aggregate_triton) as spy:
        out = hsa_aggregate(q, k, v, indices, weights, 32, backend="triton")
    assert spy.call_count == 1
    assert_close(out, aggregate_reference(q.double(), k.double(), v.double(), indices, weights.double(), 32,
                                          1 / math.sqrt(32)), 1e-3, "o")


def test_bad_inputs_raise_before_any_kernel():
    q, k, v, indices, weights = make_inputs(32, 1, 3, 1, 2, 32, 2, 3, 0.0, False, 5, torch.float32)
    with mock.patch.object(fused, "_Aggregate") as kernels:
        with pytest.raises(ValueError, match="head dim 16"):
            aggregate_triton(q[..., :16], k[..., :16], v[..., :16], indices, weights, 32, 0.2)
        with pytest.raises(ValueError, match="chunk_size 16"):
            aggregate_triton(q, k, v, indices, weights, 16, 0.2)
        with pytest.raises(TypeError, match="one dtype"):
            aggregate_triton(q, k.half(), v, indices, weights, 32, 0.2)
        with pytest.raises(TypeError, match="one dtype"):
            aggregate_triton(q.double(), k.double(), v.double(), indices, weights, 32, 0.2)
        with pytest.raises(TypeError, match="int32 or int64"):
            aggregate_triton(q, k, v, indices.to(torch.int16), weights, 32, 0.2)
        with pytest.raises(ValueError, match="chunk_size 16"):  # through hsa_aggregate, forced
            hsa_aggregate(q, k, v, indices, weights, 16, backend="triton")
        assert kernels.apply.call_count == 0
    # unsupported inputs under "auto" fall back to PyTorch
    assert hsa_aggregate(q.double(), k.double(), v.double(), indices, weights, 32).dtype == torch.float64


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    q, k, v, indices, weights = make_inputs(32, 1, 3, 1, 2, 32, 2, 3, 0.0, False, 5, torch.float32, device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        aggregate_triton(q, k, v, indices, weights, 32, 0.2)
    with pytest.raises(RuntimeError, match="CUDA"):
        hsa_aggregate(q, k, v, indices, weights, 32, backend="triton")
