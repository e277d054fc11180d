"""The flash-linear-attention wrappers (ops/swa/fla.py, ops/ssd/fla.py) against ramba's references.

Without CUDA, fla's Triton kernels run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so shapes stay small. fla's autotuned conv kernels are pinned to
one config: the interpreter cannot time configs, and on a GPU autotuning every new shape takes minutes. On the
GPU fla's float32 dots run in tf32, so attention is compared by relative norm error there. Skipped when fla-core
is missing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():  # fla warns at import when no GPU backs Triton
    warnings.simplefilter("ignore")
    pytest.importorskip("fla")
    import fla.modules.causal_conv1d.ops as fla_conv_ops
    import triton

from ramba.ops.ssd import causal_conv1d, causal_conv1d_ref
from ramba.ops.ssd.fla import causal_conv1d_fla
from ramba.ops.swa import swa_reference
from ramba.ops.swa.fla import swa_fla
from ramba.ops.utils import DocIndex

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ATTN_TOL = {"rtol": 1e-4, "atol": 1e-5}
ATTN_NORM_TOL = 5e-3  # on the GPU, relative norm error: fla's float32 dots run in tf32
ZERO_TOL = 1e-2  # on the GPU, the largest entry where the exact result is all zeros
CONV_TOL = {"rtol": 1e-5, "atol": 1e-5}

# the interpreter's numpy warns on the fully masked rows the kernels compute and then discard
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def one_autotune_config():
    """Run fla's autotuned conv kernels with one config, the widest channel block: Triton's interpreter has no
    driver to time configs on (and pays per program), and on a GPU autotuning every new shape takes minutes."""
    from triton.runtime.autotuner import Autotuner
    with pytest.MonkeyPatch.context() as patch:
        for kernel in vars(fla_conv_ops).values():
            while isinstance(kernel, triton.runtime.KernelInterface):
                if isinstance(kernel, Autotuner):
                    patch.setattr(kernel, "configs", [max(kernel.configs, key=lambda c: c.kwargs.get("BD", 0))])
                kernel = getattr(kernel, "fn", None)
        yield


def doc_ids(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    """int64 [batch, length]: documents of the given lengths, cycled (row r starts at lengths[r]), cut at length."""
    rows = []
    for row in range(batch):
        ids, doc = [], 0
        while len(ids) < length:
            ids += [doc] * lengths[(row + doc) % len(lengths)]
            doc += 1
        rows.append(ids[:length])
    return torch.tensor(rows, dtype=torch.long).reshape(batch, length)


def grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Gradients of sum(output * random cotangent) for the inputs (zeros where an input is unused)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outputs)
    loss = loss + sum(0 * x.sum() for x in inputs)
    return list(torch.autograd.grad(loss, inputs))


def assert_attn_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Elementwise on the CPU; on the GPU by relative norm error, since tf32 leaves absolute noise where the exact
    gradient cancels to zero (a document's first token, which sees only itself, has dq = 0), and by the largest
    entry where every exact entry is zero (every token alone in its window)."""
    if not CUDA:
        torch.testing.assert_close(got, want, **ATTN_TOL)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.norm() == 0:  # dq, dk of queries that see only their own key: tf32 leaves noise near 1e-3
        assert got.abs().max() <= ZERO_TOL, f"largest entry {got.abs().max():.2e} where all are 0"
        return
    err = (got - want).norm() / want.norm()
    assert err <= ATTN_NORM_TOL, f"relative norm error {err:.2e} > {ATTN_NORM_TOL:.0e}"


def window_for(kind: str, length: int) -> int:
    return {"one": 1, "two": 2, "inside": max(1, length // 2 + 1), "beyond": length + 5}[kind]


# ---- sliding-window attention ----

@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(0, 40), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       head_dim=st.sampled_from([4, 8, 16]), window=st.sampled_from(["one", "two", "inside", "beyond"]),
       lengths=st.none() | st.lists(st.integers(1, 16), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
@example(batch=1, length=0, kv_heads=1, group=1, head_dim=8, window="one", lengths=None, seed=0)
@example(batch=2, length=1, kv_heads=1, group=2, head_dim=8, window="two", lengths=[1], seed=1)
@example(batch=2, length=23, kv_heads=2, group=2, head_dim=16, window="inside", lengths=[1, 1, 9, 4], seed=2)
@example(batch=1, length=150, kv_heads=1, group=2, head_dim=8, window="inside", lengths=[1, 70, 2, 60], seed=3)
@example(batch=1, length=150, kv_heads=1, group=1, head_dim=8, window="two", lengths=None, seed=4)
def test_swa_fla_matches_reference(batch, length, kv_heads, group, head_dim, window, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, kv_heads * group, head_dim, generator=gen)
    k, v = (torch.randn(batch, length, kv_heads, head_dim, generator=gen) for _ in range(2))
    q, k, v = (x.to(DEVICE).requires_grad_() for x in (q, k, v))
    ids = None if lengths is None else doc_ids(batch, length, lengths).to(DEVICE)
    docs = None if ids is None else DocIndex(ids)
    w = window_for(window, length)
    out = swa_fla(q, k, v, w, docs)
    ref = swa_reference(q, k, v, w, ids)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_attn_close(out, ref)
    if length:
        for got, want in zip(grads([out], [q, k, v], seed), grads([ref], [q, k, v], seed)):
            assert_attn_close(got, want)


def test_swa_fla_window_counts_the_token_itself():
    """window=1: each query sees only its own key, so the output is its own kv head's value (no off-by-one)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 8, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 9, 2, 8, generator=gen).to(DEVICE) for _ in range(2))
    assert_attn_close(swa_fla(q, k, v, 1), v.repeat_interleave(2, dim=2))
    # window=2: the first token of every document sees only itself
    docs = DocIndex(doc_ids(2, 9, [1, 3, 5]).to(DEVICE))
    out = swa_fla(q, k, v, 2, docs)
    first = docs.starts[..., None, None].expand_as(out)
    assert_attn_close(out[first], v.repeat_interleave(2, dim=2)[first])


def test_swa_fla_rejects_large_head_dims():
    q = torch.randn(1, 4, 1, 272)
    with pytest.raises(ValueError, match="256"):
        swa_fla(q, q, q, 2)


# ---- causal conv1d ----

@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(0, 40), channels=st.integers(1, 20), width=st.integers(1, 5),
       with_bias=st.booleans(), lengths=st.none() | st.lists(st.integers(1, 16), min_size=1, max_size=4),
       seed=st.integers(0, 2**31 - 1))
@example(batch=1, length=0, channels=3, width=4, with_bias=True, lengths=None, seed=0)
@example(batch=2, length=1, channels=3, width=4, with_bias=True, lengths=[1], seed=1)
@example(batch=2, length=30, channels=5, width=4, with_bias=False, lengths=[1, 1, 2, 7], seed=2)
@example(batch=2, length=150, channels=40, width=4, with_bias=True, lengths=[1, 70, 3, 60], seed=3)
def test_causal_conv1d_fla_matches_reference(batch, length, channels, width, with_bias, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(channels, width, generator=gen).to(DEVICE).requires_grad_()
    bias = torch.randn(channels, generator=gen).to(DEVICE).requires_grad_() if with_bias else None
    docs = None if lengths is None else DocIndex(doc_ids(batch, length, lengths).to(DEVICE))
    out = causal_conv1d_fla(x, weight, bias, docs)
    ref = causal_conv1d_ref(x, weight, bias, None if docs is None else docs.starts)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, **CONV_TOL)
    inputs = [t for t in (x, weight, bias) if t is not None]
    for got, want in zip(grads([out], inputs, seed), grads([ref], inputs, seed)):
        torch.testing.assert_close(got, want, **CONV_TOL)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), length=st.integers(0, 12), channels=st.integers(1, 20), width=st.integers(1, 5),
       with_bias=st.booleans(), with_state=st.booleans(), return_final_state=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(batch=2, length=0, channels=3, width=4, with_bias=True, with_state=True, return_final_state=True, seed=0)
@example(batch=2, length=0, channels=3, width=4, with_bias=True, with_state=False, return_final_state=True, seed=0)
@example(batch=2, length=1, channels=6, width=4, with_bias=True, with_state=True, return_final_state=True, seed=1)
@example(batch=1, length=2, channels=6, width=4, with_bias=False, with_state=True, return_final_state=True, seed=2)
@example(batch=1, length=2, channels=6, width=4, with_bias=False, with_state=False, return_final_state=True, seed=3)
@example(batch=2, length=150, channels=40, width=4, with_bias=True, with_state=True, return_final_state=True, seed=4)
def test_causal_conv1d_fla_cached_form_matches_reference(batch, length, channels, width, with_bias, with_state,
                                                         return_final_state, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(channels, width, generator=gen).to(DEVICE).requires_grad_()
    bias = torch.randn(channels, generator=gen).to(DEVICE).requires_grad_() if with_bias else None
    state = torch.randn(batch, width - 1, channels, generator=gen).to(DEVICE).requires_grad_() if with_state else None
    kwargs = {"initial_state": state, "return_final_state": return_final_state}
    got = causal_conv1d_fla(x, weight, bias, **kwargs)
    want = causal_conv1d(x, weight, bias, backend="torch", **kwargs)
    got, want = ([r] if isinstance(r, torch.Tensor) else list(r) for r in (got, want))
    assert len(got) == len(want) == 1 + return_final_state
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **CONV_TOL)
    inputs = [t for t in (x, weight, bias, state) if t is not None]
    for g, w in zip(grads(got, inputs, seed), grads(want, inputs, seed)):
        torch.testing.assert_close(g, w, **CONV_TOL)


def test_causal_conv1d_fla_segments_chain():
    """Three cached calls (prefill, one token, a short segment) give the full call's outputs and last inputs."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 20, 7, generator=gen).to(DEVICE)
    weight, bias = torch.randn(7, 4, generator=gen).to(DEVICE), torch.randn(7, generator=gen).to(DEVICE)
    state, outs = None, []
    for segment in x.split([12, 1, 7], dim=1):
        out, state = causal_conv1d_fla(segment, weight, bias, initial_state=state, return_final_state=True)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), causal_conv1d_ref(x, weight, bias), **CONV_TOL)
    torch.testing.assert_close(state, x[:, -3:])


def test_causal_conv1d_fla_errors():
    x, weight = torch.randn(1, 6, 3), torch.randn(3, 4)
    docs = DocIndex(doc_ids(1, 6, [2, 4]))
    with pytest.raises(ValueError, match="cached form"):
        causal_conv1d_fla(x, weight, docs=docs, initial_state=torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="cached form"):
        causal_conv1d_fla(x, weight, docs=docs, return_final_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_fla(x, weight, initial_state=torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_fla(x, torch.randn(4, 4))
