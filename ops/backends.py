"""Pick a backend for each op from the device and the packages that really work here; log each choice once.

Op kinds and their backends ("auto" and "torch", the PyTorch reference, are always there):

| kind | fast backends ("auto" tries them in this order on CUDA) | what each calls |
| --- | --- | --- |
| swa | flash, flex, fla | flash-attn 4 (`flash_attn.cute`), 3 (`flash_attn_interface`) or 2 (`flash_attn`); flex attention; fla-core |
| ssd | cuda, compile | mamba_ssm's Triton SSD; the reference through `torch.compile` |
| conv | cuda, compile | the causal-conv1d CUDA kernels, else fla-core's Triton conv; the compiled reference |
| norm | cuda, compile | mamba_ssm's Triton gated RMSNorm; the compiled reference |
| ops | triton | ramba's own Triton kernels (retrieval and aggregation) |

A backend counts only when the module it calls imports and has the function ramba calls: flash-attn 4 without
`flash_attn.cute`, or mamba-ssm whose `__init__` needs a missing compiled extension, are handled (mamba_ssm's
Triton modules are then loaded without running its `__init__`). Answers are cached; `report()` says for every
kind what "auto" takes and why each other backend was skipped.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import warnings
from types import ModuleType

import torch

logger = logging.getLogger("ramba")
_logged: set[tuple[str, str]] = set()

# kind -> its fast backends, in the order "auto" tries them on CUDA
FAST: dict[str, list[str]] = {
    "swa": ["flash", "flex", "fla"],
    "ssd": ["cuda", "compile"],
    "conv": ["cuda", "compile"],
    "norm": ["cuda", "compile"],
    "ops": ["triton"],
}
# (kind, backend) -> the modules it can call, in order of preference, each with the names ramba calls in it
FLASH = "flash_attn_func,flash_attn_varlen_func"
CALLS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("swa", "flash"): [("flash_attn.cute", FLASH), ("flash_attn_interface", FLASH), ("flash_attn", FLASH)],
    ("swa", "flex"): [("torch.nn.attention.flex_attention", "flex_attention")],
    ("swa", "fla"): [("fla.ops.attn", "parallel_attn")],
    ("ssd", "cuda"): [("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")],
    ("conv", "cuda"): [("causal_conv1d", "causal_conv1d_fn"), ("fla.modules.causal_conv1d", "causal_conv1d")],
    ("norm", "cuda"): [("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn")],
    ("ops", "triton"): [("triton", "jit")],
    **{(kind, "compile"): [("torch", "compile")] for kind in ("ssd", "conv", "norm")},
}
CUDA_ONLY = {"flash", "fla", "cuda"}  # backends whose kernels take CUDA tensors only
# what the config's one `mamba_backend` means for each of Mamba2's op kinds
MAMBA_KINDS = ("ssd", "conv", "norm")


def _import(module: str) -> ModuleType:
    """Import `module`; for mamba_ssm's submodules, without its package `__init__` when that cannot run."""
    if module.startswith("mamba_ssm.") and "mamba_ssm" not in sys.modules:
        try:
            importlib.import_module("mamba_ssm")
        except Exception:  # its __init__ imports the compiled selective-scan extension: use the Triton parts alone
            for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
                del sys.modules[name]
            spec = importlib.util.find_spec("mamba_ssm")
            package = ModuleType("mamba_ssm")
            package.__path__ = list(spec.submodule_search_locations or [])
            package.__spec__ = importlib.machinery.ModuleSpec("mamba_ssm", None, is_package=True)
            package.__spec__.submodule_search_locations = package.__path__
            sys.modules["mamba_ssm"] = package
    return importlib.import_module(module)


def module_unusable(module: str, names: str) -> str | None:
    """None when `module` imports and has each of the comma-separated `names`, else why not."""
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        return f"needs the package {package!r}, which is not installed"
    try:
        with warnings.catch_warnings():  # fla-core warns at import on machines without a GPU
            warnings.simplefilter("ignore")
            found = _import(module)
    except Exception as err:  # an extension built for another torch, a missing compiled part, ...
        return f"needs {module}, which is installed but does not import ({type(err).__name__}: {err})"
    missing = [name for name in names.split(",") if not hasattr(found, name)]
    if missing:
        return f"needs {module}.{missing[0]}, which this version of {package!r} does not have"
    return None


@functools.cache
def _resolve(kind: str, backend: str) -> tuple[ModuleType | None, str | None]:
    """(the first module of CALLS[kind, backend] that works, None) or (None, why none does)."""
    reasons = []
    for module, names in CALLS[kind, backend]:
        reason = module_unusable(module, names)
        if reason is None:
            return _import(module), None
        reasons.append(reason)
    return None, "; or ".join(dict.fromkeys(reasons))


def unusable(kind: str, backend: str) -> str | None:
    """None when `backend` of `kind` can be called here (the module it calls imports and has the function
    ramba calls); else why not."""
    return _resolve(kind, backend)[1]


def load(kind: str, backend: str) -> ModuleType:
    """The module that `backend` of `kind` calls (the first that works, see CALLS); ImportError if none does."""
    module, reason = _resolve(kind, backend)
    if module is None:
        raise ImportError(f"{kind} backend {backend!r} {reason}")
    return module


def clear_cache() -> None:
    """Forget what was found (after installing a package in a running process)."""
    _resolve.cache_clear()


def _known(kind: str) -> list[str]:
    if kind not in FAST:
        raise ValueError(f"unknown op kind {kind!r}: use one of {', '.join(map(repr, FAST))}")
    return ["auto", "torch", *FAST[kind]]


def pick(kind: str, requested: str, device: torch.device) -> str:
    """The backend to run `kind` (see FAST) with on tensors of `device`.

    "auto" gives the first fast backend that can run here (see `unusable`) when the device is CUDA, else
    "torch"; it logs its choice and the reasons it skipped the others, once. A forced backend that cannot run
    raises an error that says why.
    """
    known = _known(kind)
    if requested not in known:
        raise ValueError(f"unknown {kind} backend {requested!r}: use one of {', '.join(map(repr, known))}")
    if requested == "auto":
        choice = "torch"
        if device.type == "cuda":
            choice = next((name for name in FAST[kind] if unusable(kind, name) is None), "torch")
    else:
        choice = requested
        if choice != "torch":
            reason = unusable(kind, choice)
            if reason is not None:
                raise ImportError(f"{kind} backend {choice!r} {reason}: install a working package, or set the "
                                  "backend to 'auto'")
            if device.type != "cuda" and choice in CUDA_ONLY:
                raise RuntimeError(f"{kind} backend {choice!r} runs on CUDA tensors only, got {device.type}")
            if device.type != "cuda" and choice == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError(f"{kind} backend 'triton' runs on CUDA tensors only (or on CPU with "
                                   f"TRITON_INTERPRET=1 set before triton is imported), got {device.type}")
    if (kind, choice) not in _logged:
        _logged.add((kind, choice))
        skipped = [f"{name}: {unusable(kind, name)}" for name in FAST[kind][:FAST[kind].index(choice)]] \
            if requested == "auto" and choice in FAST[kind] else []
        logger.info("%s backend: %s%s", kind, choice, f" (skipped {'; '.join(skipped)})" if skipped else "")
    return choice


def report(device: torch.device | str | None = None) -> list[dict[str, str]]:
    """For each kind, what "auto" picks on `device` (default: CUDA when available, else CPU) and why each fast
    backend is or is not used: rows {"kind", "backend", "status"}, status "picked", "usable" or the reason."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for kind in FAST:
        chosen = pick(kind, "auto", device)
        rows.append({"kind": kind, "backend": "torch",
                     "status": "picked" if chosen == "torch" else "usable (the reference)"})
        for name in FAST[kind]:
            reason = unusable(kind, name)
            if name == chosen:
                status = f"picked ({load(kind, name).__name__})"
            elif reason is None:
                status = ("usable, not picked on CPU tensors" if device.type != "cuda"
                          else "usable, after the one picked")
            else:
                status = reason
            rows.append({"kind": kind, "backend": name, "status": status})
    return rows


def describe(device: torch.device | str | None = None) -> str:
    """`report()` as a table, one line per backend."""
    rows = report(device)
    width = max(len(r["kind"]) + len(r["backend"]) for r in rows) + 3
    return "\n".join(f"{r['kind']}: {r['backend']}".ljust(width) + r["status"] for r in rows)

