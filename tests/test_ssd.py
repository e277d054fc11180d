"""ssd_scan and causal_conv1d_ref against independent step-by-step references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ramba.ops.ssd import causal_conv1d_ref, ssd_scan
from ramba.ops.utils import seq_idx_from_starts

F64 = torch.float64


def recurrence(x, dt, A, B, C, D, seq_start):
    """The SSM one token at a time in float64: state = exp(dt*A) state + dt x ⊗ B, y = state · C + D x."""
    x, dt, A, B, C, D = (t.to(F64) for t in (x, dt, A, B, C, D))
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(heads_per_group, 2), C.repeat_interleave(heads_per_group, 2)
    state = torch.zeros(b, h, p, B.shape[3], dtype=F64)
    ys = []
    for t in range(l):
        if seq_start is not None:
            state = state * (~seq_start[:, t]).to(F64)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((state * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1) if ys else torch.zeros(b, 0, h, p, dtype=F64)


def make_inputs(b, l, h, p, g, n, seed, doc_prob=0.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=F64)
    dt = F.softplus(torch.randn(b, l, h, generator=gen, dtype=F64) - 1.0)
    A = -torch.exp(torch.rand(h, generator=gen, dtype=F64) * 2.0 - 1.0)
    B = torch.randn(b, l, g, n, generator=gen, dtype=F64)
    C = torch.randn(b, l, g, n, generator=gen, dtype=F64)
    D = torch.randn(h, generator=gen, dtype=F64)
    seq_start = torch.rand(b, l, generator=gen) < doc_prob if doc_prob > 0 else None
    return x.to(dtype), dt.to(dtype), A, B.to(dtype), C.to(dtype), D, seq_start


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(0, 40), g=st.integers(1, 2), heads_per_group=st.integers(1, 3),
       p=st.integers(1, 4), n=st.integers(1, 5), chunk_size=st.sampled_from([1, 3, 4, 8, 16, 64]),
       doc_prob=st.sampled_from([0.0, 0.1, 0.4]), seed=st.integers(0, 2**31 - 1))
@example(b=1, l=0, g=1, heads_per_group=1, p=2, n=3, chunk_size=4, doc_prob=0.0, seed=0)
@example(b=2, l=1, g=2, heads_per_group=2, p=3, n=2, chunk_size=4, doc_prob=0.4, seed=1)
@example(b=2, l=5, g=1, heads_per_group=3, p=2, n=4, chunk_size=8, doc_prob=0.4, seed=2)
@example(b=2, l=37, g=2, heads_per_group=2, p=3, n=5, chunk_size=8, doc_prob=0.1, seed=3)
def test_ssd_scan_matches_recurrence(b, l, g, heads_per_group, p, n, chunk_size, doc_prob, seed):
    x, dt, A, B, C, D, seq_start = make_inputs(b, l, g * heads_per_group, p, g, n, seed, doc_prob)
    y = ssd_scan(x, dt, A, B, C, chunk_size, D=D, seq_start=seq_start)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, recurrence(x, dt, A, B, C, D, seq_start), rtol=1e-9, atol=1e-9)


def test_ssd_scan_without_skip_and_float32():
    x, dt, A, B, C, D, seq_start = make_inputs(2, 21, 4, 3, 2, 4, seed=5, doc_prob=0.2, dtype=torch.float32)
    y = ssd_scan(x, dt, A.float(), B, C, 8, seq_start=seq_start)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.to(F64), recurrence(x, dt, A, B, C, torch.zeros_like(D), seq_start),
                               rtol=1e-4, atol=1e-4)


def test_ssd_scan_gradcheck():
    x, dt, A, B, C, D, seq_start = make_inputs(1, 7, 2, 2, 1, 3, seed=7, doc_prob=0.3)
    inputs = tuple(t.clone().requires_grad_() for t in (x, dt, A, B, C, D))
    assert torch.autograd.gradcheck(
        lambda x, dt, A, B, C, D: ssd_scan(x, dt, A, B, C, 3, D=D, seq_start=seq_start), inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_ssd_scan_low_precision(dtype, tol):
    x, dt, A, B, C, D, seq_start = make_inputs(2, 45, 4, 8, 2, 16, seed=11, doc_prob=0.05, dtype=dtype)
    y = ssd_scan(x, dt, A, B, C, 16, D=D, seq_start=seq_start)
    assert y.dtype == dtype
    expected = recurrence(x, dt, A, B, C, D, seq_start)
    torch.testing.assert_close(y.to(F64), expected, rtol=tol, atol=tol * expected.abs().mean().item())


def test_ssd_scan_rejects_bad_shapes():
    x, dt, A, B, C, D, _ = make_inputs(1, 6, 3, 2, 1, 2, seed=0)
    with pytest.raises(ValueError, match="dt"):
        ssd_scan(x, dt[..., :2], A, B, C, 4)
    with pytest.raises(ValueError, match="multiple of the group count"):
        ssd_scan(x, dt, A, B.expand(1, 6, 2, 2), C.expand(1, 6, 2, 2), 4)
    with pytest.raises(ValueError, match="seq_start"):
        ssd_scan(x, dt, A, B, C, 4, seq_start=torch.zeros(1, 5, dtype=torch.bool))


def conv_reference(x, weight, bias):
    """torch's depthwise conv1d with k - 1 zeros of left padding; x: [b, l, c]."""
    k = weight.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=k - 1, groups=x.shape[2])
    return out[..., : x.shape[1]].transpose(1, 2)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 20), c=st.integers(1, 6), k=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_causal_conv1d_matches_conv1d(b, l, c, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x, weight, bias = (torch.randn(*s, generator=gen, dtype=F64) for s in ((b, l, c), (c, k), (c,)))
    torch.testing.assert_close(causal_conv1d_ref(x, weight, bias), conv_reference(x, weight, bias))
    torch.testing.assert_close(causal_conv1d_ref(x, weight), conv_reference(x, weight, None))


@settings(max_examples=30, deadline=None)
@given(l=st.integers(1, 24), c=st.integers(1, 4), k=st.integers(1, 5), doc_prob=st.sampled_from([0.1, 0.3, 0.7]),
       seed=st.integers(0, 2**31 - 1))
def test_causal_conv1d_documents_are_separate(l, c, k, doc_prob, seed):
    gen = torch.Generator().manual_seed(seed)
    x, weight, bias = (torch.randn(*s, generator=gen, dtype=F64) for s in ((2, l, c), (c, k), (c,)))
    seq_start = torch.rand(2, l, generator=gen) < doc_prob
    out = causal_conv1d_ref(x, weight, bias, seq_start)
    for row in range(2):
        bounds = [0] + [t for t in range(1, l) if seq_start[row, t]] + [l]
        for s, e in zip(bounds[:-1], bounds[1:]):
            torch.testing.assert_close(out[row, s:e], conv_reference(x[row:row + 1, s:e], weight, bias)[0])


def test_causal_conv1d_empty_and_low_precision():
    assert causal_conv1d_ref(torch.randn(2, 0, 3), torch.randn(3, 4), torch.randn(3)).shape == (2, 0, 3)
    x, weight, bias = torch.randn(2, 9, 5).bfloat16(), torch.randn(5, 4), torch.randn(5)
    out = causal_conv1d_ref(x, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), conv_reference(x.float(), weight, bias), rtol=0.02, atol=0.05)


def test_seq_idx_from_starts():
    starts = torch.tensor([[True, False, True, True, False], [False, False, False, True, False]])
    seq_idx = seq_idx_from_starts(starts)
    assert seq_idx.dtype == torch.int32 and seq_idx.is_contiguous()
    assert seq_idx.tolist() == [[1, 1, 2, 3, 3], [0, 0, 0, 1, 1]]
    assert seq_idx_from_starts(None) is None


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 30), h=st.integers(1, 3), group=st.integers(1, 8),
       cut_prob=st.sampled_from([0.0, 0.2, 0.7]), seed=st.integers(0, 2**31 - 1))
def test_state_passing_across_groups_matches_the_chunk_loop(b, c, h, group, cut_prob, seed):
    """The closed form within groups of chunks plus the loop across groups, against one chunk at a time."""
    from ramba.ops.ssd.naive import _pass_states
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(b, c, h, 2, 3, generator=gen, dtype=F64)
    log_decay = -torch.rand(b, c, h, generator=gen, dtype=F64) * 2
    carries = torch.rand(b, c, generator=gen) >= cut_prob
    state = torch.randn(b, h, 2, 3, generator=gen, dtype=F64)
    entering, final = _pass_states(states, log_decay, carries, state, group)
    for i in range(c):
        torch.testing.assert_close(entering[:, i], state, rtol=1e-12, atol=1e-12)
        state = (log_decay[:, i].exp() * carries[:, i, None])[..., None, None] * state + states[:, i]
    torch.testing.assert_close(final, state, rtol=1e-12, atol=1e-12)
