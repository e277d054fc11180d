"""The fused Triton retrieval kernel against `retrieve_reference` (Triton's interpreter on CPU, the GPU on CUDA)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba.ops.backends import pick
from ramba.ops import hsa_retrieve
from ramba.ops.retrieve import retrieve_reference, visible_chunks
from benchmarks.retrieve_tuning import GRID
from ramba.ops.retrieve import fused
from ramba.ops.retrieve.fused import plan, retrieve_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def examples(n: int) -> int:
    """Fewer hypothesis examples on the GPU, where each new shape of kernel compiles."""
    return n if DEVICE.type == "cpu" else max(10, n // 4)


def make_inputs(B, L, Hr, dr, C, S, seed, integer, dtype=torch.float32, shift=0):
    """qr [B, L, Hr, dr], landmarks [B, C, Hr, dr] on DEVICE; positions [B, L] = arange(L) + a per-row offset
    in [0, shift]. Integer-valued inputs make every score exact in fp32 and bf16, with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        qr = torch.randint(-2, 3, (B, L, Hr, dr), generator=g).float()
        landmarks = torch.randint(-2, 3, (B, C, Hr, dr), generator=g).float()
    else:
        qr = torch.randn(B, L, Hr, dr, generator=g)
        landmarks = torch.randn(B, C, Hr, dr, generator=g)
    positions = torch.arange(L).expand(B, L) + torch.randint(0, shift + 1, (B, 1), generator=g)
    return qr.to(DEVICE, dtype), landmarks.to(DEVICE, dtype), positions.to(DEVICE)


def full_scores(qr, landmarks, S, positions, window):
    """Every score [B, L, Hr, C] in float64 and the visibility mask [B, L, 1, C]."""
    scores = torch.einsum("blhd,bchd->blhc", qr.double(), landmarks.double()) / math.sqrt(qr.shape[-1])
    C = landmarks.shape[1]
    visible = torch.arange(C, device=qr.device) < visible_chunks(positions, S, C, window)[:, :, None, None]
    return scores, visible


def check_valid_selection(indices, scores, qr, landmarks, topk, S, positions, window, tol):
    """Visible, distinct, most recent first with -1 last, as many as can be, a top-k within tol, exact scores."""
    assert scores.dtype == torch.float32
    if landmarks.shape[1] == 0:
        assert bool((indices == -1).all()) and bool((scores == float("-inf")).all())
        return
    full, visible = full_scores(qr, landmarks, S, positions, window)
    n_visible = visible.sum(-1).expand(indices.shape[:3])
    assert torch.equal((indices >= 0).sum(-1), n_visible.clamp(max=topk))
    assert bool((indices[..., :-1] > indices[..., 1:]).where(indices[..., 1:] >= 0, True).all())
    picked = indices.clamp(min=0)
    assert bool(torch.gather(visible.expand_as(full), -1, picked).where(indices >= 0, True).all())
    want = torch.gather(full, -1, picked).masked_fill(indices < 0, float("-inf"))
    assert torch.allclose(scores.double(), want, atol=1e-4, rtol=1e-4)
    lowest = want.masked_fill(indices < 0, float("inf")).min(-1).values
    chosen = torch.zeros(*full.shape[:-1], full.shape[-1] + 1, dtype=torch.bool, device=full.device)
    chosen = chosen.scatter_(-1, indices.where(indices >= 0, full.shape[-1]), True)[..., :-1]
    rest = full.masked_fill(~visible | chosen, float("-inf")).max(-1).values
    assert bool((rest <= lowest + tol).all())


@st.composite
def case(draw):
    S = draw(st.sampled_from([16, 32, 48]))
    C = draw(st.sampled_from([0, 1, 2, 3, 7, 40, 63, 64, 65, 150, 300]))  # several tiles of 64 chunks too
    return dict(
        S=S, B=draw(st.integers(1, 2)), L=draw(st.integers(1, 80)), Hr=draw(st.integers(1, 2)),
        dr=draw(st.sampled_from([16, 32, 64, 128, 24])), C=C,
        topk=draw(st.sampled_from([1, 2, 3, 4, 8, 13])), window=draw(st.sampled_from([None, S, 3 * S])),
        shift=draw(st.sampled_from([0, 20 * S, C * S])),  # C * S: queries near the end of a long memory
        splits=draw(st.sampled_from([None, 1, 2, 5])),
        seed=draw(st.integers(0, 2**31 - 1)), ties=draw(st.booleans()),
    )


@settings(max_examples=examples(150), deadline=None)
@given(case(), st.sampled_from(DTYPES))
def test_exact_scores_give_the_reference_selection(c, dtype):
    qr, landmarks, positions = make_inputs(c["B"], c["L"], c["Hr"], c["dr"], c["C"], c["S"], c["seed"], True, dtype,
                                           c["shift"])
    if c["ties"]:  # a few distinct landmarks repeated: many equal scores, the more recent chunk must win
        landmarks = landmarks[:, torch.arange(c["C"], device=DEVICE) % 3]
    args = (qr, landmarks, c["topk"], c["S"], positions, c["window"])
    indices, scores = retrieve_triton(*args, splits=c["splits"])
    want_idx, want_scores = retrieve_reference(*args)
    assert indices.shape == want_idx.shape and indices.dtype == torch.int64
    assert torch.equal(indices, want_idx)
    assert torch.equal(scores, want_scores)


@settings(max_examples=examples(80), deadline=None)
@given(case(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_real_scores_give_a_valid_topk(c, dtype):
    qr, landmarks, positions = make_inputs(c["B"], c["L"], c["Hr"], c["dr"], c["C"], c["S"], c["seed"], False, dtype,
                                           c["shift"])
    indices, scores = retrieve_triton(qr, landmarks, c["topk"], c["S"], positions, c["window"], splits=c["splits"])
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    check_valid_selection(indices, scores, qr, landmarks, c["topk"], c["S"], positions, c["window"], tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,topk,dr", [(7, 5, 32), (40, 2, 16)])  # dense (C <= K * dr) and gathered
def test_gradients_match_the_reference(dtype, C, topk, dr):
    qr, landmarks, positions = make_inputs(2, 70, 2, dr, C, 16, 3, True, dtype, shift=500)
    weight = torch.randn(2, 70, 2, topk, device=DEVICE)
    grads = []
    for impl in (retrieve_triton, retrieve_reference):
        a, b = qr.clone().requires_grad_(), landmarks.clone().requires_grad_()
        indices, scores = impl(a, b, topk, 16, positions, None)
        (scores.masked_fill(indices < 0, 0.0) * weight).sum().backward()
        assert a.grad.dtype == dtype and b.grad.dtype == dtype
        grads.append((a.grad.float(), b.grad.float()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(*grads):
        assert torch.allclose(got, want, atol=tol, rtol=tol)


def test_no_chunk_and_empty_rows():
    qr, landmarks, positions = make_inputs(2, 10, 1, 16, 0, 16, 0, False)
    qr.requires_grad_()
    indices, scores = retrieve_triton(qr, landmarks, 4, 16, positions)
    assert bool((indices == -1).all()) and bool((scores == float("-inf")).all())
    # L < S: chunks exist but none is complete before any query
    qr, landmarks, positions = make_inputs(1, 10, 2, 32, 3, 16, 1, False)
    qr.requires_grad_()
    landmarks.requires_grad_()
    indices, scores = retrieve_triton(qr, landmarks, 4, 16, positions)
    assert bool((indices == -1).all())
    scores.masked_fill(indices < 0, 0.0).sum().backward()
    assert not qr.grad.any() and not landmarks.grad.any()


@settings(max_examples=examples(30), deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(100, 400), st.sampled_from([1, 8, 20]),
       st.booleans(), st.sampled_from([None, 2]), st.integers(0, 2**31 - 1))
def test_decoding_splits_the_chunks(L, B, C, topk, integer, splits, seed):
    S = 16
    qr, landmarks, _ = make_inputs(B, L, 1, 64, C, S, seed, integer)
    positions = (C * S - L + torch.arange(L, device=DEVICE)).expand(B, L)
    assert plan(B, L, 1, C, topk, DEVICE)[2] < C  # automatic: several ranges of chunks
    indices, scores = retrieve_triton(qr, landmarks, topk, S, positions, splits=splits)
    if integer:
        want_idx, want_scores = retrieve_reference(qr, landmarks, topk, S, positions)
        assert torch.equal(indices, want_idx) and torch.equal(scores, want_scores)
    else:
        check_valid_selection(indices, scores, qr, landmarks, topk, S, positions, None, 1e-4)


def test_gumbel_perturbs_only_the_selection():
    qr, landmarks, positions = make_inputs(2, 90, 2, 32, 40, 16, 5, False, shift=200)
    torch.manual_seed(0)
    indices, scores = retrieve_triton(qr, landmarks, 6, 16, positions, 48, gumbel=5.0)
    clean, _ = retrieve_triton(qr, landmarks, 6, 16, positions, 48)
    assert not torch.equal(indices, clean)
    # noise-free scores, visible chunks only; not a top-k of the clean scores
    check_valid_selection(indices, scores, qr, landmarks, 6, 16, positions, 48, float("inf"))
    # the noise depends on the seed, the query, the head and the chunk: not on how the chunks are split
    torch.manual_seed(0)
    again, _ = retrieve_triton(qr, landmarks, 6, 16, positions, 48, gumbel=5.0, splits=3)
    assert torch.equal(again, indices)
    # equal scores: the noise spreads the selection over the visible chunks instead of the 6 most recent
    flat = torch.ones_like(landmarks)
    recent, _ = retrieve_triton(qr, flat, 6, 16, positions, 48)
    noisy, _ = retrieve_triton(qr, flat, 6, 16, positions, 48, gumbel=1.0)
    many = visible_chunks(positions, 16, 40, 48)[..., None].expand(recent.shape[:3]) >= 12
    assert (noisy != recent).any(-1)[many].float().mean() > 0.5


def test_hsa_retrieve_dispatch():
    qr, landmarks, positions = make_inputs(1, 50, 2, 16, 5, 16, 2, True)
    want = retrieve_reference(qr, landmarks, 3, 16, positions)
    got = hsa_retrieve(qr, landmarks, 3, 16, positions, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert pick("ops", "auto", DEVICE) == ("triton" if DEVICE.type == "cuda" else "torch")
    # auto falls back to the reference for what the kernel does not run
    idx, _ = hsa_retrieve(qr.double(), landmarks.double(), 3, 16, positions)
    assert torch.equal(idx, want[0])


def test_bad_inputs_raise_before_any_kernel(monkeypatch):
    qr, landmarks, positions = make_inputs(1, 20, 1, 16, 3, 16, 0, False)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        retrieve_triton(qr.double(), landmarks.double(), 2, 16, positions)
    with pytest.raises(ValueError, match="topk"):
        retrieve_triton(qr, landmarks, 65, 16, positions)
    with pytest.raises(ValueError, match="head dim"):
        retrieve_triton(qr.new_zeros(1, 20, 1, 300), landmarks.new_zeros(1, 3, 1, 300), 2, 16, positions)
    with pytest.raises(ValueError, match="must agree"):
        retrieve_triton(qr, landmarks[..., :8], 2, 16, positions)
    with pytest.raises(ValueError, match="positions"):
        retrieve_triton(qr, landmarks, 2, 16, positions[:, :5])
    with pytest.raises(ValueError, match="gumbel"):
        retrieve_triton(qr, landmarks, 2, 16, positions, gumbel=-1.0)
    with pytest.raises(ValueError, match="splits"):
        retrieve_triton(qr, landmarks, 2, 16, positions, splits=0)
    with pytest.raises(ValueError, match="triton backend cannot run"):
        hsa_retrieve(qr.double(), landmarks.double(), 2, 16, positions, backend="triton")
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA tensors only"):
            retrieve_triton(qr, landmarks, 2, 16, positions)
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            hsa_retrieve(qr, landmarks, 2, 16, positions, backend="triton")


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dr,topk,window", [(128, 8, None), (64, 64, 512), (32, 13, None)])
def test_large_prefill(dtype, dr, topk, window):
    qr, landmarks, positions = make_inputs(2, 4096, 2, dr, 64, 64, 7, True, dtype, shift=1000)
    args = (qr, landmarks, topk, 64, positions, window)
    assert all(torch.equal(a, b) for a, b in zip(retrieve_triton(*args), retrieve_reference(*args)))
    qr, landmarks, positions = make_inputs(1, 2048, 4, dr, 3000, 64, 8, False, dtype, shift=3000 * 64)
    indices, scores = retrieve_triton(qr, landmarks, topk, 64, positions, window)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    check_valid_selection(indices, scores, qr, landmarks, topk, 64, positions, window, tol)


@cuda_only
def test_long_memory_stays_linear():
    """4K queries against 1M chunks (64M tokens): nothing of size [L, C] is ever allocated."""
    B, L, Hr, dr, C, S, K = 1, 4096, 1, 128, 2**20, 64, 8
    qr, landmarks, _ = make_inputs(B, L, Hr, dr, C, S, 9, False, torch.bfloat16)
    positions = (C * S - L + torch.arange(L, device=DEVICE)).expand(B, L)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    indices, scores = retrieve_triton(qr, landmarks, K, S, positions)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 256 * 2**20  # [L, C] fp32 would be 16 GiB
    rows = slice(L - 4, L)  # the reference on a few queries
    want_idx, want_scores = retrieve_reference(qr[:, rows], landmarks, K, S, positions[:, rows])
    check_valid_selection(indices[:, rows], scores[:, rows], qr[:, rows], landmarks, K, S, positions[:, rows], None,
                          0.05)
    assert (indices[:, rows] == want_idx).float().mean() > 0.9


@cuda_only
@pytest.mark.parametrize("B,L", [(1, 1), (8, 1), (4, 16)])
def test_large_decode(B, L):
    C, S = 2**18, 64
    qr, landmarks, _ = make_inputs(B, L, 2, 128, C, S, 10, True, torch.bfloat16)
    positions = (C * S - L + torch.arange(L, device=DEVICE)).expand(B, L)
    args = (qr, landmarks, 16, S, positions, None)
    assert all(torch.equal(a, b) for a, b in zip(retrieve_triton(*args), retrieve_reference(*args)))


TUNING = sorted({(g["block_m"], g["block_n"], g["insert"]) for g in GRID})  # what the interpreter can tell apart


@pytest.mark.parametrize("block_m,block_n,insert", TUNING)
@settings(max_examples=examples(12), deadline=None)
@given(c=case(), dtype=st.sampled_from(DTYPES))
def test_every_tuning_setting_gives_the_reference_selection(block_m, block_n, insert, c, dtype):
    """The tile shapes and insertion forms that benchmarks.retrieve_tuning sweeps select as the reference does,
    exact scores with many ties included."""
    qr, landmarks, positions = make_inputs(c["B"], c["L"], c["Hr"], c["dr"], c["C"], c["S"], c["seed"], True, dtype,
                                           c["shift"])
    if c["ties"]:
        landmarks = landmarks[:, torch.arange(c["C"], device=DEVICE) % 3]
    saved = dict(fused.LAUNCH)
    fused.LAUNCH.update(block_m=block_m, block_n=block_n, insert=insert)
    try:
        indices, scores = retrieve_triton(qr, landmarks, c["topk"], c["S"], positions, c["window"],
                                          splits=c["splits"])
    finally:
        fused.LAUNCH.update(saved)
    want_idx, want_scores = retrieve_reference(qr, landmarks, c["topk"], c["S"], positions, c["window"])
    assert torch.equal(indices, want_idx) and torch.equal(scores, want_scores)


def test_insert_auto_takes_images_only_for_long_memories(monkeypatch):
    """LAUNCH["insert"] = "auto" (the default) inserts through score images from IMAGES_FROM chunks on, where
    the sweep timed them faster, and through 64-bit keys below; a forced form holds at every length."""
    assert fused.LAUNCH["insert"] == "auto"
    assert not fused._images(fused.IMAGES_FROM - 1) and fused._images(fused.IMAGES_FROM)
    monkeypatch.setitem(fused.LAUNCH, "insert", "keys")
    assert not fused._images(fused.IMAGES_FROM * 4)
    monkeypatch.setitem(fused.LAUNCH, "insert", "images")
    assert fused._images(1)
    monkeypatch.setitem(fused.LAUNCH, "insert", "bits")
    with pytest.raises(ValueError, match="'keys', 'images' or 'auto'"):
        fused._images(64)


@pytest.mark.parametrize("S,window,splits", [(1, None, None), (2, 8, None), (1, None, 3)])
def test_rows_of_one_block_that_see_different_tiles(S, window, splits):
    """Queries of one block whose visible chunks end in different tiles: whole tiles are scanned without
    per-score masks only up to the chunks that every row sees."""
    L, C = 64, 260
    qr, landmarks, _ = make_inputs(1, L, 1, 32, C, S, 5, True)
    positions = (S * 40 + S * 3 * torch.arange(L, device=DEVICE))[None]  # from 40 to 229 chunks visible
    indices, scores = retrieve_triton(qr, landmarks, 8, S, positions, window, splits=splits)
    want_idx, want_scores = retrieve_reference(qr, landmarks, 8, S, positions, window)
    assert torch.equal(indices, want_idx) and torch.equal(scores, want_scores)


def test_visible_nan_and_inf_landmarks_rank_as_in_the_reference():
    """A NaN score ranks above all and an infinite one by its sign, in whole tiles and in the last, masked one."""
    g = torch.Generator().manual_seed(0)
    qr = torch.randn(1, 70, 1, 16, generator=g).to(DEVICE)
    landmarks = torch.randn(1, 150, 1, 16, generator=g)
    landmarks[0, 20] = float("nan")
    landmarks[0, 100, 0, 3] = float("inf")
    landmarks[0, 140, 0, 5] = float("-inf")
    landmarks = landmarks.to(DEVICE)
    positions = (150 * 16 + torch.arange(70, device=DEVICE))[None]
    indices, _ = retrieve_triton(qr, landmarks, 4, 16, positions)
    want, _ = retrieve_reference(qr, landmarks, 4, 16, positions)
    assert torch.equal(indices, want) and bool((indices == 20).any(-1).all())
