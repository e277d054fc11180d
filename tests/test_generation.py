"""generate(..., return_retrieval=True): the chunks and weights read for every generated token."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import HSAHybrid
from ramba.generation import GenerateOutput, greedy_steps, prefill_segments
from test_model import small_config


@pytest.mark.parametrize("mixer", ["swa", "mamba2"])
def test_retrieval_of_each_generated_token_is_that_of_a_full_forward(mixer):
    """Position L - 1 + t of one full forward (no cache) over prompt and continuation predicts generated token t:
    its selections and weights are what generate reports for that token, and its argmax is the token."""
    torch.manual_seed(4)
    model = HSAHybrid(small_config(local_mixer=mixer, n_upper_layers=3, hsa_every=2)).double().eval()
    prompt = torch.randint(0, 50, (2, 70))
    out = model.generate(prompt, 9, segment_size=32, return_retrieval=True)
    assert isinstance(out, GenerateOutput)
    assert torch.equal(out.sequences, model.generate(prompt, 9, segment_size=32))
    with torch.no_grad():
        full = model(out.sequences, return_retrieval=True)
    assert len(out.retrieval) == len(out.retrieval_weights) == len(full.retrieval) == 2  # two HSA blocks
    predicting = slice(69, 69 + 9)
    assert torch.equal(full.logits[:, predicting].argmax(-1), out.sequences[:, 70:])
    for chunks, weights, ref_chunks, ref_weights in zip(out.retrieval, out.retrieval_weights, full.retrieval,
                                                        full.retrieval_weights):
        assert chunks.shape == weights.shape == (2, 9, 1, 2)
        assert torch.equal(chunks, ref_chunks[:, predicting])
        torch.testing.assert_close(weights, ref_weights[:, predicting])


def test_retrieval_stops_with_the_last_generated_token():
    """A stop token ends generation: one read per generated token, the stop token's included; a manual step loop
    with a cache reads the same."""
    torch.manual_seed(5)
    model = HSAHybrid(small_config()).double().eval()
    prompt = torch.randint(0, 50, (1, 40))
    free = model.generate(prompt, 8)
    stop = int(free[0, 43])
    out = model.generate(prompt, 8, stop_tokens=[stop], return_retrieval=True)
    generated = out.sequences.shape[1] - 40
    assert int(out.sequences[0, -1]) == stop and generated == 1 + int((free[0, 40:] == stop).nonzero()[0])
    cache = model.new_cache(1)
    with torch.no_grad():
        step = model(prompt, cache=cache, logits_to_keep=1, return_retrieval=True)
        reads = []
        for t in range(generated):
            reads.append(step)
            step = model(out.sequences[:, 40 + t:41 + t], cache=cache, return_retrieval=True)
    for block, (chunks, weights) in enumerate(zip(out.retrieval, out.retrieval_weights)):
        assert chunks.shape[1] == generated
        assert torch.equal(chunks, torch.cat([r.retrieval[block] for r in reads], dim=1))
        torch.testing.assert_close(weights, torch.cat([r.retrieval_weights[block] for r in reads], dim=1))


def test_no_new_tokens_reads_nothing():
    model = HSAHybrid(small_config()).eval()
    out = model.generate(torch.randint(0, 50, (2, 30)), 0, return_retrieval=True)
    assert out.sequences.shape == (2, 30)
    assert [c.shape for c in out.retrieval] == [w.shape for w in out.retrieval_weights] == [(2, 0, 1, 2)] * 2


def test_greedy_steps_continue_a_prefilled_cache_as_generate_does():
    torch.manual_seed(6)
    model = HSAHybrid(small_config()).double().eval()
    prompt = torch.randint(0, 50, (2, 50))
    expected = model.generate(prompt, 6)[:, 50:]
    cache = model.new_cache(2)
    with torch.no_grad():
        first = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    steps = greedy_steps(model, cache, first)
    assert torch.equal(torch.cat([first] + [next(steps) for _ in range(5)], dim=1), expected)


@settings(max_examples=50, deadline=None)
@given(length=st.integers(1, 300), size=st.integers(1, 64), pads=st.lists(st.integers(0, 299), min_size=1, max_size=3))
def test_prefill_segments_cover_the_input_and_keep_padding_first(length, size, pads):
    pads = [min(p, length - 1) for p in pads]
    mask = torch.stack([(torch.arange(length) >= p).long() for p in pads])
    for attention_mask in (None, mask):
        pieces = prefill_segments(length, size, attention_mask)
        assert pieces[0][0] == 0 and pieces[-1][1] == length
        assert all(a < b and b == c for (a, b), (c, _) in zip(pieces, pieces[1:]))
        assert all(b - a <= size for a, b in pieces[1:])
        first = size if attention_mask is None else max(size, max(pads) + 1)
        assert pieces[0][1] == min(first, length)


def test_rows_that_stop_at_different_steps_get_padding_until_the_last_stops():
    """Two rows stopping at different steps: each row's tokens up to its stop token are its free continuation,
    padding follows, and the output ends with the last row's stop."""
    torch.manual_seed(6)
    model = HSAHybrid(small_config()).double().eval()
    prompt = torch.randint(0, 50, (2, 40))
    free = model.generate(prompt, 30)[:, 40:]
    stops = {int(free[0, 2]), int(free[1, 19])}
    first = [next(t for t in range(30) if int(free[row, t]) in stops) for row in range(2)]
    got = model.generate(prompt, 30, stop_tokens=stops, pad_token_id=49)[:, 40:]
    assert got.shape[1] == max(first) + 1
    for row in range(2):
        assert torch.equal(got[row, :first[row] + 1], free[row, :first[row] + 1])
        assert bool((got[row, first[row] + 1:] == 49).all())
