"""Several training processes against one: DDP on CPU processes (gloo) must train exactly like one process
with the whole global batch, and so must gradient accumulation."""

import json
import math

from accelerate.state import AcceleratorState

from benchmarks import distributed
from benchmarks.distributed import read_metrics, smooth
from ramba.training.config import load_run_config
from ramba.training.trainer import train

SMALL = ["model.overrides.d_model=64", "model.overrides.num_heads=2", "model.overrides.head_dim=32",
         "model.overrides.intermediate_size=128", "model.overrides.window=64", "data.seq_len=256",
         "data.eval_sequences=4", "train.warmup=2", "train.lr=3e-3", "train.steps=6", "train.eval_every=6"]


def test_ddp_on_two_processes_matches_one_process(tmp_path):
    rows = distributed.main(["--cpu", "--modes", "single,seed,ddp", "--batch-size", "2", "--window", "1",
                             "--runs", str(tmp_path), "--out", str(tmp_path / "d.md")] + SMALL)
    single, ddp = read_metrics(tmp_path / "single")[0], read_metrics(tmp_path / "ddp")[0]
    assert sorted(single) == sorted(ddp) == list(range(1, 7))
    assert max(abs(single[s] - ddp[s]) for s in single) < 1e-4  # same sequences, same token-mean loss
    assert single[6] < single[1] - 0.5  # and it did train
    by_run = {r["run"]: r for r in rows}
    assert by_run["ddp"]["max_gap"] < 1e-4 < by_run["seed"]["max_gap"]  # another seed is visibly different
    assert "| ddp | 6 |" in (tmp_path / "d.md").read_text() and (tmp_path / "d.png").is_file()


def test_accumulation_matches_one_large_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # float32 on the CPU even where a GPU is present
    AcceleratorState._reset_state(reset_partial_state=True)  # forget a device picked by an earlier test
    train(load_run_config(None, SMALL + ["train.batch_size=4", "train.log_every=1",
                                         f"train.output_dir={tmp_path / 'one'}"]))
    train(load_run_config(None, SMALL + ["train.batch_size=1", "train.grad_accum=4", "train.log_every=1",
                                         f"train.output_dir={tmp_path / 'accum'}"]))
    one, accum = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "accum")[0]
    assert sorted(one) == sorted(accum) and max(abs(one[s] - accum[s]) for s in one) < 1e-4


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert all(math.isclose(a, b) for a, b in zip(smooth([2.0, 4.0, 9.0], 5), [2.0, 3.0, 5.0]))


def test_context_parallel_training_on_two_processes_matches_one_process(tmp_path):
    """train.context_parallel=2: two processes share every sequence of a packed corpus (documents that
    continue across the cut included) and train like one process with the whole batch."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"{n} " + "word " * n}) for n in range(3, 300, 13)))
    overrides = SMALL + ["model.overrides.chunk_size=32", "model.overrides.window=16", f"data.source={corpus}",
                         "model.overrides.local_mixer=[mamba2,swa,swa,swa]"]
    distributed.main(["--cpu", "--modes", "single,cp", "--batch-size", "1", "--window", "1",
                      "--runs", str(tmp_path), "--out", str(tmp_path / "d.md")] + overrides)
    single, cp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "cp")
    assert sorted(single[0]) == sorted(cp[0]) == list(range(1, 7))
    assert max(abs(single[0][s] - cp[0][s]) for s in single[0]) < 1e-4
    assert abs(single[1][6] - cp[1][6]) < 1e-4  # held-out loss of the trained weights
    assert single[0][6] < single[0][1] - 0.3  # and it did train
