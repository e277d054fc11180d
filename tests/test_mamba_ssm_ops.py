"""The "cuda" backend of Mamba2's ops (ops/ssd/cuda.py) against ramba's references, in float64 on the CPU.

mamba_ssm's Triton SSD scan (with documents, an initial and a final state, and its backward), its state update
(one decoded token) and its gated RMSNorm; the causal-conv1d CUDA kernels (GPU only). Without CUDA, mamba_ssm's
kernels run through Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1): its
`torch.cuda.device` guards are made no-ops, the device it asks about has 4 multiprocessors, and its autotuned kernels pinned to one config, since the interpreter
has no driver to time configs with. Skipped where mamba_ssm's Triton modules do not import (it is not in the
test extra: its sdist needs a CUDA toolchain, see README's GPU section). Tolerances: relative norm error, 1e-4
in float32 on the CPU; on the GPU the kernels' dots run in tf32 (2e-2) and bf16 inputs get 3e-2.
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ramba.ops import backends
from ramba.ops.ssd import causal_conv1d, gated_rms_norm, ssd_scan
from ramba.ops.ssd import cuda as ssd_cuda
from ramba.ops.ssd.naive import causal_conv1d_ref, gated_rms_norm_ref, ssd_scan_ref, ssd_step
from ramba.ops.utils.index import seq_idx_from_starts

if backends.unusable("ssd", "cuda") is not None:
    pytest.skip(f"mamba_ssm: {backends.unusable('ssd', 'cuda')}", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 2e-2 if CUDA else 1e-4
MODULES = ("ssd_combined", "ssd_chunk_state", "ssd_state_passing", "ssd_bmm", "ssd_chunk_scan",
           "selective_state_update", "layernorm_gated")


@pytest.fixture(scope="module", autouse=True)
def interpretable():
    """On the CPU: mamba_ssm's device guards off, 4 streaming multiprocessors, its autotuned kernels on one config, CPU tensors let through."""
    if CUDA:
        yield
        return
    import triton
    from triton.runtime.autotuner import Autotuner
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        patch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=4))
        patch.setattr(ssd_cuda, "_require_cuda", lambda *args: None)
        for name in MODULES:
            for kernel in vars(importlib.import_module(f"mamba_ssm.ops.triton.{name}")).values():
                while isinstance(kernel, triton.runtime.KernelInterface):
                    if isinstance(kernel, Autotuner):
                        patch.setattr(kernel, "configs", kernel.configs[-1:])
                    kernel = getattr(kernel, "fn", None)
        yield


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def scan_inputs(seed: int, b: int, l: int, h: int, p: int, g: int, n: int, doc_rate: float):
    """Random SSD inputs (float32 on DEVICE): x, dt (after softplus), A < 0, B, C, D, document starts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 2 - 0.2
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    starts = torch.rand(b, l, generator=gen) < doc_rate
    return [t.to(DEVICE) for t in (x, dt, A, B, C, D)], starts.to(DEVICE)


SCAN_CASES = [  # (b, l, h, p, g, n, chunk, doc_rate)
    (2, 45, 4, 16, 2, 16, 16, 0.1),
    (1, 33, 2, 8, 1, 16, 8, 0.0),
    (2, 300, 8, 32, 2, 64, 64, 0.02) if CUDA else (1, 70, 4, 16, 4, 16, 32, 0.05),
]


@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_matches_reference_forward_and_backward(case):
    b, l, h, p, g, n, chunk, doc_rate = case
    inputs, starts = scan_inputs(sum(case[:6]), b, l, h, p, g, n, doc_rate)
    leaves = [t.clone().requires_grad_() for t in inputs]
    refs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    got = ssd_cuda.ssd_scan_cuda(*leaves[:5], chunk, leaves[5], seq_idx_from_starts(starts))
    want = ssd_scan_ref(*refs[:5], chunk, refs[5], starts.cpu())
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < TOL
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_grads = torch.autograd.grad(got, leaves, upstream.to(got))
    want_grads = torch.autograd.grad(want, refs, upstream)
    for name, g_got, g_want in zip("x dt A B C D".split(), got_grads, want_grads):
        assert rel_err(g_got, g_want) < TOL, name


def test_scan_continues_from_a_state_and_returns_the_next():
    """Two halves chained through the state give the whole scan; and each half matches the reference's."""
    inputs, _ = scan_inputs(5, 2, 40, 4, 16, 2, 16, 0.0)
    x, dt, A, B, C, D = inputs
    state0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    y1, s1 = ssd_cuda.ssd_scan_cuda(x[:, :25], dt[:, :25], A, B[:, :25], C[:, :25], 16, D, initial_state=state0,
                                    return_final_state=True)
    y2, s2 = ssd_cuda.ssd_scan_cuda(x[:, 25:], dt[:, 25:], A, B[:, 25:], C[:, 25:], 16, D, initial_state=s1,
                                    return_final_state=True)
    cpu = [t.double().cpu() for t in inputs]
    want, want_state = ssd_scan_ref(*cpu[:5], 16, cpu[5], initial_state=state0.double().cpu(),
                                    return_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), want) < TOL and rel_err(s2, want_state) < TOL
    assert s2.dtype == torch.float32 and s2.shape == (2, 4, 16, 16)


def test_step_matches_reference_and_leaves_its_state_alone():
    inputs, _ = scan_inputs(7, 3, 1, 4, 8, 2, 16, 0.0)
    x, dt, A, B, C, D = inputs
    state = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    before = state.clone()
    y, new = ssd_cuda.ssd_step_cuda(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
    want_y, want_state = ssd_step(*(t.double().cpu() for t in (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)))
    assert rel_err(y, want_y) < TOL and rel_err(new, want_state) < TOL
    assert torch.equal(state, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_norm_matches_reference(dtype):
    gen = torch.Generator().manual_seed(9)
    y, z = (torch.randn(2, 30, 64, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    weight = torch.randn(64, generator=gen).to(DEVICE).requires_grad_()
    got = ssd_cuda.gated_rms_norm_cuda(y, z, weight, 32, 1e-5)
    refs = [t.detach().double().cpu().requires_grad_() for t in (y, z, weight)]
    want = gated_rms_norm_ref(*refs, 32, 1e-5)
    tol = 3e-2 if dtype == torch.bfloat16 else TOL
    assert got.dtype == dtype and rel_err(got, want) < tol
    upstream = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g_got, g_want in zip(torch.autograd.grad(got, (y, z, weight), upstream.to(got)),
                             torch.autograd.grad(want, refs, upstream)):
        assert rel_err(g_got, g_want) < tol


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_entries_pick_mamba_ssm_on_cuda():
    """ssd_scan and gated_rms_norm with backend="cuda" on CUDA tensors (bf16) match the float64 reference."""
    inputs, starts = scan_inputs(10, 2, 200, 4, 32, 2, 32, 0.03)
    x, dt, A, B, C, D = inputs
    got = ssd_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 64, D, starts, backend="cuda")
    cpu = [t.double().cpu() for t in inputs]
    assert got.dtype == torch.bfloat16 and rel_err(got, ssd_scan_ref(*cpu[:5], 64, cpu[5], starts.cpu())) < 3e-2
    y, z, w = (torch.randn(4, 96, device="cuda") for _ in range(3))
    assert rel_err(gated_rms_norm(y, z, w[0], 48, 1e-5, backend="cuda"),
                   gated_rms_norm_ref(y.double(), z.double(), w[0].double(), 48, 1e-5)) < TOL


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("width,channels", [(4, 64), (2, 48), (3, 40), (4, 20)])  # c % 8 != 0: the reference
def test_conv_matches_reference(width, channels):
    """causal_conv1d with backend="cuda" (causal-conv1d, else fla-core) in full form with documents and in the
    cached form (an initial state in, the last width-1 inputs out), forward and backward of the full form."""
    if backends.unusable("conv", "cuda") is not None:
        pytest.skip(backends.unusable("conv", "cuda"))
    gen = torch.Generator().manual_seed(width * channels)
    x = torch.randn(2, 150, channels, generator=gen).cuda().requires_grad_()
    weight, bias = torch.randn(channels, width, generator=gen).cuda(), torch.randn(channels, generator=gen).cuda()
    starts = (torch.rand(2, 150, generator=gen) < 0.05).cuda()
    got = causal_conv1d(x, weight, bias, starts, backend="cuda")
    x_ref = x.detach().double().requires_grad_()
    want = causal_conv1d_ref(x_ref, weight.double(), bias.double(), starts)
    assert rel_err(got, want) < 1e-5
    upstream = torch.randn(want.shape, generator=gen, dtype=torch.float64).cuda()
    (g_got,), (g_want,) = torch.autograd.grad(got, x, upstream.float()), torch.autograd.grad(want, x_ref, upstream)
    assert rel_err(g_got, g_want) < 1e-5
    state = torch.randn(2, width - 1, channels, generator=gen).cuda()
    out, last = causal_conv1d(x.detach()[:, :7], weight, bias, initial_state=state, return_final_state=True,
                              backend="cuda")
    history = torch.cat([state, x.detach()[:, :7]], 1).double()
    assert rel_err(out, causal_conv1d_ref(history, weight.double(), bias.double())[:, width - 1:]) < 1e-5
    assert torch.equal(last, history[:, -(width - 1):].float())
