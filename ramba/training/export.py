"""A training checkpoint -> a model folder (HSAHybrid.save_pretrained), for runs cut before their last step."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from ..config import HSAHybridConfig
from ..model import CONFIG_FILE, HSAHybrid
from .checkpoint import CheckpointError, checkpoints
from .config import RunConfig, load_run_config
from .resume import check_shapes

MODEL_FILE = "model.safetensors"  # accelerate's name for the first prepared model's weights


def model_config(run: RunConfig) -> HSAHybridConfig:
    """The config of the model that `run` trains: its preset, or its starting checkpoint's config, with
    model.overrides applied."""
    if run.model.checkpoint is None:
        return HSAHybridConfig.preset(run.model.preset, **run.model.overrides)
    path = Path(run.model.checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the run started from model.checkpoint={run.model.checkpoint}, "
                                "whose config the exported model needs; restore that folder")
    return HSAHybridConfig.from_dict({**HSAHybridConfig.from_json(path).to_dict(), **run.model.overrides})


def export_checkpoint(run_dir: str | Path, destination: str | Path, checkpoint: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the weights of a run's checkpoint (default: its newest) as a model folder at `destination`,
    cast to `dtype` if given. Raises CheckpointError, naming the file, when there is no checkpoint, or its
    model file is missing, damaged or of another model."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir / 'config.yaml'} not found: {run_dir} is not a training run's output_dir")
    if checkpoint is None:
        found = checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"nothing to export: no complete checkpoint in {run_dir / 'checkpoints'}")
        checkpoint = found[-1]
    weights = Path(checkpoint) / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found: export reads the model file of a single-process or DDP "
                              "checkpoint (FSDP shards are not supported)")
    model = HSAHybrid(model_config(load_run_config(run_dir / "config.yaml")))
    check_shapes(Path(checkpoint), model)
    try:
        safetensors.torch.load_model(model, str(weights))
    except Exception as err:  # a truncated or foreign file shows up as any of many errors
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{weights} cannot be loaded ({type(err).__name__}: {reason}); it may be corrupt: "
                              "export another checkpoint (--checkpoint)") from err
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(destination)
    return Path(destination)
