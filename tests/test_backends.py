"""Backend picking: a package counts only when the module ramba calls imports and has what ramba uses.

Fake packages on sys.path stand in for flash-attn 4 (only `flash_attn.cute`), a mamba-ssm whose `__init__` fails
without its compiled extension, and working versions of both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ramba.ops import backends


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder first on sys.path, with the backend cache and any cached fake modules cleared around the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    backends.unusable.cache_clear()
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("flash_attn", "mamba_ssm")]:
        del sys.modules[name]
    backends.unusable.cache_clear()


FLASH_ATTN_4 = {"flash_attn/__init__.py": "", "flash_attn/cute/__init__.py": "def flash_attn_func(*a, **k): pass\n"}
FLASH_ATTN_2 = {"flash_attn/__init__.py": "def flash_attn_func(*a, **k): pass\ndef flash_attn_varlen_func(*a, **k): pass\n"}
MAMBA_WITHOUT_EXTENSION = {
    "mamba_ssm/__init__.py": "import selective_scan_cuda\n",
    "mamba_ssm/ops/__init__.py": "", "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(*a, **k): pass\n",
}
MAMBA_WORKING = {**MAMBA_WITHOUT_EXTENSION, "mamba_ssm/__init__.py": ""}


def test_flash_attn_4_alone_is_not_the_flash_backend(fake_site):
    write(fake_site, FLASH_ATTN_4)
    reason = backends.unusable("flash")
    assert reason is not None and "flash_attn_varlen_func" in reason
    with pytest.raises(ImportError, match="flash_attn_varlen_func"):
        backends.pick("swa", "flash", torch.device("cpu"))


def test_mamba_ssm_without_its_extension_is_not_the_cuda_backend(fake_site):
    write(fake_site, MAMBA_WITHOUT_EXTENSION)
    reason = backends.unusable("cuda")
    assert reason is not None and "selective_scan_cuda" in reason and "does not import" in reason


def test_working_packages_are_usable(fake_site):
    write(fake_site, {**FLASH_ATTN_2, **MAMBA_WORKING})
    assert backends.unusable("flash") is None
    assert backends.unusable("cuda") is None
    with pytest.raises(RuntimeError, match="CUDA tensors only"):  # usable, but not on CPU tensors
        backends.pick("swa", "flash", torch.device("cpu"))


def test_auto_skips_what_cannot_run(fake_site):
    """On a CUDA device "auto" takes the first fast backend that can run, never one that only looks installed."""
    write(fake_site, {**FLASH_ATTN_4, **MAMBA_WITHOUT_EXTENSION})
    cuda = torch.device("cuda")  # picking only reads the device type: no GPU is needed
    assert backends.pick("swa", "auto", cuda) == "flex"
    assert backends.pick("mamba", "auto", cuda) == "compile"
    assert backends.pick("swa", "auto", torch.device("cpu")) == "torch"


def test_missing_package_says_it_is_not_installed(fake_site, monkeypatch):
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in backends.unusable("cuda")
