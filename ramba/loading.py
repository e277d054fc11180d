"""load_model: a checkpoint spec (a save_pretrained directory or a built-in model) -> a model on a device."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import HSAHybridConfig
from .model import HSAHybrid

BUILTIN = {"builtin:tiny-random": "tiny"}  # name -> preset, randomly initialised with seed 0


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; 'float32', 'bfloat16', ... -> that torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}: give auto, float32, bfloat16 or float16")
    return dtype


def load_model(spec: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "auto") -> HSAHybrid:
    """A model in eval mode on `device` in `dtype` (see resolve_dtype) from `spec`: a directory written by
    HSAHybrid.save_pretrained, or builtin:tiny-random (the tiny preset, randomly initialised, seed 0).
    Raises ValueError, saying what was wrong, for an unknown built-in name, a directory that does not hold a
    loadable model, or a CUDA device where there is none."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here (use cpu)")
    dtype = resolve_dtype(dtype, dev)
    spec = str(spec)
    if spec.startswith("builtin:"):
        if spec not in BUILTIN:
            raise ValueError(f"unknown built-in model {spec!r}; known: {', '.join(BUILTIN)}")
        with torch.random.fork_rng(devices=[]):  # seed 0 without touching the caller's random state
            torch.manual_seed(0)
            model = HSAHybrid(HSAHybridConfig.preset(BUILTIN[spec]))
    else:
        try:
            model = HSAHybrid.from_pretrained(spec)
        except Exception as err:  # missing files, bad JSON, a bad config, weights that do not match...
            raise ValueError(f"could not load a model from {spec!r}: {err}\nexpected a directory written by "
                             "HSAHybrid.save_pretrained (config.json and model.safetensors) or one of "
                             f"{', '.join(BUILTIN)}") from err
    return model.to(dev, dtype).eval()
