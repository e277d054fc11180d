"""Run configuration of the recipes: YAML files with `section.key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ramba.data.tasks import HAYSTACKS, TaskError, check_haystack
from ramba.data.tasks.prompt import TEXT_PREFIX


COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")
TRAINABLE = ("all", "selection")


class RunConfigError(ValueError):
    """A run configuration key is unknown or has a value of the wrong type."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # HSAHybridConfig fields (of the checkpoint's, too)
    checkpoint: str | None = None  # start from these weights (a save_pretrained directory) instead


@dataclass
class DataSection:
    # "builtin" (synthetic pre-training mixture), "tasks" (long-context tasks for fine-tuning, see `tasks`),
    # a datasets hub name, or local .txt/.jsonl/.json/.parquet files or a folder of them
    source: str = "builtin"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "niah_single_1", "niah_multikey_1", "vt", "cwe",
                                                      "qa1", "qa2"])
    min_len: int = 256  # "tasks": prompt lengths are drawn between min_len and seq_len
    loss: str = "answer"  # "tasks": the loss on the answer only, or on "all" tokens (prompt and answer)
    # "tasks": the haystack of passkey and the niah tasks (ramba.data.tasks.HAYSTACK_TASKS): noise, essay or
    # text:PATH (sentences of a corpus .jsonl or .txt, such as data/debian-corpus/train.jsonl); None: each task's own
    haystack: str | None = None
    tokenizer: str = "byte"  # "byte" or a Hugging Face tokenizer name or local path
    seq_len: int = 1024
    text_field: str = "text"
    hub_config: str | None = None
    split: str = "train"
    streaming: bool = True
    eval_sequences: int = 16  # held-out sequences (builtin: a separate seed; else the first ones of the stream)


@dataclass
class TrainSection:
    steps: int = 200
    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip: float = 1.0
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, none on CPU), "bf16", "fp16", "no"
    gradient_checkpointing: bool = False
    # torch.compile each block (HSAHybrid.compile_blocks): "no", "default", "reduce-overhead" (CUDA graphs) or
    # "max-autotune"; fewer kernel launches where the host bounds the step (small batches, the Mamba2 mixer)
    compile: str = "no"
    # processes that share each sequence (context parallelism: rank r of a group trains on slice r of every
    # row); the number of processes must be a multiple of it; data parallelism spans the groups
    context_parallel: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep: int = 3
    # which weights train: "all", or "selection" (HSAHybrid.selection_parameters: the CLS vector, landmark and
    # retrieval-query projections; everything that reads the chunks stays frozen)
    trainable: str = "all"
    # wall-clock budget of the training loop: the run ends (its final model saved) at train.steps or after this
    # many minutes, whichever comes first, and the learning-rate schedule follows whichever is further along
    max_minutes: float | None = None
    stop_after: int | None = None  # end this process after that step (e.g. a time-limited job); resume later,
    # or write the checkpoint as a model with recipes/export.py
    output_dir: str = "runs/pretrain"
    tensorboard: bool = False  # also log to TensorBoard (metrics.jsonl is always written)
    # weight of the auxiliary retrieval loss (data.source tasks): minus the log of the retrieval weight on the
    # chunks that hold the asked fact, at the positions that predict the answer (ramba.training.retrieval)
    retrieval_loss: float = 0.0
    # that loss over the "selected" chunks (no gradient where the fact's chunk is not in the top-k) or over "all"
    # visible chunks (a softmax of every chunk's score: pulls up a fact's chunk that was not selected)
    retrieval_loss_over: str = "selected"
    # weight of the mean cross entropy on the answer tokens alone (data.source tasks), added to the loss: with
    # data.loss=all the model keeps learning the prompt's text while the few answer tokens keep their own scale
    answer_loss: float = 0.0


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> None:
        """Check every field's type and range, naming the field; values of a type that converts losslessly
        (an int where a float belongs, YAML's string "1e-3") are converted."""
        for section in (self.model, self.data, self.train):
            prefix = f"{type(section).__name__.removesuffix('Section').lower()}."
            hints = typing.get_type_hints(type(section))
            for f in dataclasses.fields(section):
                setattr(section, f.name, _check_type(prefix + f.name, getattr(section, f.name), hints[f.name]))
        t, d = self.train, self.data
        ranges = {"train.steps": (t.steps, 1), "train.batch_size": (t.batch_size, 1),
                  "train.grad_accum": (t.grad_accum, 1), "train.log_every": (t.log_every, 1),
                  "train.eval_every": (t.eval_every, 1), "train.save_every": (t.save_every, 1),
                  "train.keep": (t.keep, 1), "train.warmup": (t.warmup, 0), "train.seed": (t.seed, 0),
                  "train.weight_decay": (t.weight_decay, 0), "data.seq_len": (d.seq_len, 1),
                  "data.min_len": (d.min_len, 1), "data.eval_sequences": (d.eval_sequences, 1),
                  "train.context_parallel": (t.context_parallel, 1)}
        if t.stop_after is not None:
            ranges["train.stop_after"] = (t.stop_after, 1)
        if t.trainable not in TRAINABLE:
            raise RunConfigError(f"train.trainable must be {' or '.join(TRAINABLE)}, got {t.trainable!r}")
        if t.max_minutes is not None and not t.max_minutes > 0:
            raise RunConfigError(f"train.max_minutes must be positive (or null for no time limit), got {t.max_minutes}")
        for key, (value, least) in ranges.items():
            if value < least:
                raise RunConfigError(f"{key} must be at least {least}, got {value}")
        if not t.lr > 0 or not t.clip > 0:
            raise RunConfigError(f"train.lr and train.clip must be positive, got lr={t.lr}, clip={t.clip}")
        if not 0 <= t.min_lr_ratio <= 1:
            raise RunConfigError(f"train.min_lr_ratio must lie in [0, 1], got {t.min_lr_ratio}")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise RunConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
        if t.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise RunConfigError(f"train.mixed_precision must be auto, bf16, fp16 or no, got {t.mixed_precision!r}")
        if t.compile not in COMPILE_MODES:
            raise RunConfigError(f"train.compile must be {', '.join(COMPILE_MODES[:-1])} or {COMPILE_MODES[-1]}, "
                                 f"got {t.compile!r}")
        if t.context_parallel > 1 and t.gradient_checkpointing:
            raise RunConfigError("train.gradient_checkpointing is not supported with train.context_parallel > 1 "
                                 "(the slices already cut activation memory): turn one of them off")
        for name, needs in (("retrieval_loss", "examples whose answer-holding facts are known"),
                            ("answer_loss", "examples whose answer is marked")):
            weight = getattr(t, name)
            if weight < 0:
                raise RunConfigError(f"train.{name} must be >= 0, got {weight}")
            if weight and d.source != "tasks":
                raise RunConfigError(f"train.{name} needs {needs}: set data.source=tasks (got {d.source!r}) or "
                                     f"train.{name}=0")
            if weight and t.context_parallel > 1:
                raise RunConfigError(f"train.{name} is not supported with train.context_parallel > 1: turn one of "
                                     "them off")
        if t.retrieval_loss_over not in ("selected", "all"):
            raise RunConfigError(f"train.retrieval_loss_over must be selected or all, got {t.retrieval_loss_over!r}")
        if t.retrieval_loss_over == "all" and not t.retrieval_loss:
            raise RunConfigError("train.retrieval_loss_over=all applies to the retrieval loss: set "
                                 "train.retrieval_loss > 0 or leave train.retrieval_loss_over at selected")
        if t.retrieval_loss_over == "all" and t.gradient_checkpointing:
            raise RunConfigError("train.retrieval_loss_over=all is not supported with train.gradient_checkpointing "
                                 "(the recomputed forward would not hand out the scores again): turn one of them off")
        if d.haystack is not None:
            if d.source != "tasks":
                raise RunConfigError(f"data.haystack applies to data.source=tasks (got {d.source!r}): remove it")
            try:  # the file itself is looked for when the data stream starts
                check_haystack(d.haystack, need_file=False)
            except TaskError:
                raise RunConfigError(f"data.haystack must be {', '.join(HAYSTACKS)} or {TEXT_PREFIX}PATH, got "
                                     f"{d.haystack!r}") from None
        if d.loss not in ("answer", "all"):
            raise RunConfigError(f"data.loss must be answer or all, got {d.loss!r}")
        empty = [k for k, v in {"model.preset": self.model.preset, "data.source": d.source, "data.tasks": d.tasks,
                                "data.tokenizer": d.tokenizer, "data.text_field": d.text_field, "data.split": d.split,
                                "train.output_dir": t.output_dir}.items() if not v]
        if empty:
            raise RunConfigError(f"{', '.join(empty)} must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, all at once (written beside `path`, fsynced, renamed over it)."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "w") as f:
            f.write(yaml.safe_dump(self.to_dict(), sort_keys=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """value if it fits the field's annotation (ints accepted for floats, floats must be finite, list items
    and dict keys checked too), else a RunConfigError naming the field."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    expected = origin or hint
    if key in ("train.mixed_precision", "train.compile") and value is False:  # YAML 1.1 reads unquoted `no` as false
        return "no"
    if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-3 as a string
            value = float(value)
        except ValueError:
            pass
    if expected is Any:
        return value
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise RunConfigError(f"{key} must be of type {getattr(expected, '__name__', expected)}, got "
                             f"{type(value).__name__} {value!r}")
    if expected is float and not math.isfinite(value):
        raise RunConfigError(f"{key} must be a finite number, got {value!r}")
    if expected is list:
        (item,) = typing.get_args(hint)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if expected is dict:
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise RunConfigError(f"{key} must map names (strings) to values, got the key {bad[0]!r}")
    return value


def _merge(section: Any, values: dict[str, Any], prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise RunConfigError(f"unknown config key {name!r} (known in this section: {', '.join(fields)})")
        if dataclasses.is_dataclass(fields[key].type) or dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise RunConfigError(f"{name} must be a mapping, got {value!r}")
            _merge(getattr(section, key), value, f"{name}.")
        elif key == "overrides" and isinstance(value, dict):
            getattr(section, key).update(value)
        else:
            setattr(section, key, _check_type(name, value, hints[key]))


def parse_override(text: str) -> dict[str, Any]:
    """'train.lr=1e-3' -> {'train': {'lr': 0.001}}; the value is read as YAML."""
    if "=" not in text:
        raise RunConfigError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The defaults, updated by a YAML file, then by `section.key=value` overrides."""
    config = RunConfig()
    if path is not None:
        if not Path(path).is_file():
            raise RunConfigError(f"config file {path} not found")
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise RunConfigError(f"{path} must hold a mapping of sections (model, data, train)")
        _merge(config, data, "")
    for text in overrides:
        _merge(config, parse_override(text), "")
    config.validate()
    return config
