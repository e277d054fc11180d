"""benchmarks.drift: position buckets, and its landmark norms against an uncached forward of the same bytes."""

from __future__ import annotations

import torch

from benchmarks import drift
from ramba import HSAHybrid, HSAHybridConfig
from ramba.layers.mamba2 import Mamba2State


def test_buckets_grow_by_four_and_end_at_the_length():
    assert drift.buckets(1000) == [(0, 1000)]
    assert drift.buckets(5000) == [(0, 1024), (1024, 4096), (4096, 5000)]
    assert drift.buckets(16384) == [(0, 1024), (1024, 4096), (4096, 16384)]


def test_drift_table_matches_an_uncached_forward(tmp_path):
    torch.manual_seed(3)
    config = HSAHybridConfig.preset("tiny", local_mixer="mamba2", mamba_horizon=16, d_model=64, num_heads=2,
                                    intermediate_size=128, mamba_head_dim=32)
    HSAHybrid(config).save_pretrained(tmp_path / "m")
    out = tmp_path / "drift.md"
    drift.main(["--checkpoint", f"m={tmp_path / 'm'}", "--length", "2k", "--segment", "768", "--device", "cpu",
                "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| m |")]
    assert [r[1].strip() for r in rows] == ["0-1K", "1K-2K"]
    assert float(rows[0][3]) == 1.0
    assert all(float(r[4]) > 0 for r in rows)  # a Mamba2 model has states
    model = HSAHybrid.from_pretrained(tmp_path / "m")
    captured = []
    model.encoder.register_forward_hook(lambda module, args, memory: captured.append(memory.landmarks))
    ids = torch.randint(0, config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    norms = captured[0][0].flatten(1).norm(dim=1)  # [32 chunks]
    for row, (lo, hi) in zip(rows, [(0, 16), (16, 32)]):
        assert abs(float(row[2]) - norms[lo:hi].mean().item()) < 2e-3
    for row, end in zip(rows, [1024, 2048]):  # the state is read at the bucket's end, not at a segment's
        cache = model.new_cache(1)
        with torch.no_grad():
            model(ids[:, :end], cache=cache, logits_to_keep=0)
        states = [s.ssm.norm().item() for s in cache.states if isinstance(s, Mamba2State)]
        assert abs(float(row[4]) - sum(states) / len(states)) < 2e-3
