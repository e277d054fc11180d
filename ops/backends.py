"""Pick a backend for each kind of op from the device and the installed packages; log each choice once."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger("ramba")
_logged: set[tuple[str, str]] = set()

# kind -> the fast backends in order of preference, each with the package it needs
FAST: dict[str, list[tuple[str, str]]] = {
    "swa": [("flash", "flash_attn"), ("flex", "torch")],
    "mamba": [("cuda", "mamba_ssm"), ("compile", "torch")],
    "ops": [("triton", "triton")],
}
# fast backends that exist in this version of the library
AVAILABLE: dict[str, set[str]] = {"swa": {"flash", "flex"}, "mamba": {"cuda", "compile"}, "ops": {"triton"}}


@functools.cache
def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def pick(kind: str, requested: str, device: torch.device) -> str:
    """The backend to run `kind` ("swa" | "mamba" | "ops") with on tensors of `device`.

    "auto" gives the first fast backend whose package is installed when the device is CUDA, else "torch".
    A forced backend that cannot run raises an error that says why.
    """
    known = ["auto", "torch", *(name for name, _ in FAST[kind])]
    if requested not in known:
        raise ValueError(f"unknown {kind} backend {requested!r}: use one of {', '.join(map(repr, known))}")
    if requested == "auto":
        choice = "torch"
        if device.type == "cuda":
            for name, package in FAST[kind]:
                if name in AVAILABLE[kind] and installed(package):
                    choice = name
                    break
    else:
        choice = requested
        if choice != "torch":
            package = dict(FAST[kind])[choice]
            if choice not in AVAILABLE[kind]:
                raise NotImplementedError(f"the {choice!r} backend for {kind} is not built yet; use 'torch' or 'auto'")
            if not installed(package):
                raise ImportError(f"{kind} backend {choice!r} needs the package {package!r}: "
                                  f"pip install 'ramba[cuda]', or set the backend to 'auto'")
            if device.type != "cuda" and choice in ("flash", "cuda"):
                raise RuntimeError(f"{kind} backend {choice!r} runs on CUDA tensors only, got {device.type}")
            if device.type != "cuda" and choice == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError(f"{kind} backend 'triton' runs on CUDA tensors only (or on CPU with "
                                   f"TRITON_INTERPRET=1 set before triton is imported), got {device.type}")
    if (kind, choice) not in _logged:
        _logged.add((kind, choice))
        logger.info("%s backend: %s", kind, choice)
    return choice
