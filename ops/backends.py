"""Pick a backend for each kind of op from the device and the packages that work here; log each choice once."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger("ramba")
_logged: set[tuple[str, str]] = set()

# kind -> its fast backends, in order of preference
FAST: dict[str, list[str]] = {"swa": ["flash", "flex"], "mamba": ["cuda", "compile"], "ops": ["triton"]}
# backend -> the module it calls and a name that module must have
NEEDS: dict[str, tuple[str, str]] = {
    "flash": ("flash_attn", "flash_attn_varlen_func"),
    "flex": ("torch.nn.attention.flex_attention", "flex_attention"),
    "cuda": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "compile": ("torch", "compile"),
    "triton": ("triton", "jit"),
}


@functools.cache
def unusable(backend: str) -> str | None:
    """None when the module that `backend` calls imports and has what ramba calls in it; else why not.

    A package that is installed but cannot run here counts as missing: flash-attn 4 alone (`flash_attn.cute`,
    without `flash_attn_varlen_func`), or mamba-ssm without its compiled extension (its `__init__` fails)."""
    module, name = NEEDS[backend]
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        return f"needs the package {package!r}, which is not installed"
    try:
        found = importlib.import_module(module)
    except Exception as err:  # an extension built for another torch, a missing compiled part, ...
        return f"needs {module}, which is installed but does not import ({type(err).__name__}: {err})"
    if not hasattr(found, name):
        return f"needs {module}.{name}, which this version of {package!r} does not have"
    return None


def pick(kind: str, requested: str, device: torch.device) -> str:
    """The backend to run `kind` ("swa" | "mamba" | "ops") with on tensors of `device`.

    "auto" gives the first fast backend that can run (see `unusable`) when the device is CUDA, else "torch".
    A forced backend that cannot run raises an error that says why.
    """
    known = ["auto", "torch", *FAST[kind]]
    if requested not in known:
        raise ValueError(f"unknown {kind} backend {requested!r}: use one of {', '.join(map(repr, known))}")
    if requested == "auto":
        choice = "torch"
        if device.type == "cuda":
            choice = next((name for name in FAST[kind] if unusable(name) is None), "torch")
    else:
        choice = requested
        if choice != "torch":
            reason = unusable(choice)
            if reason is not None:
                raise ImportError(f"{kind} backend {choice!r} {reason}: install a working package, or set the "
                                  "backend to 'auto'")
            if device.type != "cuda" and choice in ("flash", "cuda"):
                raise RuntimeError(f"{kind} backend {choice!r} runs on CUDA tensors only, got {device.type}")
            if device.type != "cuda" and choice == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError(f"{kind} backend 'triton' runs on CUDA tensors only (or on CPU with "
                                   f"TRITON_INTERPRET=1 set before triton is imported), got {device.type}")
    if (kind, choice) not in _logged:
        _logged.add((kind, choice))
        logger.info("%s backend: %s", kind, choice)
    return choice
