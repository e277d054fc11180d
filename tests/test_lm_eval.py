"""ramba.integrations.lm_eval: RambaLM against an independent full forward (no cache), a local multiple-choice
task through lm_eval.simple_evaluate, and the `python -m ramba.integrations.lm_eval` command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from ramba.integrations.lm_eval import RambaLM, _with_default_model  # noqa: E402
from ramba.tokenizer import ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PASSKEY = ROOT / "benchmarks" / "models" / "swa-passkey"
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"
TASK = "ramba_passkey_mc"
SEGMENT = 64  # small, so that the contexts below take several cached segments
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

HAYSTACK = ("The sky is clear and the sea is calm. The pass key is 48213. Remember it. 48213 is the pass key. "
            "A boat drifts past the old pier. The fields are green. Nothing much happens here. Birds sing in the "
            "morning. Then it all starts over. The fields are green. What is the pass key? The pass key is")
LOGLIKELIHOOD = [
    (HAYSTACK, " 48213"),  # a context of ~4.5 segments
    ("", "The fields are green."),  # empty context: the EOT token
    ("Then it all ", "starts over."),  # trailing space in the context
    ("A", " boat drifts past the old pier. " * 4),  # a continuation over more than two segments
    (HAYSTACK[:SEGMENT], " x"),  # the context ends exactly at a segment boundary
    (HAYSTACK[:SEGMENT - 1], " x"),
]
ROLLING = [HAYSTACK, "", "x", HAYSTACK[:SEGMENT], HAYSTACK[:SEGMENT + 1] + "\u00e9\u00e8"]


@pytest.fixture(scope="module")
def passkey_lm():
    return RambaLM(pretrained=str(PASSKEY), dtype="float32", segment_size=SEGMENT)


@pytest.fixture(scope="module")
def random_lm():
    # model arguments as strings, as lm-eval may pass them; three rows per batch
    return RambaLM(pretrained="builtin:tiny-random", dtype="float32", segment_size=str(SEGMENT), batch_size="3")


def requests(kind, args):
    return [Instance(kind, {}, tuple(a) if isinstance(a, tuple) else (a,), i) for i, a in enumerate(args)]


def full_scores(model, ids, k):
    """log P(last k ids | the ids before) and whether each is the argmax, from one forward without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = F.log_softmax(logits[len(ids) - 1 - k:len(ids) - 1], dim=-1)
    target = torch.tensor(ids[len(ids) - k:])
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def reference_loglikelihood(model, context, continuation):
    """lm-eval's convention: the context's trailing spaces are scored with the continuation."""
    tok = ByteTokenizer()
    stripped = context.rstrip()
    context_ids = tok.encode(stripped) or [tok.eos_id]
    continuation_ids = tok.encode(context[len(stripped):] + continuation)
    return full_scores(model, context_ids + continuation_ids, len(continuation_ids))


@pytest.mark.parametrize("name", ["passkey_lm", "random_lm"])
def test_loglikelihood_matches_full_forward(name, request):
    lm = request.getfixturevalue(name)
    results = lm.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD), disable_tqdm=True)
    assert len(results) == len(LOGLIKELIHOOD)
    for (context, continuation), (ll, greedy) in zip(LOGLIKELIHOOD, results):
        ref_ll, ref_greedy = reference_loglikelihood(lm.model, context, continuation)
        assert isinstance(ll, float) and isinstance(greedy, bool)
        assert ll == pytest.approx(ref_ll, abs=1e-4, rel=1e-6), (context[:20], continuation[:20])
        assert greedy == ref_greedy
    if name == "passkey_lm":
        assert results[0][1], "the trained model reads the pass key greedily"


def test_loglikelihood_empty_continuation(random_lm):
    assert random_lm.loglikelihood(requests("loglikelihood", [("abc", "")]), disable_tqdm=True) == [(0.0, True)]


@pytest.mark.parametrize("name", ["passkey_lm", "random_lm"])
def test_loglikelihood_rolling_matches_full_forward(name, request):
    lm = request.getfixturevalue(name)
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", ROLLING), disable_tqdm=True)
    tok = ByteTokenizer()
    for text, ll in zip(ROLLING, results):
        ids = tok.encode(text)
        ref = full_scores(lm.model, [tok.eos_id, *ids], len(ids))[0] if ids else 0.0
        assert isinstance(ll, float)
        assert ll == pytest.approx(ref, abs=1e-4, rel=1e-6), text[:20]


def test_batched_rows_equal_single_rows(random_lm):
    """batch_size=3 (left padding in the first segment) against one row at a time; rows of very different
    lengths go into different batches."""
    single = RambaLM(pretrained="builtin:tiny-random", dtype="float32", segment_size=SEGMENT)
    args = LOGLIKELIHOOD + [(HAYSTACK * 3, " 48213"), ("a", "b")]
    batched = random_lm.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    alone = single.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    for (b_ll, b_greedy), (s_ll, s_greedy) in zip(batched, alone):
        assert b_ll == pytest.approx(s_ll, abs=1e-4, rel=1e-6) and b_greedy == s_greedy


@pytest.mark.parametrize("name", ["passkey_lm", "random_lm"])
def test_generate_until_matches_greedy_generate(name, request):
    lm = request.getfixturevalue(name)
    tok = ByteTokenizer()
    cases = [(HAYSTACK, {"until": ["."], "max_gen_toks": 12, "do_sample": False, "temperature": 0.0}),
             ("", {"until": "e", "max_gen_toks": 5}),
             ("The fields are", {"max_gen_toks": 8})]
    results = lm.generate_until(requests("generate_until", cases), disable_tqdm=True)
    for (context, kwargs), text in zip(cases, results):
        ids = tok.encode(context) or [tok.eos_id]
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=kwargs["max_gen_toks"], stop_tokens=[tok.eos_id])
        new = out[0, len(ids):].tolist()
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
        expected = tok.decode(new)
        until = kwargs.get("until", [])
        for stop in [until] if isinstance(until, str) else until:
            expected = expected.split(stop)[0]
        assert text == expected
    if name == "passkey_lm":
        assert results[0].strip() == "48213"


def test_generate_until_rejects_unknown_arguments(random_lm):
    with pytest.raises(ValueError, match="num_beams"):
        random_lm.generate_until(requests("generate_until", [("a", {"until": ["."], "num_beams": 2})]))
    with pytest.raises(ValueError, match="max_gen_toks"):
        random_lm.generate_until(requests("generate_until", [("a", {"max_gen_toks": "many"})]))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="segment_sise"):
        RambaLM(pretrained="builtin:tiny-random", segment_sise=64)
    with pytest.raises(ValueError, match="batch_size"):
        RambaLM(pretrained="builtin:tiny-random", batch_size="zero")
    with pytest.raises(ValueError, match="segment_size"):
        RambaLM(pretrained="builtin:tiny-random", segment_size=0)
    with pytest.raises(ValueError, match="builtin:nope"):
        RambaLM(pretrained="builtin:nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda:0"):
            RambaLM(pretrained="builtin:tiny-random", device="cuda:0")


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("ramba") is RambaLM


def write_task(tmp_path):
    """The checked-in task YAML with the data path made absolute and the datasets cache in tmp_path."""
    config = yaml.safe_load((TASK_DIR / f"{TASK}.yaml").read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(TASK_DIR / "passkey_mc.jsonl")},
                                "cache_dir": str(tmp_path / "datasets")}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "tasks"


def test_simple_evaluate_multiple_choice(tmp_path, monkeypatch, passkey_lm):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    from lm_eval.tasks import TaskManager

    docs = [json.loads(line) for line in (TASK_DIR / "passkey_mc.jsonl").read_text().splitlines()]
    assert len(docs) >= 8
    results = lm_eval.simple_evaluate(model="ramba", model_args=f"pretrained={PASSKEY},dtype=float32,segment_size=128",
                                      tasks=[TASK], task_manager=TaskManager(include_path=str(write_task(tmp_path))),
                                      device="cpu", bootstrap_iters=0, log_samples=True)
    # independently: for each item, the argmax over choices of log P(" " + choice | question) from a full forward
    correct = []
    samples = {s["doc_id"]: s for s in results["samples"][TASK]}
    for i, doc in enumerate(docs):
        refs = [reference_loglikelihood(passkey_lm.model, doc["question"], " " + c)[0] for c in doc["choices"]]
        assert [tuple(a) for a in samples[i]["arguments"]] == [(doc["question"], " " + c) for c in doc["choices"]]
        assert [r[0][0] for r in samples[i]["resps"]] == pytest.approx(refs, abs=1e-4, rel=1e-6)
        correct.append(max(range(len(refs)), key=refs.__getitem__) == doc["gold"])
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_with_default_model(tmp_path):
    args = ["--tasks", "t", "--device", "cpu"]
    assert _with_default_model(args) == [*args, "--model", "ramba"]
    assert _with_default_model(["run", *args]) == ["run", *args, "--model", "ramba"]
    assert _with_default_model(["--model", "hf", *args]) == ["--model", "hf", *args]
    assert _with_default_model(["ls", "tasks"]) == ["ls", "tasks"]
    assert _with_default_model([]) == []
    config = tmp_path / "run.yaml"
    config.write_text("model: hf\n")
    assert _with_default_model(["--config", str(config)]) == ["--config", str(config)]


def test_command_line(tmp_path):
    """python -m ramba.integrations.lm_eval with the checked-in task, run from the repository root."""
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    cmd = [sys.executable, "-m", "ramba.integrations.lm_eval", "--model_args",
           f"pretrained={PASSKEY.relative_to(ROOT)},dtype=float32", "--tasks", TASK, "--include_path",
           str(TASK_DIR.relative_to(ROOT)), "--device", "cpu", "--limit", "3"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith(f"|{TASK}")]
    assert table and "|acc" in table[0], done.stdout[-3000:]


def test_import_ramba_does_not_import_lm_eval():
    code = "import sys, ramba; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lm_eval'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
