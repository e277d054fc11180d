"""One run per folder, and what `--resume` checks before it continues a run.

A run folder (train.output_dir) holds one run: a new run refuses a folder that holds another one unless
asked to start over (`overwrite`). Resuming checks the checkpoint against the run asked for: every setting
that shapes the training must be the same (else CheckpointError naming the fields), the weights must fit
the model (else CheckpointError naming the tensors); a changed batch layout, number of steps or a missing
RNG state is allowed with a warning that says what it changes.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, checkpoints
from .config import RunConfig

logger = logging.getLogger("ramba.train")
RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "config.yaml")  # what a run writes in its folder
# settings that a resumed run may change freely: they decide what is logged and kept, not what is trained
FREE = {"train.stop_after", "train.log_every", "train.eval_every", "train.save_every", "train.keep",
        "train.output_dir", "train.tensorboard", "train.gradient_checkpointing", "train.context_parallel",
        "data.eval_sequences"}
# allowed, with a word on what they change
WARNED = {"train.batch_size", "train.grad_accum", "train.steps", "train.max_minutes"}


def claim_run_dir(output_dir: Path, overwrite: bool, is_main: bool) -> None:
    """Make sure a new run may use output_dir: refuse one that holds another run's files, or delete them
    (on the main process) when `overwrite`."""
    present = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not present:
        return
    if not overwrite:
        found = checkpoints(output_dir)
        what = f"checkpoints up to {found[-1].name}" if found else ", ".join(present)
        raise CheckpointError(f"{output_dir} holds another run ({what}): continue it with --resume, start it "
                              f"over with --overwrite (deletes its {', '.join(present)}), or set "
                              "train.output_dir to a new folder")
    if is_main:
        logger.warning("--overwrite: deleting %s in %s", ", ".join(present), output_dir)
        for name in present:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], run: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (the checkpoint's value, the requested value)} for every field that differs. A section field
    that the checkpoint's config lacks (written by an older version) is not compared; a model override that
    one of them lacks is."""
    old, new = _flat(saved), _flat(run.to_dict())
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        if key not in old and key.count(".") == 1:
            continue
        if old.get(key, "(not set)") != new.get(key, "(not set)"):
            changes[key] = (old.get(key, "(not set)"), new.get(key, "(not set)"))
    return changes


def check_resume(state: dict[str, Any], run: RunConfig, path: Path, processes: int) -> None:
    """Refuse a checkpoint written under other training settings; warn about allowed changes."""
    if "config" not in state:
        logger.warning("%s holds no run config (written by an older version): the settings cannot be checked; "
                       "make sure they are the ones the run started with", path)
        return
    changes = config_changes(state["config"], run)
    refused = {k: v for k, v in changes.items() if k not in FREE | WARNED}
    if refused:
        raise CheckpointError(
            f"checkpoint {path} belongs to a run with other settings: "
            + "; ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in refused.items())
            + ". Resume with the run's own settings (--config its config.yaml) or start a new run in another "
            "train.output_dir")
    if "train.steps" in changes:
        before, now = changes["train.steps"]
        logger.warning("train.steps changed from %s to %s: the learning-rate schedule now ends at step %s, so "
                       "from here the run differs from one that ran either length from the start", before, now, now)
    if "train.max_minutes" in changes:
        before, now = changes["train.max_minutes"]
        logger.warning("train.max_minutes changed from %s to %s: the run now ends, and its learning-rate schedule "
                       "decays, by the new time budget (%.1f minutes trained so far count towards it)", before, now,
                       state.get("seconds", 0.0) / 60)
    t = state["config"].get("train", {})
    old = (t.get("batch_size", run.train.batch_size), t.get("grad_accum", run.train.grad_accum),
           state.get("processes", processes))
    new = (run.train.batch_size, run.train.grad_accum, processes)
    if old != new:
        names = ("train.batch_size", "train.grad_accum", "processes")
        what = ", ".join(f"{n} {a} -> {b}" for n, a, b in zip(names, old, new) if a != b)
        rows_before, rows_now = old[0] * old[1] * old[2], new[0] * new[1] * new[2]
        if rows_before == rows_now:
            logger.warning("%s: each step still takes %d sequences, so the run continues as it would have "
                           "(up to floating-point rounding)", what, rows_now)
        else:
            logger.warning("%s: each step now takes %d sequences instead of %d; the data continues where it "
                           "stopped, but the updates differ from those of the uninterrupted run", what, rows_now,
                           rows_before)


def check_shapes(path: Path, model: torch.nn.Module) -> None:
    """Refuse a checkpoint whose model weights do not fit `model` (names and shapes), naming what differs.
    Checks the single-file model weights (one process, DDP); FSDP shards are left to accelerate."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as err:  # a damaged file: named as such by the load that follows
        logger.debug("could not read the shapes of %s: %s", weights, err)
        return
    tensors = model.state_dict()
    wanted = {name: list(p.shape) for name, p in tensors.items()}
    stored = {tensors[n].data_ptr() for n in saved if n in tensors}  # tied weights are saved once
    problems = [f"{n} is {saved[n]} there, {wanted[n]} here" for n in wanted if n in saved and saved[n] != wanted[n]]
    problems += [f"{n} is missing there" for n in wanted if n not in saved and tensors[n].data_ptr() not in stored]
    problems += [f"{n} is not in this model" for n in saved if n not in wanted]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"checkpoint {path} does not fit the model asked for: {'; '.join(problems[:5])}{more}. "
                              "The checkpoint is intact but belongs to a model of other settings: resume with the "
                              "run's own model settings (--config its config.yaml)")


def check_rng(path: Path, process_index: int) -> None:
    """Warn when this process's RNG state is missing or damaged (accelerate then goes on without it)."""
    file = path / f"random_states_{process_index}.pkl"
    problem = None if file.is_file() else "is missing"
    if problem is None:
        try:
            with zipfile.ZipFile(file) as archive:  # torch.save's format; truncation breaks the archive
                problem = None if archive.testzip() is None else "is damaged"
        except (zipfile.BadZipFile, OSError):
            problem = "is damaged (truncated?)"
    if problem:
        logger.warning("%s %s: resuming without it, so the random draws from here on (e.g. Gumbel noise in "
                       "retrieval) differ from those of the uninterrupted run; the data order is not affected",
                       file, problem)
