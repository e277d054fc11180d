"""Fine-tuning on long-context tasks: the example stream and recipes/sft.py end to end."""

import importlib.util
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ramba import HSAHybrid, HSAHybridConfig
from ramba.tokenizer import ByteTokenizer
from ramba.training.config import DataSection, ModelSection, RunConfig, RunConfigError, load_run_config
from ramba.training.data import task_examples
from ramba.training.retrieval import retrieval_target_loss, span_targets
from ramba.training.trainer import answer_cross_entropy, build_model, evaluate, fact_targets, model_inputs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOK = ByteTokenizer()


class _Oracle(torch.nn.Module):
    """Predicts every next token of the rows in `right` and a wrong token everywhere in the others."""

    def __init__(self, right: torch.Tensor):
        super().__init__()
        self.right = right

    def forward(self, input_ids, labels=None, doc_ids=None, return_retrieval=False):
        following = torch.roll(input_ids, -1, dims=1)
        predicted = torch.where(self.right[:, None], following, (following + 1) % TOK.vocab_size)
        logits = torch.nn.functional.one_hot(predicted, TOK.vocab_size).float()
        return SimpleNamespace(loss=torch.tensor(0.5), logits=logits, retrieval=None)


def test_model_overrides_apply_to_a_checkpoint(tmp_path):
    config = HSAHybridConfig.preset("tiny", n_lower_layers=1, n_upper_layers=1, hsa_every=1)
    HSAHybrid(config).save_pretrained(tmp_path)
    run = RunConfig(model=ModelSection(checkpoint=str(tmp_path),
                                       overrides={"retrieval_weights": "stick_breaking", "softmax_off_by_one": True}))
    model = build_model(run, TOK.vocab_size)
    assert model.config.retrieval_weights == "stick_breaking" and model.config.softmax_off_by_one
    assert model.config.to_dict() == {**config.to_dict(), "retrieval_weights": "stick_breaking",
                                      "softmax_off_by_one": True}


def test_evaluate_reports_the_answer_accuracy_of_each_task():
    tasks = ["passkey", "niah_single_1", "passkey"]  # a repeated task counts under its first position
    data = DataSection(source="tasks", seq_len=400, min_len=160, tasks=tasks)
    rows = list(itertools.islice(task_examples(data, TOK, seed=5), 16))
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    prompts = [TOK.decode(r["input_ids"].tolist()) for r in rows]
    assert all(("pass key" in text) == (int(r["task"]) == 0) for text, r in zip(prompts, rows))
    right = torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5
    result = evaluate(_Oracle(right), [batch], torch.device("cpu"), tasks)
    for task, name in ((0, "passkey"), (1, "niah_single_1")):
        rows_of_task = batch["task"] == task
        assert result[f"eval_answer_accuracy_{name}"] == pytest.approx(float(right[rows_of_task].float().mean()))
    assert result["eval_answer_accuracy"] == pytest.approx(float(right.float().mean()))
    assert set(result) == {"eval_loss", "eval_answer_accuracy", "eval_answer_accuracy_passkey",
                           "eval_answer_accuracy_niah_single_1"}


def test_evaluate_reports_the_retrieval_weight_on_the_facts_of_each_task():
    """Each task's weight equals the weight on the facts of its rows evaluated alone; the pooled weight is the
    mean over every asked position, so the per-task weights average to it by their positions."""
    torch.manual_seed(0)
    model = HSAHybrid(HSAHybridConfig.preset("tiny", n_lower_layers=1, n_upper_layers=1, hsa_every=1)).eval()
    tasks = ["passkey", "niah_multikey_1"]
    data = DataSection(source="tasks", seq_len=768, min_len=500, tasks=tasks)
    rows = list(itertools.islice(task_examples(data, TOK, seed=11), 8))
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    assert set(batch["task"].tolist()) == {0, 1}
    result = evaluate(model, [batch], torch.device("cpu"), tasks)
    positions = {}
    for task, name in enumerate(tasks):
        alone = {k: v[batch["task"] == task] for k, v in batch.items()}
        with torch.no_grad():
            out = model(**model_inputs(alone), return_retrieval=True)
        targets = fact_targets(alone, model.config.chunk_size)
        want = retrieval_target_loss(out.retrieval, out.retrieval_weights, targets)[1].item()
        assert result[f"eval_retrieval_weight_on_facts_{name}"] == pytest.approx(want, abs=1e-5)
        positions[name] = int(targets.any(-1).sum())
    weighted = sum(result[f"eval_retrieval_weight_on_facts_{n}"] * k for n, k in positions.items())
    pooled = weighted / sum(positions.values())
    assert result["eval_retrieval_weight_on_facts"] == pytest.approx(pooled, abs=1e-5)


def test_task_examples_put_the_loss_on_the_answer_only():
    data = DataSection(source="tasks", seq_len=768, min_len=200, tasks=["passkey", "vt", "qa1", "niah_multikey_1"])
    rows = list(itertools.islice(task_examples(data, TOK, seed=3), 24))
    assert rows[0]["input_ids"].equal(next(task_examples(data, TOK, seed=3))["input_ids"])  # deterministic
    lengths = set()
    for row in rows:
        labeled = (row["labels"] != -100).nonzero()[:, 0]
        start, end = int(labeled[0]), int(labeled[-1]) + 1
        assert labeled.tolist() == list(range(start, end))  # one contiguous answer span
        assert row["input_ids"][end - 1] == TOK.eos_id and row["answer_mask"].sum() == end - start - 1
        assert bool((row["input_ids"][end:] == TOK.pad_id).all())
        assert 200 <= start < 768
        lengths.add(start)
    assert len(lengths) > 12  # prompt lengths are mixed


def test_task_examples_with_the_loss_on_all_tokens():
    kwargs = dict(source="tasks", seq_len=640, min_len=200, tasks=["passkey", "niah_multikey_1"])
    answer_only = itertools.islice(task_examples(DataSection(**kwargs), TOK, seed=4), 12)
    every = itertools.islice(task_examples(DataSection(**kwargs, loss="all"), TOK, seed=4), 12)
    for a, b in zip(answer_only, every):
        assert a["input_ids"].equal(b["input_ids"]) and a["answer_mask"].equal(b["answer_mask"])
        end = int((a["labels"] != -100).nonzero()[-1]) + 1  # after the eos: padding only
        assert b["labels"][:end].equal(b["input_ids"][:end]) and bool((b["labels"][end:] == -100).all())
    with pytest.raises(RunConfigError, match="data.loss"):
        RunConfig(data=DataSection(loss="prompt")).validate()


def test_task_examples_reject_unknown_tasks():
    with pytest.raises(ValueError, match="known tasks"):
        next(task_examples(DataSection(source="tasks", tasks=["passkey", "sudoku"]), TOK, seed=0))


def test_sft_recipe_fine_tunes_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = HSAHybrid(HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=128))
    base.save_pretrained(tmp_path / "base")
    spec = importlib.util.spec_from_file_location("sft", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    final = sft.main([f"model.checkpoint={tmp_path / 'base'}", "train.steps=3", "train.batch_size=2",
                      "data.seq_len=384", "data.min_len=200", "data.tasks=[passkey, vt]", "data.eval_sequences=2",
                      f"train.output_dir={tmp_path / 'run'}"])
    tuned = HSAHybrid.from_pretrained(final)
    assert tuned.config == base.config
    assert not torch.equal(tuned.embed.weight, base.embed.weight)


def test_fact_spans_mark_the_needles_that_answer():
    """task_examples' fact_spans cover the inserted facts that hold the answer (multi-key: not the others)."""
    data = DataSection(source="tasks", seq_len=600, min_len=300, tasks=["niah_multikey_1", "passkey"])
    for row in itertools.islice(task_examples(data, TOK, seed=3), 12):
        spans = [(a, b) for a, b in row["fact_spans"].tolist() if a >= 0]
        answer = TOK.decode(row["input_ids"][row["answer_mask"]].tolist())
        assert spans and all(answer in TOK.decode(row["input_ids"][a:b].tolist()) for a, b in spans), (spans, answer)
        assert all(b <= int(row["answer_mask"].nonzero()[0]) for _, b in spans)  # inside the prompt


def test_span_targets_against_a_loop():
    gen = torch.Generator().manual_seed(4)
    B, L, F, S = 3, 50, 4, 8
    starts = torch.randint(0, L - 5, (B, F), generator=gen)
    spans = torch.stack([starts, starts + torch.randint(1, 12, (B, F), generator=gen)], dim=-1)
    spans[0, 2:] = -1  # fewer facts in row 0
    predicting = torch.rand(B, L, generator=gen) < 0.3
    got = span_targets(spans, predicting, S)
    C = -(-L // S)
    want = torch.zeros(B, L, C, dtype=torch.bool)
    for b in range(B):
        for a, e in spans[b].tolist():
            for c in range(C):
                if a >= 0 and a < (c + 1) * S and e > c * S:
                    want[b, :, c] |= predicting[b]
    assert torch.equal(got, want)


def test_the_retrieval_loss_teaches_where_the_answer_lies(tmp_path):
    """sft with train.retrieval_loss=1 puts the retrieval weight on the asked fact's chunk (held-out weight near
    1 after 20 steps); the same run without it stays well below."""
    spec = importlib.util.spec_from_file_location("sft", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    weight = {}
    for w in (0, 1):
        out = tmp_path / f"w{w}"
        sft.main(["model.preset=tiny", "model.overrides={window: 32, hsa_residual: standard, d_model: 64, "
                  "num_heads: 2, head_dim: 32, intermediate_size: 128}", "data.source=tasks", "data.tasks=[passkey]",
                  "data.seq_len=320", "data.min_len=160", "data.eval_sequences=8", "train.steps=20",
                  "train.batch_size=8", "train.lr=1e-3", "train.warmup=5", "train.eval_every=20",
                  f"train.retrieval_loss={w}", f"train.output_dir={out}"])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weight[w] = [r["eval_retrieval_weight_on_facts"] for r in rows if "eval_retrieval_weight_on_facts" in r][-1]
        assert (w == 1) == any("retrieval_weight_on_facts" in r for r in rows)  # the training metric too
    assert weight[1] > 0.95 and weight[1] > weight[0] + 0.1, weight


@pytest.mark.parametrize("setting,message", [(["train.retrieval_loss=-1"], ">= 0"),
                                             (["data.source=builtin", "train.retrieval_loss=1"], "data.source=tasks"),
                                             (["train.retrieval_loss=1", "train.context_parallel=2"], "context_parallel")])
def test_bad_retrieval_loss_settings_are_refused(setting, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config(RECIPES / "configs" / "generalization-stage1.yaml", setting)


def test_the_answer_loss_is_the_mean_cross_entropy_on_the_answer_tokens():
    """answer_cross_entropy on random logits over data.loss=all examples equals the mean, over each row's answer
    tokens (not its eos), of minus the log-probability that the position before gave to that token; a batch
    without answer tokens gives 0 and zero gradients."""
    torch.manual_seed(3)
    data = DataSection(source="tasks", tasks=["passkey", "niah_single_1"], seq_len=256, min_len=64, loss="all")
    rows = list(itertools.islice(task_examples(data, TOK, seed=5), 4))
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    assert (batch["labels"][:, :10] != -100).all()  # loss=all: the prompt carries labels too
    logits = torch.randn(4, 256, TOK.vocab_size, requires_grad=True)
    terms = []
    for b in range(4):
        for t in range(1, 256):
            if batch["answer_mask"][b, t]:
                terms.append(-torch.log_softmax(logits[b, t - 1].double(), -1)[batch["input_ids"][b, t]])
    assert len(terms) >= 4
    got = answer_cross_entropy(logits, batch)
    assert torch.allclose(got.double(), torch.stack(terms).mean(), atol=1e-5)
    empty = dict(batch, answer_mask=torch.zeros_like(batch["answer_mask"]))
    zero = answer_cross_entropy(logits, empty)
    zero.backward()
    assert zero.item() == 0 and logits.grad is not None and not logits.grad.any()


def test_the_answer_loss_changes_the_update(tmp_path):
    """Two sft steps from the same weights and data, with data.loss=all: train.answer_loss=5 ends at other weights
    than train.answer_loss=0 (the term reaches the gradient); bad settings are refused."""
    spec = importlib.util.spec_from_file_location("sft", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=128)
    HSAHybrid(config).save_pretrained(tmp_path / "base")
    weights = {}
    for w in (0, 5):
        final = sft.main([f"model.checkpoint={tmp_path / 'base'}", "train.steps=2", "train.batch_size=2",
                          "data.seq_len=256", "data.min_len=100", "data.tasks=[passkey]", "data.eval_sequences=2",
                          "data.loss=all", f"train.answer_loss={w}", f"train.output_dir={tmp_path / str(w)}"])
        weights[w] = dict(HSAHybrid.from_pretrained(final).named_parameters())
    assert any(not torch.equal(weights[0][n], weights[5][n]) for n in weights[0])
    for setting, message in [(["train.answer_loss=-1"], ">= 0"),
                             (["data.source=builtin", "train.answer_loss=1"], "data.source=tasks"),
                             (["train.answer_loss=1", "train.context_parallel=2"], "context_parallel")]:
        with pytest.raises(RunConfigError, match=message):
            load_run_config(RECIPES / "configs" / "generalization-stage1.yaml", setting)


def test_training_only_the_selection_moves_only_the_cls_landmark_and_query_projections(tmp_path):
    """train.trainable=selection: after sft steps with the retrieval loss, the CLS vector, the landmark projection
    and every HSA block's retrieval-query projection have changed, and every other weight is bit-identical."""
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=128)
    base = HSAHybrid(config)
    base.save_pretrained(tmp_path / "base")
    hsa_blocks = [i for i in range(config.n_upper_layers) if i % config.hsa_every == 0]  # each group's first
    selection = {"encoder.cls", "encoder.lmk_proj.weight", *(f"upper.{i}.hsa.qr_proj.weight" for i in hsa_blocks)}
    assert set(base.selection_parameters()) == selection and hsa_blocks
    spec = importlib.util.spec_from_file_location("sft", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    final = sft.main([f"model.checkpoint={tmp_path / 'base'}", "train.steps=2", "train.batch_size=2",
                      "data.seq_len=384", "data.min_len=200", "data.tasks=[passkey]", "data.eval_sequences=2",
                      "train.retrieval_loss=1", "train.trainable=selection", f"train.output_dir={tmp_path / 'run'}"])
    tuned = dict(HSAHybrid.from_pretrained(final).named_parameters())
    for name, p in base.named_parameters():
        assert torch.equal(tuned[name], p) != (name in selection), name
    with pytest.raises(RunConfigError, match="train.trainable must be all or selection"):
        load_run_config(RECIPES / "configs" / "generalization-stage1.yaml", ["train.trainable=reader"])
    with pytest.raises(ValueError, match="use_hsa=false"):
        sft.main(["model.preset=tiny", "model.overrides={use_hsa: false}", "train.trainable=selection",
                  f"train.output_dir={tmp_path / 'plain'}"])
