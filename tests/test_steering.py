"""forced_retrieval / force_selection: every HSA block reads the given chunks where they are visible, and only
there; the rest of the model runs as before."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import HSAHybrid, HSAHybridConfig
from ramba.layers.hsa import force_selection
from ramba.steering import forced_retrieval


def _reference(indices, scores, forced, positions, chunk_size):
    """force_selection, one query at a time."""
    indices, scores = indices.clone(), scores.clone()
    N, L, H, K = indices.shape
    for n in range(N):
        for t in range(L):
            visible = [c for c in forced.tolist() if (c + 1) * chunk_size <= positions[n, t]]
            if visible:
                row = visible + [-1] * (K - len(visible))
                indices[n, t] = torch.tensor(row)
                scores[n, t] = torch.tensor([0.0 if c >= 0 else float("-inf") for c in row])
    return indices, scores


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), length=st.integers(1, 40), heads=st.integers(1, 2), k=st.integers(1, 4),
       chunk=st.sampled_from([2, 4]), data=st.data())
def test_force_selection_matches_a_loop(n, length, heads, k, chunk, data):
    f = data.draw(st.integers(1, k))
    forced = torch.tensor(sorted(data.draw(st.sets(st.integers(0, 12), min_size=f, max_size=f)), reverse=True))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    indices = torch.randint(-1, 10, (n, length, heads, k), generator=g)
    scores = torch.randn(n, length, heads, k, generator=g)
    positions = torch.randint(0, 60, (n, length), generator=g)
    got = force_selection(indices, scores, forced, positions, chunk)
    want = _reference(indices, scores, forced, positions, chunk)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@torch.no_grad()
def test_forced_retrieval_reads_the_chunks_where_visible_and_nowhere_else():
    torch.manual_seed(3)
    model = HSAHybrid(HSAHybridConfig.preset("tiny")).eval()
    ids = torch.randint(0, 256, (1, 512))
    free = model(ids, return_retrieval=True)
    with forced_retrieval(model, [1, 3]):
        forced = model(ids, return_retrieval=True)
        cache = model.new_cache(1)
        segments = [model(part, cache=cache).logits for part in ids.split([200, 312], dim=1)]
    assert all(block.forced is None for block in model.modules() if hasattr(block, "forced"))
    # before chunk 1 is complete (position 128) nothing changes: the causal model never saw the forcing
    torch.testing.assert_close(forced.logits[:, :128], free.logits[:, :128])
    for indices, weights in zip(forced.retrieval, forced.retrieval_weights):
        K = indices.shape[-1]
        assert torch.equal(indices[0, 128:256], torch.tensor([1] + [-1] * (K - 1)).expand_as(indices[0, 128:256]))
        assert torch.equal(indices[0, 256:], torch.tensor([3, 1] + [-1] * (K - 2)).expand_as(indices[0, 256:]))
        torch.testing.assert_close(weights[0, 256:, :, :2], torch.full_like(weights[0, 256:, :, :2], 0.5))
        assert float(weights[0, 128:256, :, 0].min()) == 1.0
    assert not torch.allclose(forced.logits[:, 256:], free.logits[:, 256:])
    # the cached path (segments, absolute positions) forces the same chunks at the same positions
    torch.testing.assert_close(torch.cat(segments, 1), forced.logits, rtol=1e-4, atol=1e-4)


def test_forced_retrieval_errors():
    model = HSAHybrid(HSAHybridConfig.preset("tiny"))
    with pytest.raises(ValueError, match="give 1 to topk"):
        with forced_retrieval(model, list(range(model.config.topk + 1))):
            pass
    with pytest.raises(ValueError, match="give 1 to topk"):
        with forced_retrieval(model, [-1]):
            pass
    with pytest.raises(ValueError, match="no HSA blocks"):
        with forced_retrieval(HSAHybrid(HSAHybridConfig.preset("tiny", use_hsa=False)), [0]):
            pass
