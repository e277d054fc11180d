"""The retrieval loss over every visible chunk: the scores of all chunks against the selection's, the loss
against a loop, and a run where it teaches what the loss over the selected chunks cannot."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ramba import HSAHybrid, HSAHybridConfig
from ramba.ops.retrieve import chunk_scores, retrieve_reference
from ramba.training.config import RunConfigError, load_run_config
from ramba.training.retrieval import all_chunk_scores, all_chunks_loss

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(1, 40), st.integers(1, 2), st.integers(1, 9), st.sampled_from([2, 4]),
       st.sampled_from([None, 8]), st.integers(0, 2**31 - 1))
def test_every_chunks_score_matches_the_selection(B, L, Hr, C, S, window, seed):
    """chunk_scores gives the selected chunks the scores the reference retrieval gives them, -inf exactly to the
    chunks a position cannot see, and every visible chunk left out of the top-k scores no higher than the
    lowest selected one."""
    g = torch.Generator().manual_seed(seed)
    qr, lmk = torch.randn(B, L, Hr, 8, generator=g), torch.randn(B, C, Hr, 8, generator=g)
    positions = torch.arange(L).expand(B, L) + torch.randint(0, 3 * S, (B, 1), generator=g)
    window = None if window is None else max(window, S)
    K = 3
    indices, scores = retrieve_reference(qr, lmk, K, S, positions, window)
    every = chunk_scores(qr, lmk, S, positions, window)
    assert every.shape == (B, L, Hr, C)
    limit = positions if window is None else positions - window + S
    for b in range(B):
        for t in range(L):
            seen = min(C, int(limit[b, t]) // S) if int(limit[b, t]) >= 0 else 0
            for h in range(Hr):
                assert torch.isinf(every[b, t, h, seen:]).all() and torch.isfinite(every[b, t, h, :seen]).all()
                picked = [int(i) for i in indices[b, t, h] if i >= 0]
                assert len(picked) == min(K, seen)
                for k, i in enumerate(picked):
                    assert float(every[b, t, h, i]) == pytest.approx(float(scores[b, t, h, k]), rel=1e-5, abs=1e-6)
                rest = [float(every[b, t, h, i]) for i in range(seen) if i not in picked]
                if picked and rest:
                    assert max(rest) <= min(float(every[b, t, h, i]) for i in picked) + 1e-6


def loop_loss(scores, targets):
    terms = []
    for s in scores:
        B, L, H, C = s.shape
        for b in range(B):
            for t in range(L):
                for h in range(H):
                    seen = [c for c in range(C) if math.isfinite(float(s[b, t, h, c]))]
                    wanted = [c for c in seen if targets[b, t, c]]
                    if wanted:
                        z = sum(math.exp(float(s[b, t, h, c])) for c in seen)
                        terms.append(-math.log(sum(math.exp(float(s[b, t, h, c])) for c in wanted) / z))
    return sum(terms) / len(terms)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(1, 8), st.integers(1, 2), st.integers(1, 6), st.integers(1, 3),
       st.integers(0, 2**31 - 1))
def test_the_loss_over_all_chunks_equals_the_loop(B, L, H, C, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(blocks):
        s = torch.randn(B, L, H, C, generator=g)
        scores.append(s.masked_fill(torch.rand(B, L, 1, C, generator=g) < 0.3, float("-inf")))
    targets = torch.rand(B, L, C + 1, generator=g) < 0.4  # one more column, as span_targets' ceil gives
    scores[0][0, 0, 0, 0] = 0.5
    targets[0, 0, 0] = True  # at least one visible target
    got = all_chunks_loss(scores, targets)
    assert float(got) == pytest.approx(loop_loss(scores, targets), rel=1e-5, abs=1e-6)


def test_no_visible_target_gives_an_attached_zero_and_the_target_is_pulled_up():
    s = torch.tensor([[[[0.3, float("-inf")]]]], requires_grad=True)
    zero = all_chunks_loss([s], torch.tensor([[[False, True]]]))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    s = torch.tensor([[[[2.0, -1.0, 0.5]]]], requires_grad=True)  # the target (1) would not be in a top-1
    all_chunks_loss([s], torch.tensor([[[False, True, False]]])).backward()
    assert s.grad[0, 0, 0, 1] < 0 and s.grad[0, 0, 0, 0] > 0 and s.grad[0, 0, 0, 2] > 0


def test_the_model_hands_out_every_chunks_scores():
    """Inside all_chunk_scores each HSA block's scores of all chunks come out, in block order, and the model's own
    selection is their top-k."""
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=128, topk=2)
    model = HSAHybrid(config)
    ids = torch.randint(0, 259, (2, 300))
    with all_chunk_scores(model) as sink:
        out = model(ids, return_retrieval=True)
    assert len(sink) == len(out.retrieval) >= 1
    for s, picked in zip(sink, out.retrieval):
        assert s.shape == (2, 300, config.num_retrieval_heads, 300 // config.chunk_size)
        top = torch.topk(s.nan_to_num(neginf=-1e30), 2, dim=-1).indices.sort(-1, descending=True).values
        visible = torch.isfinite(s).sum(-1, keepdim=True) >= 2
        assert torch.equal(torch.where(visible, top, picked), picked)
    assert all(m.scores_sink is None for m in model.modules() if hasattr(m, "scores_sink"))
    with pytest.raises(ValueError, match="HSA blocks"):
        with all_chunk_scores(HSAHybrid(HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32,
                                                               intermediate_size=128, use_hsa=False))):
            pass


def test_with_top_1_only_the_loss_over_all_chunks_finds_the_pass_key(tmp_path):
    """Top-1 retrieval of pass-key prompts of 5-9 chunks: the loss over the selected chunk gives no gradient
    wherever the needle's chunk is not the one selected, so the weight on it stays near what the start gives;
    the loss over all chunks pulls the needle's chunk up, and after the same 20 steps it is selected far more."""
    spec = importlib.util.spec_from_file_location("sft", RECIPES / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft)
    weight = {}
    for over in ("selected", "all"):
        out = tmp_path / over
        sft.main(["model.preset=tiny", "model.overrides={window: 32, hsa_residual: standard, d_model: 64, "
                  "num_heads: 2, head_dim: 32, intermediate_size: 128, topk: 1}", "data.source=tasks",
                  "data.tasks=[passkey]", "data.seq_len=576", "data.min_len=320", "data.eval_sequences=16",
                  "train.steps=20", "train.batch_size=8", "train.lr=2e-3", "train.warmup=5", "train.eval_every=20",
                  "train.retrieval_loss=1", f"train.retrieval_loss_over={over}", f"train.output_dir={out}"])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weight[over] = [r["eval_retrieval_weight_on_facts"] for r in rows if "eval_retrieval_weight_on_facts" in r][-1]
    assert weight["all"] > 0.8 and weight["all"] > weight["selected"] + 0.3, weight


@pytest.mark.parametrize("setting,message", [(["train.retrieval_loss_over=some"], "selected or all"),
                                             (["train.retrieval_loss=0", "train.retrieval_loss_over=all"],
                                              "retrieval_loss > 0"),
                                             (["train.retrieval_loss=1", "train.retrieval_loss_over=all",
                                               "train.gradient_checkpointing=true"], "gradient_checkpointing")])
def test_bad_retrieval_loss_over_settings_are_refused(setting, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config(RECIPES / "configs" / "generalization-stage1.yaml", setting)
