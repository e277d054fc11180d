"""Training runs are never lost or mixed up: one run per folder, what --resume checks and warns about,
clear errors for damaged checkpoints, validated run configs, and checkpoints that survive kill -9."""

import json
import logging
import math
import os
import random
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st

from ramba.training.checkpoint import STATE_FILE, CheckpointError, checkpoints
from ramba.training.config import RunConfig, RunConfigError, load_run_config
from tests.test_pretrain import RECIPES, SMALL, export_recipe, losses, recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = SMALL + ["train.save_every=1", "train.eval_every=100"]


pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain(folder: Path, *args: str) -> Path:
    return recipe().main(TINY + [f"train.output_dir={folder}", *args])


def test_a_new_run_refuses_a_folder_that_holds_another_and_overwrite_starts_clean(tmp_path):
    pretrain(tmp_path, "train.steps=3")
    with pytest.raises(CheckpointError, match=r"holds another run \(checkpoints up to step_00000003\).*--resume.*"
                                              r"--overwrite"):
        pretrain(tmp_path, "train.steps=2", "train.lr=1e-3")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]
    pretrain(tmp_path, "train.steps=1", "train.lr=1e-3", "--overwrite")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000001"]  # the new run's, not the old ones
    assert list(losses(tmp_path)) == [1] and load_run_config(tmp_path / "config.yaml").train.lr == 1e-3


def test_resume_refuses_other_settings_naming_them_and_takes_overrides_after_the_flag(tmp_path):
    pretrain(tmp_path, "train.steps=3", "train.stop_after=1")
    with pytest.raises(CheckpointError, match=r"other settings: model.overrides.softmax_off_by_one '\(not set\)' "
                                              r"then, True now; train.lr 0.003 then, 0.001 now"):
        pretrain(tmp_path, "train.steps=3", "--resume", "train.lr=1e-3", "model.overrides.softmax_off_by_one=true")
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000001"]
    # the README's form: the flag, then overrides (not a checkpoint named train.steps=3)
    recipe().main(["--resume", "train.steps=3", *TINY, f"train.output_dir={tmp_path}"])
    assert list(losses(tmp_path)) == [1, 2, 3]


def test_resume_warns_about_a_changed_batch_and_a_missing_or_damaged_rng_state(tmp_path, caplog):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    pretrain(whole, "train.steps=3")
    pretrain(parts, "train.steps=3", "train.stop_after=1")
    rng = checkpoints(parts)[-1] / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, "ramba.train"):
        pretrain(parts, "train.steps=3", "train.stop_after=2", "train.batch_size=1", "train.grad_accum=2", "--resume")
    text = caplog.text
    assert "random_states_0.pkl is damaged" in text and "random draws" in text
    assert "train.batch_size 2 -> 1, train.grad_accum 1 -> 2: each step still takes 2 sequences" in text
    # the data went on from the right sequence: same losses as the uninterrupted run (up to rounding)
    assert losses(parts).keys() == {1, 2} and math.isclose(losses(parts)[2], losses(whole)[2], rel_tol=1e-4)
    (checkpoints(parts)[-1] / "random_states_0.pkl").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "ramba.train"):
        pretrain(parts, "train.steps=3", "--resume")
    assert "random_states_0.pkl is missing" in caplog.text
    assert "train.batch_size 1 -> 2, train.grad_accum 2 -> 1: each step still takes 2 sequences" in caplog.text


def test_a_checkpoint_of_another_model_is_a_mismatch_and_a_bad_state_file_is_named(tmp_path):
    pretrain(tmp_path, "train.steps=2", "train.stop_after=1")
    state_file = checkpoints(tmp_path)[-1] / STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "config"}))  # an older version's
    with pytest.raises(CheckpointError, match=r"does not fit the model asked for: .*embed.weight is \[259, 64\] "
                                              r"there, \[259, 96\] here") as err:
        pretrain(tmp_path, "train.steps=2", "model.overrides.d_model=96", "--resume")
    assert "corrupt" not in str(err.value)
    state_file.write_text(json.dumps({"config": state["config"], "sequences": 2}))
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE} lacks step"):
        pretrain(tmp_path, "train.steps=2", "--resume")
    state_file.write_text(json.dumps({**state, "step": -1}))
    with pytest.raises(CheckpointError, match=r"has step=-1"):
        pretrain(tmp_path, "train.steps=2", "--resume")


def test_export_of_a_broken_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    pretrain(tmp_path / "run", "train.steps=1")
    weights = checkpoints(tmp_path / "run")[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{weights} cannot be loaded"):
        export_recipe().main([str(tmp_path / "run"), str(tmp_path / "out")])
    monkeypatch.setattr(sys, "argv", ["export.py", str(tmp_path / "run"), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(RECIPES / "export.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith(f"error: {weights} cannot be loaded") and "\n" not in message


# ----------------------------------------------------------------------------------------- run config fields
NUMBERS = {  # field: (a valid value, bad values of the right type)
    "train.steps": (5, [0, -1]), "train.batch_size": (2, [0]), "train.grad_accum": (1, [0]),
    "train.log_every": (1, [0]), "train.eval_every": (1, [0]), "train.save_every": (1, [0]), "train.keep": (1, [0]),
    "train.warmup": (0, [-1]), "train.seed": (3, [-2]), "train.stop_after": (2, [0]), "data.seq_len": (64, [0]),
    "data.min_len": (16, [0]), "data.eval_sequences": (1, [0]),
    "train.lr": (1e-3, [0.0, -1e-3, math.nan, math.inf]), "train.clip": (1.0, [0.0, -1.0, math.nan]),
    "train.weight_decay": (0.0, [-0.1, math.nan]), "train.min_lr_ratio": (0.5, [-0.1, 1.5, math.nan]),
}
WORDS = {"train.mixed_precision": "bf16", "train.compile": "default", "data.loss": "all", "data.tokenizer": "byte",
         "train.output_dir": "runs/x"}
FLAGS = ("train.gradient_checkpointing", "train.tensorboard", "data.streaming")


def _set(run: RunConfig, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(run, section), name, value)


def _wrong_type(key: str):
    if key in FLAGS:
        return st.sampled_from(["false", "no", 0, 1, None])
    if key in WORDS:
        return st.sampled_from([1, True, ["a"], None])
    kind = type(NUMBERS[key][0])
    return st.sampled_from(["many", [1], True] + (["1.5", 2.5] if kind is int else [None]))


@settings(max_examples=80, deadline=None)
@given(key=st.sampled_from(sorted(NUMBERS) + sorted(WORDS) + list(FLAGS)), data=st.data(), in_yaml=st.booleans())
def test_every_config_field_is_checked_by_name(key, data, in_yaml):
    """A value of the wrong type or out of range, set in Python or given as an override, is a RunConfigError
    naming the field; a good value passes."""
    bad = data.draw(_wrong_type(key) if key not in NUMBERS or data.draw(st.booleans(), "wrong type")
                    else st.sampled_from(NUMBERS[key][1]), "bad")
    if in_yaml:
        with pytest.raises(RunConfigError, match=key.replace(".", r"\.")):
            load_run_config(None, [f"{key}={json.dumps(bad)}"])
    run = RunConfig()
    _set(run, key, bad)
    with pytest.raises(RunConfigError, match=key.replace(".", r"\.")):
        run.validate()
    good = RunConfig()
    _set(good, key, NUMBERS[key][0] if key in NUMBERS else WORDS.get(key, True))
    good.validate()


def test_mixed_precision_no_unquoted_and_haystack_type():
    """YAML reads `no` as false: train.mixed_precision=no and train.compile=no still mean no; a mode torch.compile
    does not have is refused by name."""
    assert load_run_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_run_config(None, ["train.compile=no"]).train.compile == "no"
    with pytest.raises(RunConfigError, match=r"train\.compile must be no, default, reduce-overhead or max-autotune"):
        load_run_config(None, ["train.compile=fast"])
    with pytest.raises(RunConfigError, match=r"data\.haystack must be of type"):
        load_run_config(None, ["data.source=tasks", "data.haystack=[essay]"])
    assert load_run_config(None, ["data.source=tasks", "data.haystack=essay"]).data.haystack == "essay"


def test_list_items_are_checked():
    with pytest.raises(RunConfigError, match=r"train.betas\[1\] must be of type float"):
        load_run_config(None, ["train.betas=[0.9, high]"])
    with pytest.raises(RunConfigError, match=r"train.betas must be two numbers in \[0, 1\)"):
        load_run_config(None, ["train.betas=[0.9, 1.5]"])
    with pytest.raises(RunConfigError, match=r"data.tasks\[0\] must be of type str"):
        load_run_config(None, ["data.tasks=[1]"])


# ------------------------------------------------------------------------------------------ fault injection
SAVER = """
import sys
import torch
from accelerate import Accelerator
from ramba.training.checkpoint import checkpoints, save_checkpoint, step_of
out = sys.argv[1]
accelerator = Accelerator(cpu=True)
model, optimizer = accelerator.prepare(torch.nn.Linear(256, 256), torch.optim.SGD([torch.zeros(1)], lr=0.1))
found = checkpoints(out)
for step in range(step_of(found[-1]) + 1 if found else 1, 10**6):
    with torch.no_grad():
        model.weight.fill_(step)
    save_checkpoint(accelerator, out, step, {"sequences": step}, keep=2)
    print(step, flush=True)
"""


def test_checkpoint_savers_killed_at_random_moments_keep_every_complete_checkpoint(tmp_path):
    """Fault injection: a process saving checkpoints in a loop (keep=2) is SIGKILLed at random moments;
    afterwards the newest complete checkpoint is at least the last one it reported, and every checkpoint
    that looks complete is whole: its state and weights load and agree with its step."""
    rng = random.Random(0)
    last, start = 0, time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for _ in range(4):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                 env=env)
        first = saver.stdout.readline()  # imports done, one checkpoint written
        assert first, "the saver died before its first checkpoint"
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(saver.pid, signal.SIGKILL)
        rest, _ = saver.communicate()
        last = max([last, *map(int, (first + rest).split())])
        found = checkpoints(tmp_path)
        assert found and int(found[-1].name[5:]) >= last
        for folder in found:
            step = int(folder.name[5:])
            assert json.loads((folder / STATE_FILE).read_text()) == {"sequences": step, "step": step}
            weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
            assert torch.equal(weights["weight"], torch.full((256, 256), float(step)))
        if time.monotonic() - start > 15:
            break


def test_max_minutes_ends_the_run_with_its_schedule_decayed_and_counts_resumed_time(tmp_path, monkeypatch):
    import types

    import ramba.training.trainer as trainer
    from ramba.training.optim import lr_lambda
    ticks = iter(range(0, 10**6, 30))  # a clock that advances 30 s at each reading
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    # 2 minutes: the loop's start reads 0 s, steps 1-4 end at 30-120 s; step 4 spends the budget
    final = pretrain(tmp_path, "train.steps=100", "train.max_minutes=2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert final == tmp_path / "final" and (final / "model.safetensors").exists() and sorted(lrs) == [1, 2, 3, 4]
    schedule = lr_lambda(2, 100, 0.1)  # TINY's warmup, train.steps, the default min_lr_ratio
    # the lr logged after step k is set by step k's scheduler step, from the time spent by step k - 1
    for k in (2, 3, 4):
        assert math.isclose(lrs[k], 3e-3 * schedule(max(k, 25 * (k - 1))), rel_tol=1e-9)
    assert math.isclose(lrs[4], 3e-3 * schedule(75)) and lrs[4] < lrs[2] / 3
    state = json.loads((checkpoints(tmp_path)[-1] / STATE_FILE).read_text())
    assert state["step"] == 4 and state["seconds"] == 120.0
    # resumed with a larger budget, the 120 s trained so far count: 30 s more end a 2.5-minute budget
    ticks = iter(range(0, 10**6, 30))
    pretrain(tmp_path, "train.steps=100", "train.max_minutes=2.5", "--resume")
    assert max(losses(tmp_path)) == 5
    # resumed once more with the budget spent: no step, the final model written from the checkpoint
    (tmp_path / "final" / "model.safetensors").unlink()
    pretrain(tmp_path, "train.steps=100", "train.max_minutes=2.5", "--resume")
    assert max(losses(tmp_path)) == 5 and (tmp_path / "final" / "model.safetensors").exists()
    with pytest.raises(RunConfigError, match="train.max_minutes must be positive"):
        pretrain(tmp_path / "bad", "train.max_minutes=0")
