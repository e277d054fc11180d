"""The Mamba2 mixer: document isolation, causality, the mamba_ssm parameter layout, backends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba.config import HSAHybridConfig
from ramba.layers.mamba2 import GatedRMSNorm, Mamba2
from ramba.ops.backends import MAMBA_KINDS, unusable
from ramba.ops.ssd import causal_conv1d, causal_conv1d_ref, ssd_scan
from ramba.ops.utils import as_doc_index
from ramba.ops.utils import starts_from_ids as doc_starts

HAS_CUDA_PATH = torch.cuda.is_available() and all(unusable(kind, "cuda") is None for kind in MAMBA_KINDS)


def make_config(**overrides) -> HSAHybridConfig:
    fields = dict(d_model=32, d_state=8, d_conv=4, expand=2, mamba_head_dim=8, n_groups=2, mamba_chunk_size=8,
                  mamba_backend="torch")
    return HSAHybridConfig(**{**fields, **overrides})


def make_layer(seed: int = 0, layer_idx: int = 0, **overrides) -> Mamba2:
    torch.manual_seed(seed)
    layer = Mamba2(make_config(**overrides), layer_idx=layer_idx).double()
    with torch.no_grad():  # non-trivial values everywhere, so every path shows up in the outputs
        for param in layer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return layer


def random_doc_ids(gen: torch.Generator, b: int, l: int, doc_prob: float) -> torch.Tensor:
    starts = torch.rand(b, l, generator=gen) < doc_prob
    return starts.long().cumsum(dim=1) * 7 + 3  # arbitrary (non-zero based) ids, equal within a run


@settings(max_examples=12, deadline=None)
@given(l=st.integers(1, 30), doc_prob=st.sampled_from([0.05, 0.2, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_documents_do_not_interact(l, doc_prob, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer()
    x = torch.randn(2, l, 32, generator=gen, dtype=torch.float64)
    doc_ids = random_doc_ids(gen, 2, l, doc_prob)
    out = layer(x, doc_ids)
    starts = doc_starts(doc_ids)
    for row in range(2):
        bounds = [t for t in range(l) if starts[row, t]] + [l]
        pieces = [layer(x[row:row + 1, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
        torch.testing.assert_close(out[row:row + 1], torch.cat(pieces, dim=1), rtol=1e-9, atol=1e-9)


def test_doc_ids_reusing_an_id_later_still_split():
    doc_ids = torch.tensor([[5, 5, 6, 6, 5, 5]])
    assert doc_starts(doc_ids).tolist() == [[True, False, True, False, True, False]]


@pytest.mark.parametrize("with_docs", [False, True])
def test_causal(with_docs):
    gen = torch.Generator().manual_seed(1)
    layer = make_layer()
    x = torch.randn(2, 27, 32, generator=gen, dtype=torch.float64)
    doc_ids = random_doc_ids(gen, 2, 27, 0.15) if with_docs else None
    out = layer(x, doc_ids)
    for t in (0, 6, 7, 8, 19, 25):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn(2, 26 - t, 32, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(layer(changed, doc_ids)[:, : t + 1], out[:, : t + 1], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(layer(changed, doc_ids)[:, t + 1:], out[:, t + 1:])


@pytest.mark.parametrize("overrides", [{}, dict(n_groups=1, d_conv=3, expand=1, mamba_head_dim=16)])
def test_state_dict_matches_mamba_ssm_layout(overrides):
    cfg = make_config(**overrides)
    d_inner = cfg.expand * cfg.d_model
    nheads = d_inner // cfg.mamba_head_dim
    conv_dim = d_inner + 2 * cfg.n_groups * cfg.d_state
    expected = {
        "in_proj.weight": (2 * d_inner + 2 * cfg.n_groups * cfg.d_state + nheads, cfg.d_model),
        "conv1d.weight": (conv_dim, 1, cfg.d_conv),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (cfg.d_model, d_inner),
    }
    state = Mamba2(cfg, layer_idx=3).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_initialisation_and_markers():
    torch.manual_seed(0)
    layer = Mamba2(make_config(d_model=128, mamba_head_dim=4), layer_idx=0)  # 64 heads
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    A = layer.A_log.exp()
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(layer.D, torch.ones_like(layer.D))
    assert torch.equal(layer.norm.weight, torch.ones_like(layer.norm.weight))
    for param in (layer.dt_bias, layer.A_log, layer.D):
        assert param._no_weight_decay


def test_gated_rmsnorm_normalises_each_group():
    gen = torch.Generator().manual_seed(0)
    y, z = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    norm = GatedRMSNorm(8, group_size=4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    gated = y * F.silu(z)
    halves = [h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() for h in gated.split(4, dim=-1)]
    torch.testing.assert_close(norm(y, z), torch.cat(halves, dim=-1) * torch.arange(1.0, 9.0))


def test_forward_shapes_dtypes_and_gradients():
    layer = make_layer().float()
    x = torch.randn(2, 13, 32, requires_grad=True)
    out = layer(x, torch.tensor([[0] * 6 + [1] * 7, [4] * 13]))
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert layer(torch.randn(1, 0, 32)).shape == (1, 0, 32)


def test_rejects_bad_inputs():
    layer = make_layer()
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, L, d_model"):
        layer(torch.randn(5, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="doc_ids must be"):
        layer(torch.randn(2, 5, 32, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        layer(torch.randn(2, 5, 32, dtype=torch.float64), torch.zeros(2, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_forced_cuda_backend_on_cpu_raises():
    layer = make_layer(mamba_backend="cuda")
    with pytest.raises((ImportError, RuntimeError), match="mamba_ssm|CUDA|cuda"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64))


def assert_close_in_scale(actual: torch.Tensor, expected: torch.Tensor, mean_tol: float, max_tol: float) -> None:
    """Errors measured against the mean magnitude of `expected` (the Triton kernels multiply in TF32)."""
    err = (actual.double() - expected.double()).abs()
    scale = expected.double().abs().mean()
    assert err.mean() <= mean_tol * scale and err.max() <= max_tol * scale, (err.mean() / scale, err.max() / scale)


@pytest.mark.skipif(not HAS_CUDA_PATH, reason="needs CUDA and mamba_ssm")
def test_cuda_path_matches_reference():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    b, l, h, p, g, n = 2, 300, 8, 16, 2, 32
    x, B, C = torch.randn(b, l, h, p, device=dev), torch.randn(b, l, g, n, device=dev), torch.randn(b, l, g, n, device=dev)
    dt = F.softplus(torch.randn(b, l, h, device=dev) - 2.0)
    A, D = -torch.rand(h, device=dev) * 4 - 0.5, torch.randn(h, device=dev)
    seq_start = torch.rand(b, l, device=dev) < 0.02
    expected = ssd_scan(x.double(), dt.double(), A.double(), B.double(), C.double(), 64, D.double(), seq_start)
    assert_close_in_scale(ssd_scan(x, dt, A, B, C, 64, D, seq_start, backend="cuda"), expected, 5e-3, 0.1)

    xc, weight, bias = torch.randn(b, l, 48, device=dev), torch.randn(48, 4, device=dev), torch.randn(48, device=dev)
    torch.testing.assert_close(causal_conv1d(xc, weight, bias, seq_start, backend="cuda"),
                               causal_conv1d_ref(xc, weight, bias, seq_start), rtol=1e-4, atol=1e-4)

    cuda_layer = make_layer(mamba_backend="cuda", d_model=64, mamba_chunk_size=64).float().to(dev)
    torch_layer = make_layer(mamba_backend="torch", d_model=64, mamba_chunk_size=64).double().to(dev)
    torch_layer.load_state_dict(cuda_layer.state_dict())
    u = torch.randn(b, l, 64, device=dev)
    doc_ids = seq_start.long().cumsum(dim=1)
    assert_close_in_scale(cuda_layer(u, doc_ids), torch_layer(u.double(), doc_ids), 5e-3, 0.1)


def test_compiled_backend_matches_reference():
    """The torch.compile'd ops (Mamba2's path on CUDA without mamba_ssm) give the reference's outputs and
    gradients, in a full forward with documents and in a cached prefill of segments continued by one token."""
    gen = torch.Generator().manual_seed(3)
    ref, fast = make_layer(), make_layer(mamba_backend="compile")
    x = torch.randn(2, 37, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    doc_ids = random_doc_ids(gen, 2, 37, 0.1)
    out_ref, out_fast = ref(x, doc_ids), fast(x, doc_ids)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-9, atol=1e-9)
    grad = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(out_ref, x, grad)
    (g_fast,) = torch.autograd.grad(out_fast, x, grad)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)

    def cached(layer: Mamba2) -> torch.Tensor:
        state = layer.allocate_inference_cache(2, torch.device("cpu"), torch.float64)
        with torch.no_grad():
            return torch.cat([layer(x[:, s:e].detach(), state=state) for s, e in [(0, 20), (20, 36), (36, 37)]], 1)

    with torch.no_grad():
        whole = ref(x.detach())  # one pass over the whole input, no documents
    torch.testing.assert_close(cached(fast), whole, rtol=1e-9, atol=1e-9)


def horizon_recurrence(layer: Mamba2, xs, raw_dt, B, C) -> torch.Tensor:
    """The SSM of a layer with a horizon H, token by token from its definition: h_t = exp(a_t) h_{t-1} +
    dt_t B_t x_t^T with a_t = (dt_t + 1 / (H |A|)) A, y_t = C_t h_t + D x_t (one group)."""
    A = -layer.A_log.exp()
    dt = F.softplus(raw_dt + layer.dt_bias)
    h = xs.new_zeros(xs.shape[0], xs.shape[2], xs.shape[3], B.shape[-1])
    ys = []
    for t in range(xs.shape[1]):
        decay = ((dt[:, t] + 1 / (layer.horizon * -A)) * A).exp()                        # [b, h]
        h = decay[..., None, None] * h + dt[:, t, :, None, None] * xs[:, t, ..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]) + layer.D[:, None] * xs[:, t])
    return torch.stack(ys, dim=1)


@settings(max_examples=8, deadline=None)
@given(l=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_horizon_scan_equals_its_recurrence(l, seed):
    """With mamba_horizon the decay is bounded and each token still enters the state with weight dt."""
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(seed % 7, mamba_horizon=5, n_groups=1)
    h, p, n = layer.nheads, layer.headdim, layer.d_state
    xs = torch.randn(2, l, h, p, generator=gen, dtype=torch.float64)
    raw = torch.randn(2, l, h, generator=gen, dtype=torch.float64) * 3 - 4  # slow heads: the bound matters
    B, C = (torch.randn(2, l, 1, n, generator=gen, dtype=torch.float64) for _ in range(2))
    xin, dt, A, D = layer._scan_inputs(xs, raw, torch.float64)
    y = layer._skip(ssd_scan(xin, dt, A, B, C, 8, D, backend="torch"), xs)
    with torch.no_grad():
        torch.testing.assert_close(y, horizon_recurrence(layer, xs, raw, B[:, :, 0], C[:, :, 0]), rtol=1e-9, atol=1e-9)
    assert ((dt * A).exp() <= math.exp(-1 / 5) + 1e-12).all()


def test_no_horizon_leaves_the_scan_inputs_as_mamba_ssm_has_them():
    gen = torch.Generator().manual_seed(3)
    layer = make_layer()
    xs = torch.randn(2, 9, layer.nheads, layer.headdim, generator=gen, dtype=torch.float64)
    raw = torch.randn(2, 9, layer.nheads, generator=gen, dtype=torch.float64)
    xin, dt, A, D = layer._scan_inputs(xs, raw, torch.float64)
    assert xin is xs and D is layer.D
    torch.testing.assert_close(dt, F.softplus(raw + layer.dt_bias))
    torch.testing.assert_close(A, -layer.A_log.exp())


@pytest.mark.parametrize("horizon", [0, 4])
def test_horizon_forgets_the_far_past(horizon):
    """An input 400 tokens back moves the last output of a layer without a horizon; with a horizon of 4
    tokens (decay at least e^-100 over 400 tokens, beyond the conv's reach) it does not."""
    gen = torch.Generator().manual_seed(4)
    layer = make_layer(mamba_horizon=horizon)
    with torch.no_grad():  # slow heads: the decay exp(dt A) of the softplus'd bias alone is close to one
        layer.dt_bias.fill_(-7.0)
    x = torch.randn(1, 420, 32, generator=gen, dtype=torch.float64)
    changed = x.clone()
    changed[:, :10] = torch.randn(1, 10, 32, generator=gen, dtype=torch.float64)
    diff = (layer(changed)[:, -1] - layer(x)[:, -1]).abs().max().item()
    if horizon:
        assert diff < 1e-12
    else:
        assert diff > 1e-4


@settings(max_examples=6, deadline=None)
@given(l=st.integers(2, 40), cut=st.integers(1, 39), seed=st.integers(0, 2**31 - 1))
def test_horizon_cached_path_equals_full_forward(l, cut, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(mamba_horizon=6)
    x = torch.randn(2, l, 32, generator=gen, dtype=torch.float64)
    cut = min(cut, l - 1)
    state = layer.allocate_inference_cache(2, x.device, x.dtype)
    pieces = [layer(x[:, :cut], state=state)] + [layer(x[:, t:t + 1], state=state) for t in range(cut, l)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), layer(x), rtol=1e-9, atol=1e-9)


def restarts_reference(doc_ids: torch.Tensor, reset: int, phase: int = 0) -> list[list[bool]]:
    """Where a reset layer's state restarts, by counting: each document's first token and its tokens phase,
    phase + R, phase + 2R, ..."""
    out = []
    for row in doc_ids.tolist():
        flags, offset = [], 0
        for t, doc in enumerate(row):
            offset = 0 if t == 0 or doc != row[t - 1] else offset + 1
            flags.append(offset == 0 or (offset >= phase and (offset - phase) % reset == 0))
        out.append(flags)
    return out


@settings(max_examples=15, deadline=None)
@given(l=st.integers(1, 40), reset=st.integers(1, 9), doc_prob=st.sampled_from([0.0, 0.1, 0.3]),
       layer_idx=st.integers(0, 1), stagger=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_reset_restarts_every_r_tokens_of_each_document(l, reset, doc_prob, layer_idx, stagger, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(layer_idx=layer_idx, mamba_reset=reset, n_lower_layers=2, mamba_reset_stagger=stagger)
    phase = reset // 2 if stagger and layer_idx == 1 else 0
    doc_ids = random_doc_ids(gen, 3, l, doc_prob)
    docs = as_doc_index(doc_ids if doc_prob else None)
    restart = layer._restarts(docs, 3, l, None, torch.device("cpu"))
    expected = restarts_reference(doc_ids if doc_prob else torch.zeros(3, l), reset, phase)
    if not doc_prob:  # without documents the first token is no restart (the state starts from zero anyway)
        expected = [[t % reset == phase for t in range(l)]] * 3
    assert restart.tolist() == expected
    assert layer._restarts(None, 3, l, torch.arange(100, 100 + l), torch.device("cpu")).tolist() == \
        [[(100 + t) % reset == phase for t in range(l)]] * 3


@settings(max_examples=10, deadline=None)
@given(l=st.integers(2, 45), reset=st.integers(3, 12), stagger=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_reset_layer_equals_chunk_by_chunk_scans(l, reset, stagger, seed):
    """A layer below the memory with mamba_reset R equals the same weights run in pieces from a zero SSM state,
    cut at R, 2R, ... (at R/2, 3R/2, ... for the second block when staggered), each piece's conv reading the
    inputs before it (the cached form of a layer without a reset)."""
    gen = torch.Generator().manual_seed(seed)
    layer = make_layer(seed % 5, layer_idx=1, mamba_reset=reset, n_lower_layers=2, mamba_reset_stagger=stagger)
    plain = make_layer(seed % 5, layer_idx=1, n_lower_layers=2)
    x = torch.randn(2, l, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        xbc = plain.in_proj(x)[..., plain.d_inner:plain.d_inner + plain.conv1d.in_channels]
        k = plain.conv1d.kernel_size[0] - 1
        pieces = []
        phase = reset // 2 if stagger else 0
        cuts = sorted({0, *range(phase, l, reset), l})
        for s, e in zip(cuts, cuts[1:]):
            state = plain.allocate_inference_cache(2, x.device, x.dtype)
            before = xbc[:, max(0, s - k):s]
            state.conv[:, k - before.shape[1]:] = before
            pieces.append(plain(x[:, s:e], state=state))
        torch.testing.assert_close(layer(x), torch.cat(pieces, dim=1), rtol=1e-9, atol=1e-9)


def test_reset_below_and_above_the_memory():
    config = make_config(n_lower_layers=2, n_upper_layers=2, mamba_reset=64)
    assert [Mamba2(config, i).reset for i in range(4)] == [64, 64, 0, 0]
    config = make_config(n_lower_layers=2, n_upper_layers=2, mamba_reset_upper=256)
    assert [Mamba2(config, i).reset for i in range(4)] == [0, 0, 256, 256]
    config = make_config(n_lower_layers=2, n_upper_layers=3, mamba_reset=64, mamba_reset_upper=256,
                         mamba_reset_stagger=True)
    assert [Mamba2(config, i).reset_phase for i in range(5)] == [0, 32, 0, 128, 0]
    with pytest.raises(ValueError, match="mamba_reset_stagger.*set one of them"):
        make_config(mamba_reset_stagger=True)
    with pytest.raises(ValueError, match="positions"):
        layer = Mamba2(config, 2)
        layer(torch.randn(1, 3, 32), state=layer.allocate_inference_cache(1, torch.device("cpu"), torch.float32))
