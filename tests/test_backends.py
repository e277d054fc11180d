"""Backend picking: a backend counts only when the module ramba calls imports and has the function ramba calls.

Fake packages on sys.path stand in for flash-attn 4 (`flash_attn.cute`), flash-attn 2, a mamba-ssm whose
`__init__` fails without its compiled extension, and causal-conv1d built for another torch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ramba
from ramba.ops import backends

FAKES = ("flash_attn", "flash_attn_interface", "mamba_ssm", "causal_conv1d")


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def forget_fakes() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in FAKES]:
        del sys.modules[name]
    backends.clear_cache()


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder first on sys.path, with the backend cache and any cached fake modules cleared around the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_fakes()
    yield tmp_path
    forget_fakes()


FLASH_ATTN_4 = {"flash_attn/__init__.py": "",
                "flash_attn/cute/__init__.py": "def flash_attn_func(*a, **k): pass\n"
                                               "def flash_attn_varlen_func(*a, **k): return 'fa4'\n"}
FLASH_ATTN_4_OLD = {"flash_attn/__init__.py": "", "flash_attn/cute/__init__.py": "def flash_attn_func(*a, **k): pass\n"}
FLASH_ATTN_2 = {"flash_attn/__init__.py": "def flash_attn_func(*a, **k): pass\n"
                                          "def flash_attn_varlen_func(*a, **k): return 'fa2'\n"}
FLASH_ATTN_VARLEN_ONLY = {"flash_attn/__init__.py": "def flash_attn_varlen_func(*a, **k): pass\n"}
TRITON_SSD = {"mamba_ssm/ops/__init__.py": "", "mamba_ssm/ops/triton/__init__.py": "",
              "mamba_ssm/ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(*a, **k): return 'ssd'\n"}
MAMBA_WITHOUT_EXTENSION = {"mamba_ssm/__init__.py": "import selective_scan_cuda\n", **TRITON_SSD}
MAMBA_BROKEN = {**MAMBA_WITHOUT_EXTENSION, "mamba_ssm/ops/triton/ssd_combined.py": "import selective_scan_cuda\n"}
CONV_WRONG_TORCH = {"causal_conv1d/__init__.py": "raise ImportError('undefined symbol: _ZN3c10')\n"}
CUDA = torch.device("cuda")  # picking only reads the device type: no GPU is needed


def test_flash_attn_4_is_the_flash_backend(fake_site):
    write(fake_site, FLASH_ATTN_4)
    assert backends.unusable("swa", "flash") is None
    module = backends.load("swa", "flash")
    assert module.__name__ == "flash_attn.cute" and module.flash_attn_varlen_func() == "fa4"
    assert backends.pick("swa", "auto", CUDA) == "flash"
    with pytest.raises(RuntimeError, match="CUDA tensors only"):  # usable, but not on CPU tensors
        backends.pick("swa", "flash", torch.device("cpu"))


def test_flash_attn_2_is_the_flash_backend_without_cute(fake_site):
    write(fake_site, FLASH_ATTN_2)
    assert backends.load("swa", "flash").flash_attn_varlen_func() == "fa2"


def test_a_flash_attn_without_the_varlen_function_is_not_the_flash_backend(fake_site):
    write(fake_site, FLASH_ATTN_4_OLD)
    reason = backends.unusable("swa", "flash")
    assert reason is not None and "flash_attn.cute.flash_attn_varlen_func" in reason
    with pytest.raises(ImportError, match="flash_attn_varlen_func"):
        backends.pick("swa", "flash", CUDA)
    assert backends.pick("swa", "auto", CUDA) == "flex"


def test_a_flash_attn_without_the_dense_function_is_not_the_flash_backend(fake_site):
    write(fake_site, FLASH_ATTN_VARLEN_ONLY)
    assert "flash_attn.flash_attn_func" in backends.unusable("swa", "flash")


def test_mamba_ssm_without_its_extension_still_gives_its_triton_ssd(fake_site):
    """mamba-ssm built with MAMBA_SKIP_CUDA_BUILD: its __init__ fails, its Triton modules load on their own."""
    write(fake_site, MAMBA_WITHOUT_EXTENSION)
    assert backends.unusable("ssd", "cuda") is None
    module = backends.load("ssd", "cuda")
    assert module.__name__ == "mamba_ssm.ops.triton.ssd_combined" and module.mamba_chunk_scan_combined() == "ssd"
    assert backends.pick("ssd", "auto", CUDA) == "cuda"
    reason = backends.unusable("norm", "cuda")  # this fake has no layernorm_gated module
    assert reason is not None and "mamba_ssm.ops.triton.layernorm_gated" in reason
    assert backends.pick("norm", "auto", CUDA) == "compile"


def test_a_triton_ssd_that_does_not_import_is_skipped_with_the_reason(fake_site):
    write(fake_site, MAMBA_BROKEN)
    reason = backends.unusable("ssd", "cuda")
    assert reason is not None and "does not import" in reason and "selective_scan_cuda" in reason
    assert backends.pick("ssd", "auto", CUDA) == "compile"
    with pytest.raises(ImportError, match="selective_scan_cuda"):
        backends.pick("ssd", "cuda", CUDA)


def test_causal_conv1d_that_does_not_import_falls_back_to_fla(fake_site):
    pytest.importorskip("fla.modules.causal_conv1d")  # fla-core is in the test extra
    write(fake_site, CONV_WRONG_TORCH)
    assert backends.load("conv", "cuda").__name__ == "fla.modules.causal_conv1d"
    assert backends.pick("conv", "auto", CUDA) == "cuda"


def test_missing_package_says_it_is_not_installed(fake_site, monkeypatch):
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert "'mamba_ssm', which is not installed" in backends.unusable("ssd", "cuda")
    with pytest.raises(ImportError, match="not installed"):
        backends.load("ssd", "cuda")


def test_answers_are_cached_until_cleared(fake_site):
    assert "not installed" in backends.unusable("swa", "flash")
    write(fake_site, FLASH_ATTN_2)
    assert "not installed" in backends.unusable("swa", "flash")  # cached: a package installed later is not seen
    backends.clear_cache()
    assert backends.unusable("swa", "flash") is None


def test_bad_names_are_errors(fake_site):
    with pytest.raises(ValueError, match="unknown op kind 'mamba'"):
        backends.pick("mamba", "auto", CUDA)
    with pytest.raises(ValueError, match="unknown ssd backend 'flash'"):
        backends.pick("ssd", "flash", CUDA)


def test_report_says_for_every_backend_what_is_used_and_why(fake_site, capsys):
    write(fake_site, {**FLASH_ATTN_4_OLD, **MAMBA_WITHOUT_EXTENSION})
    rows = {(r["kind"], r["backend"]): r["status"] for r in backends.report(CUDA)}
    assert set(rows) == {(kind, name) for kind in backends.FAST for name in ["torch", *backends.FAST[kind]]}
    assert rows["swa", "flex"] == "picked (torch.nn.attention.flex_attention)"
    assert "flash_attn_varlen_func" in rows["swa", "flash"]
    assert rows["ssd", "cuda"] == "picked (mamba_ssm.ops.triton.ssd_combined)"
    assert rows["ssd", "compile"] == "usable, after the one picked"
    cpu = {(r["kind"], r["backend"]): r["status"] for r in backends.report("cpu")}
    assert all(cpu[kind, "torch"] == "picked" for kind in backends.FAST)
    ramba.print_backends("cpu")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(rows) and printed[0].split() == ["swa:", "torch", "picked"]
