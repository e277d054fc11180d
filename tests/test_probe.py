"""benchmarks/probe.py: which chunks hold the inserted facts, and what the model reads while answering."""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import probe
from ramba import HSAHybrid
from ramba.data.tasks import TASKS
from ramba.steering import forced_retrieval
from ramba.tokenizer import ByteTokenizer

DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "swa-passkey"


def test_fact_chunks_hold_the_asked_fact_and_the_others():
    tokenizer = ByteTokenizer()
    for seed in range(5):
        sample = TASKS["niah_multikey_1"](random.Random(seed), tokenizer, 2048, None)
        asked, other = probe.fact_chunks(sample, tokenizer, 64)
        ids = sample.prompt_ids.tolist()

        def text(chunks: set[int]) -> str:
            return tokenizer.decode(sum((ids[c * 64:(c + 1) * 64] for c in sorted(chunks)), []))

        assert sample.references[0] in text(asked) and not asked & other
        assert text(asked | other).count("One hidden number for") == 4  # every needle, each whole

def test_a_model_that_reads_every_chunk_reads_the_asked_one():
    """At 300 tokens there are 4 complete chunks and top-8 selects all of them: every answer token reads the
    pass key's chunk, and the shipped model answers it."""
    model = HSAHybrid.from_pretrained(DEMO).float().eval()
    tokenizer = ByteTokenizer()
    sample = TASKS["passkey"](random.Random(0), tokenizer, 300, 0.0)
    row = probe.probe_one(model, tokenizer, sample, segment=128)
    assert row["asked_read"] == 1.0 and row["other_facts"] == 0
    assert 0.0 < row["asked_weight"] <= 1.0 + 1e-6 and row["other_weight"] == 0.0
    assert sample.references[0] in row["output"]


def test_weight_on_a_fact_averages_blocks_and_heads():
    """Two HSA blocks (two retrieval heads, then one) at the last position; empty slots (-1) carry nothing."""
    out = SimpleNamespace(
        retrieval=[torch.tensor([[[[9, 3, 1, -1], [2, 3, 0, -1]]]]), torch.tensor([[[[1, 2, 3, 9]]]])],
        retrieval_weights=[torch.tensor([[[[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.5, 0.0]]]]),
                           torch.tensor([[[[0.2, 0.3, 0.5, 0.0]]]])])
    mixing = probe._mixing(out)
    assert mixing == [{9: 0.0, 3: 0.5, 1: 0.5}, {2: 0.25, 3: 0.25, 0: 0.5},
                      {1: pytest.approx(0.2), 2: pytest.approx(0.3), 3: 0.5, 9: 0.0}]
    assert probe._weight_on({3}, mixing) == pytest.approx((0.5 + 0.25 + 0.5) / 3)
    assert probe._weight_on({0, 7}, mixing) == pytest.approx(0.5 / 3)
    assert probe._weight_on(set(), mixing) == 0.0


def test_forced_reading_answers_from_the_asked_fact_only():
    """--forced: reading only the pass key's chunks, the shipped model still answers; reading only chunks of
    the haystack instead (ramba.steering), it cannot, so the forcing is what it reads."""
    model = HSAHybrid.from_pretrained(DEMO).float().eval()
    tokenizer = ByteTokenizer()
    sample = TASKS["passkey"](random.Random(1), tokenizer, 1500, 0.3)
    row = probe.probe_one(model, tokenizer, sample, segment=512, forced=True)
    assert sample.references[0] in row["forced_output"] and sample.references[0] in row["output"]
    asked, _ = probe.fact_chunks(sample, tokenizer, 64)
    haystack = [c for c in range(3, 20) if c not in asked][:2]
    with forced_retrieval(model, haystack):
        answer, _ = probe._answer(model, tokenizer, sample, 512)
    assert sample.references[0] not in tokenizer.decode(answer)
    rows = [dict(row, length=1500, score=1.0, forced_score=1.0)]
    assert probe.table(rows, "passkey").splitlines()[0].endswith("answers right, reading only the asked fact |")
