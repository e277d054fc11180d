"""Training checkpoints: written atomically, found, validated and pruned.

A checkpoint is a folder `checkpoints/step_00000100` holding accelerate's state (model, optimizer,
scheduler, RNG states) and `trainer_state.json` (step, sequences of data consumed, batch layout, the run's
config). It is
written under a `.tmp` name, fsynced and renamed when complete; a checkpoint being replaced or pruned is
renamed away before it is deleted. So a crash at any moment leaves every complete checkpoint whole, and
never a half-written or half-deleted one that looks like a good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
PREFIX = "step_"
NAME = re.compile(r"step_(\d+)")
# trainer_state.json: step, and sequences (of the data stream, all processes) or, before, position (batches per process)
REQUIRED = {"step": int, "sequences": int}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, cannot be loaded, or does not belong to the run that asks for it."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folder itself, to disk."""
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, renamed first: one atomic step takes it out of `checkpoints`."""
    doomed = folder.with_name(folder.name + ".old")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def step_of(checkpoint: Path) -> int:
    return int(NAME.fullmatch(checkpoint.name)[1])


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` checkpoints."""
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"{PREFIX}{step:08d}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        for leftover in folder.glob(f"{PREFIX}*.*"):  # what a crash left: unfinished or half-deleted folders
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its part before the folder is renamed
    if accelerator.is_main_process:
        with open(partial / STATE_FILE, "w") as f:
            json.dump({**state, "step": step}, f)
        _fsync_tree(partial)
        if final.exists():
            _remove(final)
        os.replace(partial, final)
        _fsync(folder)  # the rename itself
        for old in checkpoints(output_dir)[:-keep]:
            if old != final:
                _remove(old)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """The newest complete checkpoint of output_dir, or `path` if given (checked to be complete)."""
    if path is None:
        found = checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"nothing to resume: no complete checkpoint in {Path(output_dir) / 'checkpoints'}; "
                                  "start the run without --resume (with --overwrite if the folder holds files "
                                  "of an earlier attempt)")
        return found[-1]
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                              "resume from another one or start a new run")
    own = checkpoints(output_dir)
    if path.resolve().parent == (Path(output_dir) / "checkpoints").resolve():
        own = [c for c in own if step_of(c) > step_of(path)]
    if own:
        raise CheckpointError(f"{Path(output_dir) / 'checkpoints'} holds checkpoints that do not lead to {path} "
                              f"({', '.join(c.name for c in own)}): resuming from it there would mix two histories; "
                              "move those elsewhere or resume into another train.output_dir")
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of the checkpoint folder `path`, its required fields checked."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}); the checkpoint may be corrupt: resume from the "
                              "one before (--resume CHECKPOINT) or delete it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(state).__name__}")
    missing = [k for k in REQUIRED if k not in state and (k != "sequences" or "position" not in state)]
    wrong = [f"{k}={state[k]!r}" for k, kind in REQUIRED.items() if k in state and
             (not isinstance(state[k], kind) or isinstance(state[k], bool) or state[k] < 0)]
    if missing or wrong:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has {', '.join(wrong)} (non-negative integers expected)"] if wrong else [])
        raise CheckpointError(f"{file} {' and '.join(problems)}: it was not written by this trainer or is "
                              "damaged; resume from another checkpoint (--resume CHECKPOINT)")
    return state


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """Restore the checkpoint folder `path` into the prepared objects."""
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # a truncated or foreign file shows up as any of many errors
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); it may be "
                              "corrupt: delete it to resume from the one before") from err
