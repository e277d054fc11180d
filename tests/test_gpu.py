"""The GPU fast paths picked by backend="auto" against the CPU references (run where CUDA is available)."""

import pytest
import torch

from ramba import HSAHybrid, HSAHybridConfig
from ramba.ops.swa import swa_flex, swa_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("docs", [False, True])
def test_compiled_flex_swa_matches_reference(dtype, tol, docs):
    torch.manual_seed(0)
    B, L, HQ, H, D, W = 2, 1000, 8, 2, 64, 256
    q = torch.randn(B, L, HQ, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, L, H, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, L, H, D, device="cuda", dtype=dtype, requires_grad=True)
    doc_ids = torch.randint(0, 4, (B, L), device="cuda").sort(dim=1).values if docs else None
    out = swa_flex(q, k, v, W, doc_ids)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = swa_reference(*ref_inputs, W, None if doc_ids is None else doc_ids.cpu())
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_inputs)
    assert rel_err(out.cpu(), ref) < tol
    for g, r in zip(grads, ref_grads):
        assert rel_err(g.cpu(), r) < tol


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_model_on_gpu_matches_cpu(mixer):
    torch.manual_seed(1)
    config = HSAHybridConfig.preset("tiny", local_mixer=mixer)
    cpu_model = HSAHybrid(config)
    gpu_model = HSAHybrid(config).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 700))
    doc_ids = torch.cat([torch.zeros(2, 300), torch.ones(2, 400)], dim=1).long()
    ref = cpu_model(ids, labels=ids, doc_ids=doc_ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_model(ids.cuda(), labels=ids.cuda(), doc_ids=doc_ids.cuda())
    assert rel_err(out.logits.float().cpu(), ref.logits) < 3e-2
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu_model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_offloaded_cache_on_gpu_matches_resident(mixer):
    """Segments then decoding with the memory in pinned CPU memory equal the same run with it on the GPU."""
    torch.manual_seed(2)
    model = HSAHybrid(HSAHybridConfig.preset("tiny", local_mixer=mixer)).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 900), device="cuda")
    outs = []
    with torch.no_grad():
        for offload in (False, True):
            cache = model.new_cache(2, offload=offload)
            logits = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 333), (333, 896))]
            logits += [model(ids[:, t:t + 1], cache=cache).logits for t in range(896, 900)]
            outs.append(torch.cat(logits, dim=1))
    assert rel_err(outs[1], outs[0]) < 1e-5


def test_cached_mamba2_on_gpu_matches_full_forward_on_cpu():
    """Segments of two lengths through the compiled Mamba2 ops, then decoded tokens, give the logits of one
    reference pass over the whole input on the CPU."""
    torch.manual_seed(3)
    config = HSAHybridConfig.preset("tiny", local_mixer="mamba2")
    cpu_model = HSAHybrid(config).eval()
    gpu_model = HSAHybrid(config).cuda().eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 700))
    with torch.no_grad():
        ref = cpu_model(ids).logits
        cache = gpu_model.new_cache(1)
        logits = [gpu_model(ids[:, a:b].cuda(), cache=cache).logits for a, b in ((0, 250), (250, 697))]
        logits += [gpu_model(ids[:, t:t + 1].cuda(), cache=cache).logits for t in range(697, 700)]
    assert rel_err(torch.cat(logits, dim=1).cpu(), ref) < 1e-3
