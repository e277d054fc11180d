"""benchmarks.context_parallel end to end on CPU processes (gloo): one process and two, a table with traffic."""

from __future__ import annotations

from benchmarks import context_parallel
from ramba import HSAHybridConfig


def test_context_parallel_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "cp.md"
    context_parallel.main(["--ranks", "1,2", "--mixers", "swa", "--lengths", "256", "--steps", "1",
                           "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny swa")]
    assert [int(r[2]) for r in rows] == [1, 2]
    one, two = rows
    assert int(one[7].replace(",", "")) == 0  # one process moves nothing
    # two ranks: at least the gathered memory of the other rank (keys and values of 2 chunks of 64 tokens,
    # float32) over 256 tokens, in each of the forward and the backward
    assert int(two[7].replace(",", "")) >= 2 * (2 * 64 * 64 * 4) * 2 // 256


def test_context_parallel_benchmark_with_packed_documents(tmp_path):
    out = tmp_path / "cp.md"
    context_parallel.main(["--ranks", "2", "--mixers", "mamba2", "--lengths", "256", "--steps", "1",
                           "--doc-length", "40", "--out", str(out)])
    text = out.read_text()
    assert "documents of about 40 tokens" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| tiny mamba2")]
    assert len(rows) == 1 and int(rows[0][7].replace(",", "")) > 0


def test_context_parallel_benchmark_prefill_and_decode(tmp_path):
    out = tmp_path / "cp.md"
    context_parallel.main(["--task", "prefill", "--ranks", "1,2", "--mixers", "swa", "--lengths", "1024",
                           "--segment", "256", "--decode-steps", "3", "--out", str(out)])
    text = out.read_text()
    assert "segments of 256 tokens, 3 decoded tokens" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| tiny swa")]
    assert [int(r[2]) for r in rows] == [1, 2]
    one, two = rows
    assert all(float(r[3]) > 0 and float(r[6]) > 0 for r in rows)  # prefill s, decode ms/token
    assert int(one[8].replace(",", "")) == 0
    # two ranks (2 rounds of 256 tokens a rank): at least the other rank's memory keys and values, gathered in
    # each round (float32), over the prompt's tokens
    config = HSAHybridConfig.preset("tiny")
    assert int(two[8].replace(",", "")) >= 2 * config.num_kv_heads * config.head_dim * 4 // 2
