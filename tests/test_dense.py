"""ramba.dense.DenseTransformer: the dense baseline against a hand-written transformer, its cache and loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from ramba import HSAHybridConfig
from ramba.dense import DenseTransformer
from ramba.generation import generate

CONFIG = HSAHybridConfig.preset("tiny", d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)


def dense_model() -> DenseTransformer:
    torch.manual_seed(0)
    return DenseTransformer(CONFIG).double().eval()


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * weight


def by_hand(model: DenseTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] from the model's weights: explicit causal softmax attention, kv heads shared by
    consecutive query heads, a SwiGLU MLP."""
    H, KV, D = CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim
    x = model.embed.weight[ids]
    B, L, _ = x.shape
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for block in model.blocks:
        qkv = rms_norm(x, block.norm1.weight) @ block.qkv.weight.T
        q = qkv[..., :H * D].reshape(B, L, H, D)
        k = qkv[..., H * D:(H + KV) * D].reshape(B, L, KV, D).repeat_interleave(H // KV, dim=2)
        v = qkv[..., (H + KV) * D:].reshape(B, L, KV, D).repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        att = torch.einsum("bhts,bshd->bthd", scores.masked_fill(future, float("-inf")).softmax(-1), v)
        x = x + att.reshape(B, L, H * D) @ block.o.weight.T
        gate, up = (rms_norm(x, block.norm2.weight) @ block.up.weight.T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ block.down.weight.T
    return rms_norm(x, model.norm.weight) @ model.head.weight.T


def test_forward_equals_a_hand_written_transformer():
    model = dense_model()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, by_hand(model, ids))


def test_dense_baseline_cache_equals_full_pass():
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=96)
    model = DenseTransformer(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (1, 50))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(1)
        pieces = [model(ids[:, a:b], cache=cache, logits_to_keep=b - a).logits
                  for a, b in ((0, 20), (20, 21), (21, 50))]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-10)
    assert cache.length == 50


def test_later_tokens_never_change_earlier_logits():
    model = dense_model()
    ids = torch.randint(0, CONFIG.vocab_size, (1, 40))
    changed = ids.clone()
    changed[0, 25:] = (ids[0, 25:] + 1) % CONFIG.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_loss_is_the_shifted_cross_entropy_without_ignored_labels():
    model = dense_model()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 30))
    labels = ids.clone()
    labels[:, :10] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = by_hand(model, ids)
    manual = -torch.stack([logits[b, t - 1].log_softmax(-1)[ids[b, t]] for b in range(2) for t in range(10, 30)]).mean()
    torch.testing.assert_close(out.loss, manual.float())
    with pytest.raises(ValueError, match="labels need the logits"):
        model(ids, labels=labels, logits_to_keep=1)


def test_generate_runs_it_greedily():
    model = dense_model()
    prompt = torch.randint(0, CONFIG.vocab_size, (2, 20))
    out = generate(model, prompt, 5, segment_size=8)
    ref = prompt
    with torch.no_grad():
        for _ in range(5):
            ref = torch.cat([ref, by_hand(model, ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
