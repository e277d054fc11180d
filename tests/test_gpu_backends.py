"""Every fast backend of the local mixers on a CUDA GPU, against the PyTorch references.

Each test skips, with the reason `ramba.ops.backends.unusable` gives, when the backend it exercises cannot run
here (the whole file skips without a CUDA GPU). What is compared:

1. `sliding_window_attention` on "flash", "flex" and "fla", forward and backward (the gradients of q, k, v for
   a random upstream gradient), against `swa_reference` run in float64 on the CPU on the same bf16-rounded
   inputs: GQA (8 query heads, 2 kv heads), head dim 64, L = 1000 (not a multiple of the kernels' 128-token
   tiles), windows 1 (the case an off-by-one in the window cannot pass), 100, 512 and one longer than L, with
   and without packed documents; float16 once on flash.
2. The cached form on flash (L queries against M > L keys, the cached keys first, every key real) against
   `swa_cached_reference`, for windows shorter and longer than the M - L cached keys, and one query alone.
3. float32 on flash: backend="flash" raises ValueError; backend="auto" passes it to the next backend.
4. The whole tiny model per mixer backend (SWA: flash, flex, fla; Mamba2: cuda, compile): float32 weights
   under bf16 autocast, packed documents; the logits and the loss gradients against the same weights with
   every backend "torch", in float32 without autocast.
5. Segment-wise inference through a cache (prefill segments of 250 and 447 tokens, then 4 decoded tokens)
   against one full forward of that float32 reference over the whole input, segment by segment.

Errors are relative norms, ||got - want|| / ||want||. Tolerances:
- bf16 op outputs and gradients: 2e-2. bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 ~ 2e-3); the kernels
  round the probabilities and the output to bf16, which gives errors of 3e-3 to 6e-3 here. float16: 1e-2.
- float32 where a kernel may run its dots in tf32 (fla, mamba_ssm's Triton scan): 5e-3 for one op, 1e-2
  for the model.
- model logits under bf16 autocast: 3e-2; loss gradients: 5e-2, over all parameters together and for each
  mixer parameter alone (bf16 autocast alone, with the torch backends on the CPU, gives up to 1e-2 on the
  logits and 2e-2 on a mixer parameter's gradient; the retrieval parameters, up to 4e-2, are left to the
  aggregate).
- segment-wise inference in bfloat16 weights (flash): 3e-2 per segment; in float32 weights: 1e-2.
A gradient whose reference is zero (dq and dk with window 1: each query sees only its own key) is measured
against 1e-3 of the upstream gradient's norm instead.

Cost: few fixed shapes, since every new one compiles (flash-attn 4: a few seconds per kernel; flex attention
and the "compile" backend through torch.compile; mamba_ssm's Triton kernels autotune on their first call).
fla's causal conv kernels (Mamba2's "cuda" conv where causal-conv1d is missing) are pinned to one config,
as in tests/test_fla_ops.py, rather than autotuned.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch

from ramba import HSAHybrid, HSAHybridConfig
from ramba.ops.backends import MAMBA_KINDS, load, unusable
from ramba.ops.swa import sliding_window_attention, swa_cached_reference, swa_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 5e-3}
MODEL_LOGITS_TOL, MODEL_GRAD_TOL = 3e-2, 5e-2
SEGMENT_TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-2}
ZERO_GRAD_FLOOR = 1e-3  # of the upstream gradient's norm: the scale for a gradient whose reference is zero

# sliding-window attention ops: batch, length, query heads, kv heads, head dim
B, L, HQ, H, D = 2, 1000, 8, 2, 64
SWA_BACKENDS = ("flash", "flex", "fla")
SWA_CASES = [  # (window, packed documents)
    pytest.param(1, True, id="w1-docs"),
    pytest.param(100, False, id="w100"),
    pytest.param(512, True, id="w512-docs"),
    pytest.param(L + 500, False, id="w-beyond-L"),
]
CACHED_CASES = [  # (queries, keys, window): the queries are the last positions of the keys
    pytest.param(300, 1000, 100, id="window-inside-segment"),
    pytest.param(300, 1000, 900, id="window-into-cache"),
    pytest.param(300, 1000, 4000, id="window-beyond-keys"),
    pytest.param(1, 600, 512, id="one-query"),
]

# the whole model: (mixer, backend); segments of the inference run, then one token at a time
MODEL_CASES = [
    pytest.param("swa", "flash", id="swa-flash"),
    pytest.param("swa", "flex", id="swa-flex"),
    pytest.param("swa", "fla", id="swa-fla"),
    pytest.param("mamba2", "cuda", id="mamba2-cuda"),
    pytest.param("mamba2", "compile", id="mamba2-compile"),
]
SEGMENTS = (250, 447, 1, 1, 1, 1)
MODEL_LENGTH = sum(SEGMENTS)


# ------------------------------------------------------------------------------------------------ helpers

def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """||got - want|| / max(||want||, floor), in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / max(float(want.norm()), floor))


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, floor: float = 0.0) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{name}: not finite"
    err = rel_err(got, want, floor)
    assert err < tol, f"{name}: relative norm error {err:.2e} >= {tol:.0e}"


def require(kinds: tuple[str, ...], backend: str) -> None:
    """Skip the test unless `backend` can run every op kind in `kinds` here."""
    for kind in kinds:
        reason = unusable(kind, backend)
        if reason is not None:
            pytest.skip(f"{kind} backend {backend!r} {reason}")


def mixer_kinds(mixer: str) -> tuple[str, ...]:
    """The op kinds whose backend the mixer's config field picks."""
    return ("swa",) if mixer == "swa" else MAMBA_KINDS


@pytest.fixture
def fla_conv_one_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Where Mamba2's "cuda" conv is fla-core's Triton conv, run its autotuned kernels with one config (the
    widest channel block): autotuning each new shape costs far more device time than the test itself."""
    if unusable("conv", "cuda") is None and load("conv", "cuda").__name__.startswith("fla"):
        import fla.modules.causal_conv1d.ops as fla_conv_ops
        import triton
        from triton.runtime.autotuner import Autotuner

        for kernel in vars(fla_conv_ops).values():
            while isinstance(kernel, triton.runtime.KernelInterface):
                if isinstance(kernel, Autotuner):
                    monkeypatch.setattr(kernel, "configs",
                                        [max(kernel.configs, key=lambda c: c.kwargs.get("BD", 0))])
                kernel = getattr(kernel, "fn", None)
    yield


# --------------------------------------------------------------------------- 1-3: sliding-window attention

@functools.cache
def swa_inputs(dtype: torch.dtype, docs: bool) -> tuple[torch.Tensor, ...]:
    """q [B, L, HQ, D], k, v [B, L, H, D], the upstream gradient (all CPU, in `dtype`) and, with `docs`, the
    document ids [B, L] (sorted random ints: several documents per row, different in each row)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, HQ, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, L, H, D, generator=gen).to(dtype) for _ in range(2))
    grad_out = torch.randn(B, L, HQ, D, generator=gen).to(dtype)
    doc_ids = torch.randint(0, 6, (B, L), generator=gen).sort(dim=1).values if docs else None
    return q, k, v, grad_out, doc_ids


@functools.cache
def swa_expected(window: int, dtype: torch.dtype, docs: bool) -> tuple[torch.Tensor, ...]:
    """`swa_reference` in float64 on the CPU on `swa_inputs`: (output, dq, dk, dv)."""
    q, k, v, grad_out, doc_ids = swa_inputs(dtype, docs)
    inputs = [x.double().requires_grad_() for x in (q, k, v)]
    out = swa_reference(*inputs, window, doc_ids)
    grads = torch.autograd.grad(out, inputs, grad_out.double())
    return (out.detach(), *grads)


def check_swa(backend: str, window: int, docs: bool, dtype: torch.dtype) -> None:
    """`sliding_window_attention` on `backend` (on the GPU) against the float64 reference: output, then grads."""
    require(("swa",), backend)
    q, k, v, grad_out, doc_ids = swa_inputs(dtype, docs)
    inputs = [x.to(CUDA).requires_grad_() for x in (q, k, v)]
    out = sliding_window_attention(*inputs, window, None if doc_ids is None else doc_ids.to(CUDA), backend=backend)
    assert out.dtype == dtype
    want, *want_grads = swa_expected(window, dtype, docs)
    assert_close("output", out, want, TOL[dtype])
    grads = torch.autograd.grad(out, inputs, grad_out.to(CUDA))
    floor = ZERO_GRAD_FLOOR * float(grad_out.double().norm())
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want_grads):
        assert got.dtype == dtype
        assert_close(name, got, expected, TOL[dtype], floor)


@pytest.mark.parametrize("window,docs", SWA_CASES)
@pytest.mark.parametrize("backend", SWA_BACKENDS)
def test_swa_op_matches_float64_reference(backend: str, window: int, docs: bool) -> None:
    check_swa(backend, window, docs, torch.bfloat16)


def test_flash_swa_float16_matches_float64_reference() -> None:
    check_swa("flash", 100, False, torch.float16)


@pytest.mark.parametrize("length,keys,window", CACHED_CASES)
def test_flash_cached_form_matches_reference(length: int, keys: int, window: int) -> None:
    """q of `length` positions against `keys` keys, the cached ones first, none of them padding: flash-attn."""
    require(("swa",), "flash")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, length, HQ, D, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(B, keys, H, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        out = sliding_window_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), window, backend="flash")
    want = swa_cached_reference(q.double(), k.double(), v.double(), window, torch.ones(B, keys, dtype=torch.bool))
    assert out.dtype == torch.bfloat16
    assert_close("output", out, want, TOL[torch.bfloat16])


def test_flash_rejects_float32_and_auto_passes_it_on() -> None:
    require(("swa",), "flash")
    q, k, v = (x.to(CUDA) for x in swa_inputs(torch.float32, False)[:3])
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        sliding_window_attention(q, k, v, 100, backend="flash")
    out = sliding_window_attention(q, k, v, 100, backend="auto")  # the next usable backend (or the reference)
    assert out.dtype == torch.float32
    assert_close("output", out, swa_expected(100, torch.float32, False)[0], TOL[torch.float32])


# ---------------------------------------------------------------------------------------- 4-5: the model

def tiny_config(mixer: str, backend: str) -> HSAHybridConfig:
    """The tiny preset with `mixer` everywhere on `backend` (the retrieval ops on the reference)."""
    field = "swa_backend" if mixer == "swa" else "mamba_backend"
    return HSAHybridConfig.preset("tiny", local_mixer=mixer, ops_backend="torch", **{field: backend})


def model_pair(mixer: str, backend: str, device: torch.device, seed: int = 0) -> tuple[HSAHybrid, HSAHybrid]:
    """(the model on `backend`, the model on "torch"): the same float32 weights on `device`."""
    torch.manual_seed(seed)
    reference = HSAHybrid(tiny_config(mixer, "torch")).to(device)
    model = HSAHybrid(tiny_config(mixer, backend)).to(device)
    model.load_state_dict(reference.state_dict())
    return model, reference


def model_inputs(device: torch.device, vocab: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [2, MODEL_LENGTH] and document ids (sorted random ints: several documents per row)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, MODEL_LENGTH), generator=gen)
    doc_ids = torch.randint(0, 4, (2, MODEL_LENGTH), generator=gen).sort(dim=1).values
    return ids.to(device), doc_ids.to(device)


def check_full_model(mixer: str, backend: str, device: torch.device) -> dict[str, float]:
    """Logits and loss gradients of the model on `backend` under bf16 autocast against the "torch" model in
    float32, packed documents; asserts the tolerances and returns the relative errors."""
    model, reference = model_pair(mixer, backend, device)
    ids, doc_ids = model_inputs(device, model.config.vocab_size)
    want = reference(ids, labels=ids, doc_ids=doc_ids)
    want.loss.backward()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = model(ids, labels=ids, doc_ids=doc_ids)
    errors = {"logits": rel_err(got.logits.float(), want.logits)}
    assert errors["logits"] < MODEL_LOGITS_TOL, f"logits: relative norm error {errors['logits']:.2e}"
    assert bool(torch.isfinite(got.loss)), "the loss is not finite"
    got.loss.backward()

    params = dict(model.named_parameters())
    got_grads, want_grads = [], []
    for name, ref_param in reference.named_parameters():
        grad = params[name].grad
        assert (grad is None) == (ref_param.grad is None), f"{name}: a gradient on one model only"
        if grad is None:
            continue
        assert bool(torch.isfinite(grad).all()), f"{name}: the gradient is not finite"
        got_grads.append(grad.flatten())
        want_grads.append(ref_param.grad.flatten())
        errors[name] = rel_err(grad, ref_param.grad)
    errors["all gradients"] = rel_err(torch.cat(got_grads), torch.cat(want_grads))
    assert errors["all gradients"] < MODEL_GRAD_TOL, f"all gradients: relative norm error {errors['all gradients']:.2e}"
    mixer_errors = {name: err for name, err in errors.items() if ".mixer." in name}
    bad = {name: f"{err:.2e}" for name, err in mixer_errors.items() if err >= MODEL_GRAD_TOL}
    assert not bad, f"mixer gradients off by more than {MODEL_GRAD_TOL:.0e}: {bad}"
    return errors


def check_segments(mixer: str, backend: str, device: torch.device, dtype: torch.dtype) -> list[float]:
    """Prefill segments then decoded tokens (SEGMENTS) through a cache of the model on `backend` with weights
    in `dtype`, against one float32 forward of the "torch" model over the whole input: the relative error of
    each segment's logits (each decoded token alone), asserted under SEGMENT_TOL[dtype]."""
    model, reference = model_pair(mixer, backend, device, seed=3)
    model, reference = model.to(dtype).eval(), reference.eval()
    ids, _ = model_inputs(device, model.config.vocab_size, seed=4)
    with torch.no_grad():
        want = reference(ids).logits
        cache = model.new_cache(ids.shape[0])
        errors, start = [], 0
        for length in SEGMENTS:
            logits = model(ids[:, start:start + length], cache=cache).logits
            errors.append(rel_err(logits.float(), want[:, start:start + length]))
            start += length
    bad = [f"tokens {sum(SEGMENTS[:i])}..{sum(SEGMENTS[:i + 1]) - 1}: {err:.2e}"
           for i, err in enumerate(errors) if not err < SEGMENT_TOL[dtype]]
    assert not bad, f"segments off by more than {SEGMENT_TOL[dtype]:.0e}: {bad}"
    return errors


@pytest.mark.usefixtures("fla_conv_one_config")
@pytest.mark.parametrize("mixer,backend", MODEL_CASES)
def test_model_matches_torch_backends(mixer: str, backend: str) -> None:
    require(mixer_kinds(mixer), backend)
    check_full_model(mixer, backend, CUDA)


@pytest.mark.usefixtures("fla_conv_one_config")
@pytest.mark.parametrize("mixer,backend", MODEL_CASES)
def test_segments_and_decoding_match_full_forward(mixer: str, backend: str) -> None:
    """flash takes float16 and bfloat16 only, so that model runs in bfloat16 weights (an inference cache holds
    its keys in the weights' dtype); the others run in float32. No padding: flash runs the cached SWA too."""
    require(mixer_kinds(mixer), backend)
    check_segments(mixer, backend, CUDA, torch.bfloat16 if backend == "flash" else torch.float32)
