"""ramba.training.retrieval: the chunks of the asked fact, and the auxiliary retrieval loss against loops."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.learnability import main, task_batch
from ramba import HSAHybrid, HSAHybridConfig
from ramba.data.tasks import TASKS
from ramba.data.tasks.passkey import NEEDLE
from ramba.tokenizer import ByteTokenizer
from ramba.training.optim import train_step
from ramba.training.retrieval import FLOOR, asked_chunks, retrieval_target_loss


def loop_reference(indices, weights, targets):
    """The loss and mean weight, one position, block and head at a time."""
    per_head = []
    B, L, C = targets.shape
    for b in range(B):
        for t in range(L):
            wanted = {c for c in range(C) if targets[b, t, c]}
            if not wanted:
                continue
            for chunk, weight in zip(indices, weights):
                for h in range(chunk.shape[2]):
                    per_head.append(sum(float(weight[b, t, h, k]) for k in range(chunk.shape[3])
                                        if int(chunk[b, t, h, k]) in wanted))
    loss = sum(-math.log(max(w, FLOOR)) for w in per_head) / len(per_head)
    return loss, sum(per_head) / len(per_head)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 3), st.integers(1, 4), st.integers(1, 12),
       st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_loss_and_weight_equal_the_loop(B, L, heads, K, C, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    indices = [torch.randint(-1, C, (B, L, heads, K), generator=g) for _ in range(blocks)]  # -1: empty slots
    weights = [torch.softmax(torch.randn(B, L, heads, K, generator=g), -1) * (i >= 0) for i in indices]
    targets = torch.rand(B, L, C, generator=g) < 0.3
    targets[0, 0, torch.randint(0, C, (1,), generator=g)] = True  # at least one position has a target
    loss, weight = retrieval_target_loss(indices, weights, targets)
    want_loss, want_weight = loop_reference(indices, weights, targets)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert float(weight) == pytest.approx(want_weight, rel=1e-5, abs=1e-7)


def test_gradient_moves_weight_onto_the_target():
    scores = torch.randn(1, 1, 1, 4, requires_grad=True)
    indices = [torch.tensor([[[[5, 2, 7, -1]]]])]
    targets = torch.zeros(1, 1, 8, dtype=torch.bool)
    targets[0, 0, 2] = True
    weights = [torch.softmax(scores.masked_fill(indices[0] < 0, -1e9), -1)]
    loss, _ = retrieval_target_loss(indices, weights, targets)
    loss.backward()
    grad = scores.grad[0, 0, 0]
    assert grad[1] < 0 and grad[0] > 0 and grad[2] > 0  # descent raises the target's score, lowers the others'


def test_no_target_gives_an_attached_zero_and_bad_targets_are_named():
    indices = [torch.zeros(1, 2, 1, 2, dtype=torch.long)]
    weights = [torch.rand(1, 2, 1, 2, requires_grad=True)]
    loss, weight = retrieval_target_loss(indices, weights, torch.zeros(1, 2, 3, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(weight) == 0.0 and weights[0].grad is not None
    with pytest.raises(ValueError, match="bool"):
        retrieval_target_loss(indices, weights, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="return_retrieval"):
        retrieval_target_loss([], [], torch.zeros(1, 2, 3, dtype=torch.bool))


def test_asked_chunks_of_a_pass_key_are_those_of_its_needle():
    tok = ByteTokenizer()  # one token a byte: the needle's place in the text is its place in the tokens
    for seed in range(6):
        sample = TASKS["passkey"](random.Random(seed), tok, 900, depth=random.Random(seed).random())
        needle = " " + NEEDLE.format(key=sample.references[0])
        start = tok.decode(sample.prompt_ids.tolist()).index(needle)
        assert asked_chunks(sample, tok, 64) == list(range(start // 64, (start + len(needle) - 1) // 64 + 1))


def test_asked_chunks_of_multikey_needles_leave_the_other_keys_out():
    tok = ByteTokenizer()
    for seed in range(6):
        sample = TASKS["niah_multikey_1"](random.Random(seed), tok, 1500, depth=None)
        chunks = asked_chunks(sample, tok, 64)
        ids = sample.prompt_ids.tolist()
        spans = list(zip(sample.insert_offsets, sample.insert_ends))
        asked = [(s, e) for s, e in spans if sample.references[0] in tok.decode(ids[s:e])]
        others = [(s, e) for s, e in spans if (s, e) not in asked]
        assert len(asked) == 1 and others
        assert sample.references[0] in tok.decode(ids[chunks[0] * 64:(chunks[-1] + 1) * 64])
        for s, e in others:
            own = set(range(s // 64, (e - 1) // 64 + 1))
            shared = own & set(range(asked[0][0] // 64, (asked[0][1] - 1) // 64 + 1))
            assert not (own - shared) & set(chunks)


def test_batch_targets_sit_at_the_answer_positions():
    tok = ByteTokenizer()
    ids, labels, targets = task_batch(random.Random(7), tok, 4, 200, 400, 1.0, chunk_size=32)
    assert targets.shape == (4, ids.shape[1], -(-ids.shape[1] // 32))
    for row in range(4):
        answer = (labels[row] != -100).nonzero().flatten()
        predicting = set((answer - 1).tolist())
        asked = targets[row].any(-1).nonzero().flatten().tolist()
        assert set(asked) == predicting
        chunks = targets[row, asked[0]].nonzero().flatten().tolist()
        key = tok.decode(labels[row, answer[:-1]].tolist()).strip()
        assert key in tok.decode(ids[row, chunks[0] * 32:(chunks[-1] + 1) * 32].tolist())


def test_train_step_uses_loss_fn():
    model = HSAHybrid(HSAHybridConfig.preset("tiny", d_model=32, intermediate_size=64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.embed.weight.detach().clone()
    batch = {"input_ids": torch.randint(0, 200, (1, 8))}
    loss = train_step(model, optimizer, batch, loss_fn=lambda m, b: (m.embed.weight ** 2).sum())
    assert float(loss) == pytest.approx(float((before ** 2).sum()), rel=1e-5)
    torch.testing.assert_close(model.embed.weight.detach(), 0.8 * before)  # w - 0.1 * 2w: that loss's step


def test_short_run_with_the_retrieval_loss_reports_the_needle_weight(tmp_path):
    out = tmp_path / "table.md"
    main(["--length", "200", "--min-length", "160", "--steps", "2", "--batch-size", "2", "--eval-every", "2",
          "--eval-batches", "1", "--set", "window=32", "--retrieval-loss", "0.5", "--out", str(out),
          "--device", "cpu"])
    row = out.read_text().splitlines()[-1].split("|")
    assert 0.0 < float(row[6]) <= 1.0  # the weight on the needle, between the keys right and the seconds
    with pytest.raises(SystemExit, match="retrieval-loss"):
        main(["--set", "use_hsa=false", "--retrieval-loss", "1", "--steps", "1"])
