"""Sliding-window attention: reference vs a dense masked softmax, flex vs reference, the module."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba.config import HSAHybridConfig
from ramba.layers.swa import SlidingWindowAttention
from ramba.ops.backends import unusable
from ramba.ops.swa import (sliding_window_attention, swa_cached_blocked, swa_cached_reference, swa_flash, swa_flex,
                           swa_reference)
from ramba.ops.utils import DocIndex

HAS_FLASH = unusable("swa", "flash") is None


def dense_swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Full [L, L] attention with an explicit banded (and document) mask, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    length, q_heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_head = torch.arange(q_heads) // (q_heads // k.shape[2])
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
    t = torch.arange(length)[:, None]
    s = torch.arange(length)[None, :]
    allowed = ((t - s >= 0) & (t - s < window))[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhts,bshd->bthd", weights, v)


def random_docs(gen: torch.Generator, batch: int, length: int, rate: float) -> torch.Tensor:
    """Contiguous documents: a new one starts at each position with probability `rate`."""
    starts = torch.rand(batch, length, generator=gen) < rate
    return starts.long().cumsum(dim=1)


def random_qkv(gen: torch.Generator, batch: int, length: int, q_heads: int, kv_heads: int, dim: int,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(batch, length, q_heads, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, length, kv_heads, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, length, kv_heads, dim, generator=gen, dtype=dtype)
    return q, k, v


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(1, 45), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 2, 3]), dim=st.sampled_from([2, 4, 8]), window=st.integers(1, 50),
       block_size=st.one_of(st.none(), st.integers(1, 17)), doc_rate=st.sampled_from([None, 0.0, 0.1, 0.4]),
       seed=st.integers(0, 2**31 - 1))
def test_reference_matches_dense(batch, length, kv_heads, group, dim, window, block_size, doc_rate, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(gen, batch, length, kv_heads * group, kv_heads, dim)
    doc_ids = None if doc_rate is None else random_docs(gen, batch, length, doc_rate)
    grad_out = torch.randn(q.shape, generator=gen, dtype=q.dtype)
    outs, grads = [], []
    for fn in (lambda *a: swa_reference(*a, block_size=block_size), dense_swa):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*inputs, window, doc_ids)
        outs.append(out)
        grads.append(torch.autograd.grad(out, inputs, grad_out))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-10)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_keeps_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(gen, 2, 70, 4, 2, 8, dtype)
    out = swa_reference(q, k, v, 9, block_size=16)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), dense_swa(q, k, v, 9, None), rtol=tol, atol=tol)


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (x.requires_grad_() for x in random_qkv(gen, 1, 7, 2, 1, 4))
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda a, b, c: swa_reference(a, b, c, 3, doc_ids, block_size=2), (q, k, v))


def test_reference_empty():
    q = torch.randn(2, 0, 4, 8)
    k = torch.randn(2, 0, 2, 8)
    assert swa_reference(q, k, k, 4).shape == (2, 0, 4, 8)
    assert sliding_window_attention(q, k, k, 4).shape == (2, 0, 4, 8)


@pytest.mark.parametrize("batch,length,q_heads,kv_heads,dim,window,docs", [
    (1, 1, 1, 1, 16, 1, False),
    (2, 37, 4, 2, 16, 5, True),
    (2, 150, 4, 1, 16, 40, True),
    (1, 200, 2, 2, 32, 300, False),
])
def test_flex_matches_reference(batch, length, q_heads, kv_heads, dim, window, docs):
    gen = torch.Generator().manual_seed(length)
    q, k, v = random_qkv(gen, batch, length, q_heads, kv_heads, dim, torch.float32)
    doc_ids = random_docs(gen, batch, length, 0.05) if docs else None
    with torch.no_grad():
        got = swa_flex(q, k, v, window, doc_ids)
        want = swa_reference(q, k, v, window, doc_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [
    dict(q=(2, 8, 4)),
    dict(k=(2, 8, 3, 8), v=(2, 8, 3, 8)),
    dict(k=(1, 8, 2, 8), v=(1, 8, 2, 8)),
    dict(k=(2, 8, 2, 4), v=(2, 8, 2, 4)),
    dict(v=(2, 8, 1, 8)),
    dict(window=0),
    dict(doc_ids=(2, 7)),
])
def test_validation(bad):
    shapes = dict(q=(2, 8, 4, 8), k=(2, 8, 2, 8), v=(2, 8, 2, 8))
    shapes.update({name: bad[name] for name in ("q", "k", "v") if name in bad})
    q, k, v = (torch.randn(*shapes[name]) for name in ("q", "k", "v"))
    doc_ids = torch.zeros(*bad["doc_ids"], dtype=torch.long) if "doc_ids" in bad else None
    with pytest.raises(ValueError):
        sliding_window_attention(q, k, v, bad.get("window", 4), doc_ids)


def test_unknown_backend():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        sliding_window_attention(q, q, q, 4, backend="bogus")


def test_doc_cu_seqlens():
    doc_ids = torch.tensor([[3, 3, 4, 4, 4, 7], [1, 1, 1, 1, 1, 1], [2, 5, 5, 5, 2, 2]])
    docs = DocIndex(doc_ids)
    cu_seqlens, max_seqlen = docs.cu_seqlens, docs.max_seqlen
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 12, 13, 16, 18]
    assert max_seqlen == 6


def make_layer(backend: str = "torch", window: int = 5) -> SlidingWindowAttention:
    torch.manual_seed(0)
    config = HSAHybridConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, window=window,
                             swa_backend=backend)
    return SlidingWindowAttention(config, layer_idx=0)


def test_module_causal_and_local():
    layer = make_layer(window=5)
    x = torch.randn(2, 24, 32)
    y = x.clone()
    y[:, 10] += 1.0
    with torch.no_grad():
        diff = (layer(x) - layer(y)).abs().amax(dim=(0, 2))
    assert diff[:10].max() == 0 and diff[15:].max() == 0
    assert (diff[10:15] > 0).all()


def test_module_documents_match_separate_runs():
    layer = make_layer(window=6)
    x = torch.randn(2, 20, 32)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [5] * 20])
    with torch.no_grad():
        packed = layer(x, doc_ids)
        for b in range(2):
            for doc in doc_ids[b].unique():
                cols = (doc_ids[b] == doc).nonzero().flatten()
                alone = layer(x[b:b + 1, cols])
                torch.testing.assert_close(packed[b:b + 1, cols], alone, rtol=1e-5, atol=1e-5)


def test_module_flex_matches_torch():
    x = torch.randn(2, 30, 32)
    doc_ids = torch.tensor([[0] * 12 + [1] * 18, [0] * 30])
    with torch.no_grad():
        torch.testing.assert_close(make_layer("flex")(x, doc_ids), make_layer("torch")(x, doc_ids),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(HAS_FLASH, reason="flash_attn is installed")
def test_flash_without_package_says_so():
    x = torch.randn(1, 4, 32)
    with pytest.raises(ImportError, match="flash_attn"):
        make_layer("flash")(x)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ImportError, match="flash_attn"):
        sliding_window_attention(q, q, q, 2, backend="flash")


@pytest.mark.skipif(not (HAS_FLASH and torch.cuda.is_available()), reason="needs flash_attn and CUDA")
@pytest.mark.parametrize("docs", [False, True])
def test_flash_matches_reference(docs):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (x.cuda() for x in random_qkv(gen, 2, 300, 8, 2, 64, torch.bfloat16))
    doc_ids = random_docs(gen, 2, 300, 0.01).cuda() if docs else None
    got = swa_flash(q, k, v, 64, None if doc_ids is None else DocIndex(doc_ids))
    want = swa_reference(q.float(), k.float(), v.float(), 64, doc_ids)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_flex_block_mask_is_built_once_per_input():
    from ramba.ops.swa.flex import swa_block_mask

    docs = torch.zeros(1, 200, dtype=torch.long)
    first = swa_block_mask(16, 200, torch.device("cpu"), docs)
    assert swa_block_mask(16, 200, torch.device("cpu"), docs) is first
    assert swa_block_mask(16, 200, torch.device("cpu"), docs.clone()) is not first
    assert swa_block_mask(32, 200, torch.device("cpu"), docs) is not first


def dense_cached_swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     key_valid: torch.Tensor) -> torch.Tensor:
    """The last L of M positions against all M keys with an explicit [L, M] mask, in float64."""
    length, total = q.shape[1], k.shape[1]
    kv_head = torch.arange(q.shape[2]) // (q.shape[2] // k.shape[2])
    k, v = k.double()[:, :, kv_head], v.double()[:, :, kv_head]
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k) / math.sqrt(q.shape[3])
    t = torch.arange(total - length, total)[:, None]
    s = torch.arange(total)[None, :]
    allowed = (t - s >= 0) & (t - s < window) & (key_valid[:, None, :] | (t == s))[:, None]
    return torch.einsum("bhts,bshd->bthd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(1, 40), cached=st.integers(0, 40), kv_heads=st.integers(1, 2),
       group=st.sampled_from([1, 2, 3]), dim=st.sampled_from([2, 8]), window=st.integers(1, 50),
       block_size=st.one_of(st.none(), st.integers(1, 17)), empty_rate=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_cached_attention_matches_dense(batch, length, cached, kv_heads, group, dim, window, block_size, empty_rate,
                                        seed):
    """Both cached paths (the per-block loop and the one batched call) against the dense masked formula, with
    empty cache slots and padding (key_valid False) anywhere, all of them at empty_rate 1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, kv_heads * group, dim, generator=gen, dtype=torch.float64)
    _, k, v = random_qkv(gen, batch, cached + length, kv_heads * group, kv_heads, dim)
    key_valid = torch.rand(batch, cached + length, generator=gen) >= empty_rate
    want = dense_cached_swa(q, k, v, window, key_valid)
    for fn in (swa_cached_reference, swa_cached_blocked):
        torch.testing.assert_close(fn(q, k, v, window, key_valid, block_size), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_blocked_keeps_dtype(dtype):
    q, k, v = (torch.randn(1, 70, 2, 8, dtype=dtype) for _ in range(3))
    out = swa_cached_blocked(q, k, v, 16, torch.ones(1, 70, dtype=torch.bool))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), dense_cached_swa(q, k, v, 16, torch.ones(1, 70, dtype=torch.bool)),
                               rtol=2e-2, atol=2e-2)
