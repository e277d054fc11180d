"""recipes/pretrain.py and ramba.training end to end on the CPU."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ramba import HSAHybrid, HSAHybridConfig
from ramba.training.checkpoint import CheckpointError, checkpoints
from ramba.training.config import RunConfigError, load_run_config
from ramba.training.config import DataSection
from ramba.training.data import corpus_documents, pack
from ramba.training.optim import param_groups
from ramba.training.trainer import eval_batches, evaluate, retrieval_hits
from ramba.tokenizer import ByteTokenizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = ["model.overrides.d_model=64", "model.overrides.num_heads=2", "model.overrides.head_dim=32",
         "model.overrides.intermediate_size=128", "model.overrides.window=64", "data.seq_len=256",
         "train.batch_size=2", "data.eval_sequences=2", "train.log_every=1", "train.warmup=2", "train.lr=3e-3"]


def recipe():
    spec = importlib.util.spec_from_file_location("pretrain", RECIPES / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretrain_lowers_the_loss_and_saves(tmp_path):
    final = recipe().main(SMALL + ["train.steps=12", f"train.output_dir={tmp_path}"])
    assert (final / "model.safetensors").is_file() and (tmp_path / "config.yaml").is_file()
    run = load_run_config(tmp_path / "config.yaml")  # the saved config reproduces the run's settings
    assert run.train.steps == 12 and run.model.overrides["d_model"] == 64
    trained = HSAHybrid.from_pretrained(final)
    torch.manual_seed(0)
    untrained = HSAHybrid(trained.config)
    held_out = eval_batches(run, ByteTokenizer(), seed=123)
    assert evaluate(trained, held_out, torch.device("cpu"))["eval_loss"] < \
        evaluate(untrained, held_out, torch.device("cpu"))["eval_loss"] - 1.0


def test_resume_continues_exactly(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = SMALL + ["train.steps=6", "train.save_every=2", "train.keep=2", "model.overrides.gumbel_noise=0.5"]
    recipe().main(common + [f"train.output_dir={whole}"])
    recipe().main(common + [f"train.output_dir={parts}", "train.stop_after=3"])
    assert [p.name for p in checkpoints(parts)] == ["step_00000002", "step_00000003"]
    assert not (parts / "final").exists()
    recipe().main(common + [f"train.output_dir={parts}", "--resume"])
    assert losses(parts) == losses(whole) and len(losses(whole)) == 6
    assert [p.name for p in checkpoints(parts)] == ["step_00000004", "step_00000006"]  # pruned to keep=2


def export_recipe():
    spec = importlib.util.spec_from_file_location("export", RECIPES / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_writes_a_checkpoint_as_a_model(tmp_path):
    run = tmp_path / "run"
    final = recipe().main(SMALL + ["train.steps=4", "train.save_every=2", f"train.output_dir={run}"])
    trained = HSAHybrid.from_pretrained(final).state_dict()
    newest = HSAHybrid.from_pretrained(export_recipe().main([str(run), str(tmp_path / "newest")])).state_dict()
    assert trained.keys() == newest.keys() and all(torch.equal(trained[k], newest[k]) for k in trained)
    step2 = export_recipe().main([str(run), str(tmp_path / "step2"), "--dtype", "bfloat16",
                                  "--checkpoint", str(checkpoints(run)[0])])
    early = safetensors.torch.load_file(str(step2 / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in early.values())
    assert not torch.equal(early["embed.weight"], trained["embed.weight"].to(torch.bfloat16))
    # a run that started from a model, with an override: the export has the override and the new weights
    cont = tmp_path / "continued"
    recipe().main(SMALL + ["train.steps=2", "train.save_every=1", "train.stop_after=1", f"model.checkpoint={final}",
                           "model.overrides.softmax_off_by_one=true", f"train.output_dir={cont}"])
    exported = HSAHybrid.from_pretrained(export_recipe().main([str(cont), str(tmp_path / "cont")]))
    assert exported.config.softmax_off_by_one and exported.config.d_model == 64
    assert not torch.equal(exported.state_dict()["embed.weight"], trained["embed.weight"])
    with pytest.raises(CheckpointError, match="not a training run"):
        export_recipe().main([str(final), str(tmp_path / "x")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_recipe().main([str(empty), str(tmp_path / "x")])


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        recipe().main(SMALL + ["train.steps=2", f"train.output_dir={tmp_path}", "--resume"])
    recipe().main(SMALL + ["train.steps=2", "train.save_every=1", f"train.output_dir={tmp_path}"])
    newest = checkpoints(tmp_path)[-1]
    (newest / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        recipe().main(SMALL + ["train.steps=4", f"train.output_dir={tmp_path}", "--resume"])
    (newest.parent / "step_00000009.tmp").mkdir()  # a half-written checkpoint is never taken for a good one
    assert checkpoints(tmp_path)[-1] == newest


def test_bad_config_keys_and_types_are_named(tmp_path):
    with pytest.raises(RunConfigError, match="train.lrr"):
        load_run_config(None, ["train.lrr=1"])
    with pytest.raises(RunConfigError, match="train.steps must be of type int"):
        load_run_config(None, ["train.steps=many"])
    (tmp_path / "c.yaml").write_text("train:\n  batch_size: [1, 2]\n")
    with pytest.raises(RunConfigError, match="train.batch_size"):
        load_run_config(tmp_path / "c.yaml")
    with pytest.raises(RunConfigError, match="at least 1"):
        load_run_config(None, ["train.steps=0"])
    with pytest.raises(RunConfigError, match="train.context_parallel must be at least 1"):
        load_run_config(None, ["train.context_parallel=0"])
    with pytest.raises(RunConfigError, match="gradient_checkpointing is not supported with train.context_parallel"):
        load_run_config(None, ["train.context_parallel=2", "train.gradient_checkpointing=true"])


def test_context_parallel_without_enough_processes_says_how_to_launch(tmp_path):
    with pytest.raises(ValueError, match="needs 2 processes or a multiple"):
        recipe().main(SMALL + ["train.context_parallel=2", f"train.output_dir={tmp_path}"])
    for name in ("tiny", "small", "ramba-370m"):
        assert load_run_config(RECIPES / "configs" / f"{name}.yaml").model.preset == name


def test_shipped_configs_load_and_the_generalization_stages_chain():
    configs = {path.stem: load_run_config(path) for path in sorted((RECIPES / "configs").glob("*.yaml"))}
    stages = [configs[f"generalization-stage{i}"] for i in range(1, 6)]
    for before, after in zip(stages, stages[1:]):
        assert after.model.checkpoint == f"{before.train.output_dir}/final"
    assert stages[2].data.tasks == ["niah_multikey_2"]


def test_packed_corpus_keeps_documents_apart():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
    rows = list(pack(iter(docs), 6, eos_id=0))
    flat = torch.cat([r["input_ids"] for r in rows]).tolist()
    assert flat == [1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 9, 0, 10, 11, 12, 13, 14, 15]
    assert rows[0]["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1] and rows[1]["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1]
    assert rows[0]["labels"].tolist() == [-100, 2, 3, 0, -100, 5]


def test_training_on_a_jsonl_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": "word " * n}) for n in range(20, 400, 7)))
    final = recipe().main(SMALL + ["train.steps=2", f"data.source={corpus}", f"train.output_dir={tmp_path / 'run'}"])
    assert (final / "model.safetensors").is_file()


@pytest.mark.parametrize("streaming", [True, False])
def test_local_text_and_jsonl_need_no_datasets(tmp_path, monkeypatch, streaming):
    """Local .jsonl (one object a line) and .txt (one record a line) files are read without `datasets`: every
    record once, in an order the seed fixes (a 10,000-record buffer when streaming); .json still needs it."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    texts = [f"document {i} " + "x" * (i % 7) for i in range(12_000 if streaming else 300)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n\n" for i, t in enumerate(texts)))
    (tmp_path / "b.txt").write_text("\n".join(texts) + "\n")
    for name in ("a.jsonl", "b.txt"):
        data = DataSection(source=str(tmp_path / name), streaming=streaming)
        first, again, other = (list(corpus_documents(data, seed)) for seed in (3, 3, 4))
        assert sorted(first) == sorted(texts) and first == again and first != other and first != texts
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ImportError, match="needs the datasets package"):
        next(corpus_documents(DataSection(source=str(tmp_path / "c.json")), 0))
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not a JSON object per line"):
        list(corpus_documents(DataSection(source=str(tmp_path / "bad.jsonl")), 0))


def test_no_weight_decay_on_norms_biases_and_marked():
    model = HSAHybrid(HSAHybridConfig.preset("tiny", local_mixer="mamba2"))
    decay, plain = param_groups(model, 0.1)
    plain_ids = {id(p) for p in plain["params"]}
    for name, p in model.named_parameters():
        expect_plain = p.dim() < 2 or name.endswith(("A_log", "dt_bias", ".D"))
        assert (id(p) in plain_ids) == expect_plain, name


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = HSAHybrid(HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=96))
    ids = torch.randint(0, 259, (2, 200))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_retrieval_hits_count_every_chunk_of_the_needle():
    """A hit is the selection of any chunk the fact overlaps: [needle_pos, needle_end) of chunks of 4 -> 1 and 2."""
    answer_mask = torch.zeros(1, 6, dtype=torch.bool)
    answer_mask[0, 2:6] = True                                   # positions 1..4 predict the answer
    batch = {"answer_mask": answer_mask, "needle_pos": torch.tensor([6]), "needle_end": torch.tensor([10])}
    chosen = [[-1, -1], [0, -1], [1, 0], [2, -1], [3, 0], [3, 2]]  # per position, K = 2 slots
    indices = torch.tensor(chosen).view(1, 6, 1, 2)
    assert retrieval_hits([indices], batch, 4).item() == 0.5     # positions 2 and 3 hit, 1 and 4 miss
