"""Memory a token does not read never reaches its output or its gradients, whatever that memory holds.

NaN or +-inf planted in chunks a token did not select (hsa_aggregate), or in landmarks of chunks a token cannot
see (hsa_retrieve), and NaN in the weights of empty slots, must leave that token's output and gradients exactly
as they are with clean memory, on every backend: the PyTorch reference, the dense formulation and the Triton
kernels (on CPU through TRITON_INTERPRET=1, see tests/conftest.py).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba.ops import hsa_aggregate, hsa_retrieve
from ramba.ops.aggregate import aggregate_dense, aggregate_reference
from ramba.ops.retrieve import retrieve_reference

triton = pytest.importorskip("triton")
from ramba.ops.aggregate.fused import aggregate_triton  # noqa: E402
from ramba.ops.retrieve.fused import retrieve_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BAD = [float("nan"), float("inf"), float("-inf")]


def _triton_aggregate(q, k, v, indices, weights, S, scale, off_by_one):
    return aggregate_triton(q, k, v, indices, weights, S, scale, off_by_one)


def _auto_aggregate(q, k, v, indices, weights, S, scale, off_by_one):
    return hsa_aggregate(q, k, v, indices, weights, S, scale, off_by_one, check_indices=False)


AGGREGATE = {"reference": aggregate_reference, "dense": aggregate_dense, "triton": _triton_aggregate,
             "hsa_aggregate": _auto_aggregate}


@st.composite
def aggregate_case(draw):
    """Shapes the Triton kernel takes (D, S in 32/64/128), a chunk to poison and what to plant where."""
    return dict(
        B=draw(st.integers(1, 2)), L=draw(st.integers(1, 5)), H=draw(st.integers(1, 2)), G=draw(st.integers(1, 2)),
        C=draw(st.integers(1, 4)), K=draw(st.integers(1, 3)), empty_rate=draw(st.sampled_from([0.0, 0.4])),
        bad=draw(st.sampled_from(BAD)), where=draw(st.sampled_from(["k", "v", "both"])),
        off_by_one=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _aggregate_inputs(c):
    S, D = 32, 32
    g = torch.Generator().manual_seed(c["seed"])
    B, L, H, G, C, K = (c[n] for n in "BLHGCK")
    q = torch.randn(B, L, H * G, D, generator=g)
    k = torch.randn(B, C * S, H, D, generator=g)
    v = torch.randn(B, C * S, H, D, generator=g)
    indices = torch.randint(0, C, (B, L, H, K), generator=g)
    indices = indices.masked_fill(torch.rand(B, L, H, K, generator=g) < c["empty_rate"], -1)
    weights = torch.rand(B, L, H, K, generator=g)
    return S, D, q, k, v, indices, weights, g


def _run(impl, q, k, v, indices, weights, S, off_by_one, head_mask):
    """Output and the gradients of q, k, v, weights of sum(out * head_mask * fixed random) (float32 CPU)."""
    leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v, weights)]
    out = impl(leaves[0], leaves[1], leaves[2], indices.to(DEVICE), leaves[3], S, 1 / math.sqrt(q.shape[-1]),
               off_by_one)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (torch.where(head_mask.to(DEVICE), out * probe, 0.0)).sum().backward()
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("backend", list(AGGREGATE))
@settings(max_examples=12, deadline=None)
@given(case=aggregate_case())
def test_aggregate_unselected_memory_never_reaches_outputs(backend, case):
    S, D, q, k, v, indices, weights, g = _aggregate_inputs(case)
    B, L, H, G, C, K = (case[n] for n in "BLHGCK")
    bad_chunk = int(torch.randint(0, C, (), generator=g))
    token = int(torch.randint(0, S, (), generator=g))
    dim = int(torch.randint(0, D, (), generator=g))
    k_bad, v_bad = k.clone(), v.clone()
    row = bad_chunk * S + token
    if case["where"] in ("k", "both"):
        k_bad[:, row, :, dim] = case["bad"]
    if case["where"] in ("v", "both"):
        v_bad[:, row, :, dim] = case["bad"]
    w_bad = weights.masked_fill(indices < 0, float("nan"))  # weights of empty slots are never read
    # (b, t, kv head) that did not select the poisoned chunk, widened to the query heads [B, L, HQ, 1]
    clean_rows = ~(indices == bad_chunk).any(-1)
    head_mask = clean_rows.repeat_interleave(G, dim=2)[..., None]
    impl = AGGREGATE[backend]
    want = _run(impl, q, k, v, indices, weights, S, case["off_by_one"], head_mask)
    got = _run(impl, q, k_bad, v_bad, indices, w_bad, S, case["off_by_one"], head_mask)
    untouched = torch.ones(B, C * S, H, 1, dtype=torch.bool)
    untouched[:, bad_chunk * S:(bad_chunk + 1) * S] = False
    checks = {"out": head_mask.expand_as(want[0]), "dq": head_mask.expand_as(want[1]),
              "dk": untouched.expand_as(want[2]), "dv": untouched.expand_as(want[3]),
              "dweights": clean_rows[..., None].expand_as(want[4]) & (indices >= 0)}
    for (name, mask), a, b in zip(checks.items(), got, want):
        assert torch.isfinite(a[mask]).all(), f"{backend}: {name} of tokens that never read the poisoned chunk"
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-6, msg=f"{backend}: {name}")
    empty_grad = got[4][indices < 0]
    assert bool((empty_grad == 0).all()), f"{backend}: empty slots got a weight gradient"


def test_aggregate_dense_path_with_one_nan_chunk():
    """The issue's case: one NaN in a chunk no token selects made every output of the dense path NaN."""
    S, D, q, k, v, indices, weights, _ = _aggregate_inputs(dict(B=1, L=4, H=1, G=1, C=2, K=1, empty_rate=0.0,
                                                                seed=3))
    indices = torch.zeros_like(indices)
    indices[:, 0] = -1  # the first token sees no chunk at all
    k[:, S + 3, 0, 5] = float("nan")  # chunk 1, selected by no one
    for backend in ("torch", "triton"):
        out = hsa_aggregate(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), indices.to(DEVICE), weights.to(DEVICE), S,
                            backend=backend)
        assert torch.isfinite(out).all(), backend
        assert bool((out[:, 0] == 0).all()), backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_aggregate_selected_nonfinite_memory_shows(backend):
    """A token that does read a NaN gets a non-finite output: nothing hides it."""
    S, D, q, k, v, indices, weights, _ = _aggregate_inputs(dict(B=1, L=3, H=1, G=2, C=2, K=2, empty_rate=0.0,
                                                                seed=4))
    indices[:, :, :, :] = torch.tensor([0, 1])
    v[:, 2, 0, 1] = float("nan")
    out = hsa_aggregate(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), indices.to(DEVICE), weights.to(DEVICE), S,
                        backend=backend)
    assert bool(out[..., 1].isnan().all()), backend


def _triton_retrieve(qr, landmarks, topk, S, positions, window):
    return retrieve_triton(qr, landmarks, topk, S, positions, window)


RETRIEVE = {"reference": retrieve_reference, "triton": _triton_retrieve}


@pytest.mark.parametrize("backend", list(RETRIEVE))
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), L=st.integers(1, 70), Hr=st.integers(1, 2), C=st.integers(1, 5),
       topk=st.integers(1, 4), window=st.sampled_from([None, 32]), bad=st.sampled_from(BAD),
       seed=st.integers(0, 2**31 - 1))
def test_retrieve_invisible_landmarks_never_reach_outputs(backend, B, L, Hr, C, topk, window, bad, seed):
    S, dr = 16, 8
    g = torch.Generator().manual_seed(seed)
    qr = torch.randn(B, L, Hr, dr, generator=g)
    landmarks = torch.randn(B, C, Hr, dr, generator=g)
    positions = torch.arange(L).expand(B, L).contiguous()
    bad_chunk = int(torch.randint(0, C, (), generator=g))
    poisoned = landmarks.clone()
    poisoned[:, bad_chunk, :, int(torch.randint(0, dr, (), generator=g))] = bad
    # tokens that cannot see the poisoned chunk: the chunk ends after them (or after their window's start)
    limit = positions if window is None else positions - window + S
    blind = ((bad_chunk + 1) * S > limit)[:, :, None, None]  # [B, L, 1, 1]

    def run(lmk):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (qr, lmk)]
        indices, scores = RETRIEVE[backend](leaves[0], leaves[1], topk, S, positions.to(DEVICE), window)
        probe = torch.randn(scores.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        live = blind.to(DEVICE) & (indices >= 0)
        torch.where(live, scores * probe, 0.0).sum().backward()
        return indices.cpu(), scores.detach().cpu(), leaves[0].grad.cpu(), leaves[1].grad.cpu()

    want, got = run(landmarks), run(poisoned)
    rows = blind[..., 0].expand(B, L, Hr)
    assert torch.equal(got[0][rows], want[0][rows]), f"{backend}: indices"
    assert torch.equal(got[1][rows], want[1][rows]), f"{backend}: scores"
    assert torch.isfinite(got[2][rows]).all(), f"{backend}: qr gradient of tokens that cannot see the NaN"
    torch.testing.assert_close(got[2][rows], want[2][rows], rtol=1e-5, atol=1e-6, msg=f"{backend}: dqr")
    others = torch.ones(C, dtype=torch.bool)
    others[bad_chunk] = False
    torch.testing.assert_close(got[3][:, others], want[3][:, others], rtol=1e-5, atol=1e-6,
                               msg=f"{backend}: dlandmarks")


def test_hsa_retrieve_nan_landmark_of_a_later_chunk():
    """hsa_retrieve (auto backend): a NaN landmark in the last chunk leaves earlier tokens' gradients finite."""
    g = torch.Generator().manual_seed(0)
    qr = torch.randn(1, 64, 1, 8, generator=g, requires_grad=True)
    landmarks = torch.randn(1, 4, 1, 8, generator=g)
    landmarks[0, 3, 0, 0] = float("nan")
    landmarks.requires_grad_()
    indices, scores = hsa_retrieve(qr, landmarks, 2, 16)
    torch.where(indices >= 0, scores, 0.0).sum().backward()
    assert torch.isfinite(scores[indices >= 0]).all()
    assert torch.isfinite(qr.grad).all() and torch.isfinite(landmarks.grad[:, :3]).all()
