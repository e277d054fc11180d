"""Training checkpoints: written atomically, found, validated and pruned.

A checkpoint is a folder `checkpoints/step_00000100` holding accelerate's state (model, optimizer,
scheduler, RNG states) and `trainer_state.json` (step, data position). It is written under a `.tmp` name
and renamed when complete, so a crash never leaves a half-written checkpoint that looks like a good one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be loaded."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp"
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` checkpoints."""
    final = Path(output_dir) / "checkpoints" / f"{PREFIX}{step:08d}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its part before the folder is renamed
    if accelerator.is_main_process:
        with open(partial / STATE_FILE, "w") as f:
            json.dump({**state, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, output_dir: str | Path, path: str | Path | None = None) -> dict[str, Any]:
    """Restore the newest checkpoint of output_dir (or `path`) into the prepared objects; returns its
    trainer state. Raises CheckpointError, saying what is wrong, when there is none or it does not load."""
    if path is None:
        found = checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"nothing to resume: no complete checkpoint in {Path(output_dir) / 'checkpoints'}")
        path = found[-1]
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                              "resume from another one or start a new run")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        accelerator.load_state(str(path))
    except Exception as err:  # a truncated or foreign file shows up as any of many errors
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); it may be "
                              "corrupt: delete it to resume from the one before") from err
    return state
