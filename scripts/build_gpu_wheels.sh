#!/usr/bin/env bash
# Build the CUDA kernel wheels that ramba's "cuda" backends use, for the GPU machine:
#   - causal-conv1d 1.7.0, compiled from its sdist for one GPU arch only (default sm_90, H200);
#   - mamba-ssm 2.3.2.post1 from its sdist without its CUDA extension (MAMBA_SKIP_CUDA_BUILD): a pure
#     Python wheel whose Triton SSD kernels (mamba_chunk_scan_combined, selective_state_update) need no
#     compiled code. Its package __init__ eagerly imports the selective_scan_cuda extension, which this
#     build lacks, so those imports are patched to be optional (`import mamba_ssm.ops.triton...` works);
#   - fla-core (flash-linear-attention's kernels, pure Python/Triton), downloaded as a wheel.
# Target: CPython 3.12, x86-64 Linux, torch 2.11.0 built for CUDA 13.0 (torch 2.11.0+cu130, Triton 3.6).
# Needs here: that Python (PYTHON), nvcc 13.x (CUDA_HOME or /usr/local/cuda, or nvcc on PATH), gcc <= 14,
# network access to PyPI (and to the PyTorch cu130 index where reachable; PyPI's own torch 2.11.0
# manylinux x86-64 wheel is the same CUDA 13.0 build, so it is used when that index cannot be reached).
# Time: about 5 minutes of downloads (torch + its nvidia-* wheels, ~3.5 GB, into a temporary venv) plus
# the causal-conv1d compile, about 11 minutes on 2 cores for one arch (sm_90). Result: causal-conv1d
# ~22 MiB (debug info stripped; STRIP_DEBUG=0 keeps it: 24 MiB), mamba-ssm 0.2 MiB, fla-core 1 MiB.
#
# Usage:  scripts/build_gpu_wheels.sh [OUT_DIR]            (OUT_DIR defaults to .wheels)
# Env:    PYTHON=python3.12  TORCH_SPEC=torch==2.11.0  TORCH_INDEX=https://download.pytorch.org/whl/cu130
#         CUDA_ARCH=90  MAX_JOBS=2  VENV=<dir to create/reuse the build venv in; default: a temp dir, removed>
#
# Also downloads, pinned, the test tools a bare Python with torch + triton lacks into OUT_DIR/testtools
# (TEST_TOOLS=0 skips them).
#
# Install on the GPU machine (Python 3.12 with torch 2.11.0+cu130 already installed, no internet):
#   python3 -m pip install --no-index --no-deps OUT_DIR/*.whl OUT_DIR/testtools/*.whl
# or, for a device call's `carry` (64 MiB with the repo), pack them with the workplace packer (see its header):
#   /work/shared/tools/pack-wheels.sh .wheels/kernels.tar.xz .wheels/causal_conv1d-*.whl \
#       .wheels/mamba_ssm-*.whl .wheels/fla_core-*.whl .wheels/testtools/*.whl        # ~24 MiB
# Without causal-conv1d (FLA's Triton conv takes its place), a 3 MiB archive leaves room for the repository's
# tracked files (about 52 MiB with the shipped models and kept runs) within the carry limit:
#   /work/shared/tools/pack-wheels.sh .wheels/slim.tar.xz .wheels/mamba_ssm-*.whl .wheels/fla_core-*.whl \
#       .wheels/testtools/*.whl
# carry .wheels/kernels.tar.xz (or slim.tar.xz) and begin the command with
#   [ -d /tmp/site ] || { mkdir -p /tmp/site && xz -d < .wheels/kernels.tar.xz | tar x -C /tmp/site; } &&
#   . /tmp/site/activate.sh && ...
set -euo pipefail

OUT=${1:-.wheels}
PYTHON=${PYTHON:-python3.12}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu130}
CUDA_ARCH=${CUDA_ARCH:-90}
export MAX_JOBS=${MAX_JOBS:-2}
CAUSAL_CONV1D_VERSION=1.7.0
MAMBA_SSM_VERSION=2.3.2.post1
FLA_CORE_SPEC=${FLA_CORE_SPEC:-fla-core==0.6.0}   # 0.6.0: torch>=2.7, triton>=3.3, einops; no upper bound

log() { printf '\n== %s\n' "$*" >&2; }

# A python3.12 that is only a pyenv shim for another version fails to run: fall back to pyenv's own.
if ! "$PYTHON" -c 'import sys' 2>/dev/null; then
  alt=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
  [ -n "$alt" ] || { echo "no working $PYTHON; set PYTHON=/path/to/python3.12" >&2; exit 1; }
  PYTHON=$alt
fi
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "$PYTHON is not Python 3.12" >&2; exit 1; }

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
fi
export CUDA_HOME
"$CUDA_HOME/bin/nvcc" --version | tail -2

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${VENV:-}" ]; then venv=$VENV; else venv=$work/venv; fi

# --- build venv with the CUDA torch -------------------------------------------------------------
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install -q -U pip
idx=()
if "$py" - "$TORCH_INDEX" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=20)
except Exception as e:
    print(f"torch index {sys.argv[1]} unreachable ({e.__class__.__name__}); using PyPI's torch", file=sys.stderr)
    sys.exit(1)
EOF
then idx=(--extra-index-url "$TORCH_INDEX"); fi
log "installing $TORCH_SPEC and build tools into $venv"
"$py" -m pip install -q "${idx[@]}" "$TORCH_SPEC" ninja packaging wheel "setuptools<82"
"$py" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
assert torch.version.cuda and torch.version.cuda.startswith("13."), "need a CUDA 13 torch build"
EOF

cd "$work"
mkdir -p src
fetch_sdist() {  # name==version -> unpacked source dir (setup.py runs for metadata: torch must be in $py)
  "$py" -m pip download -q --no-binary :all: --no-deps --no-build-isolation -d src "$1" >&2
  local tgz
  tgz=$(ls src/*.tar.gz | grep -i "$(echo "${1%%==*}" | tr - _)-${1#*==}.tar.gz")
  tar -xzf "$tgz" -C src
  echo "$work/src/$(basename "$tgz" .tar.gz)"
}

# --- mamba-ssm: pure Python (Triton) wheel --------------------------------------------------------
log "mamba-ssm $MAMBA_SSM_VERSION (MAMBA_SKIP_CUDA_BUILD)"
export MAMBA_SKIP_CUDA_BUILD=TRUE
msrc=$(fetch_sdist "mamba-ssm==$MAMBA_SSM_VERSION")
# mamba_ssm/__init__.py imports selective_scan_fn (needs the compiled selective_scan_cuda) and the model
# classes eagerly, so with no extension even `import mamba_ssm.ops.triton.ssd_combined` would fail.
"$py" - "$msrc/mamba_ssm/__init__.py" <<'EOF'
import sys
path = sys.argv[1]
lines = open(path).read().splitlines()
imports = [l for l in lines if l.startswith("from mamba_ssm.")]
assert imports, "mamba_ssm/__init__.py changed: no eager imports to patch"
rest = [l for l in lines if not l.startswith("from mamba_ssm.")]
block = ["", "# Patched by ramba's scripts/build_gpu_wheels.sh: this wheel has no compiled selective_scan_cuda;",
         "# the Triton kernels under mamba_ssm.ops.triton import without these.", "try:"]
block += ["    " + l for l in imports] + ["except ImportError:", "    pass"]
open(path, "w").write("\n".join(rest + block) + "\n")
EOF
# MAMBA_FORCE_BUILD: otherwise its bdist_wheel first tries to fetch a prebuilt wheel from GitHub (and fails
# outright, not just falls back, where that host cannot be resolved).
MAMBA_FORCE_BUILD=TRUE "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$OUT" "$msrc"
unset MAMBA_SKIP_CUDA_BUILD

# --- causal-conv1d: compiled for compute_$CUDA_ARCH / sm_$CUDA_ARCH only ----------------------------
log "causal-conv1d $CAUSAL_CONV1D_VERSION for sm_$CUDA_ARCH (MAX_JOBS=$MAX_JOBS)"
csrc=$(CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE fetch_sdist "causal-conv1d==$CAUSAL_CONV1D_VERSION")
# Its setup.py appends `-gencode arch=compute_XX,code=sm_XX` for 75, 80, 87, 90, 100, 120, 103, 110, 121:
# rewrite each of those to the one arch, then drop duplicate -gencode pairs when cc_flag is used.
"$py" - "$csrc/setup.py" "$CUDA_ARCH" <<'EOF'
import re, sys
path, arch = sys.argv[1], sys.argv[2]
src = open(path).read()
src, n = re.subn(r'"arch=compute_\d+,code=sm_\d+"', f'"arch=compute_{arch},code=sm_{arch}"', src)
assert n >= 5, f"causal-conv1d setup.py changed: only {n} -gencode flags found"
anchor = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert anchor in src, "causal-conv1d setup.py changed: anchor not found"
dedup = ("    if not HIP_BUILD:  # patched: one arch\n"
         "        cc_flag = [f for pair in dict.fromkeys(zip(cc_flag[::2], cc_flag[1::2])) for f in pair]\n")
src = src.replace(anchor, dedup + "\n" + anchor, 1)
open(path, "w").write(src)
EOF
grep -n "arch=compute_\|patched: one arch" "$csrc/setup.py" >&2
start=$(date +%s)
CAUSAL_CONV1D_FORCE_BUILD=TRUE "$py" -m pip wheel --no-build-isolation --no-deps -v -w "$OUT" "$csrc" \
  > "$work/causal_conv1d_build.log" 2>&1 || { tail -60 "$work/causal_conv1d_build.log" >&2; exit 1; }
grep -c "ptxas info" "$work/causal_conv1d_build.log" >&2 || true
echo "causal-conv1d compiled in $(( $(date +%s) - start )) s" >&2
# The extension is built with host debug info (~10 MiB of .debug_* sections in a 38 MiB .so); strip it and
# re-pack the wheel (wheel pack rewrites RECORD). The device code (.nv_fatbin, sm_$CUDA_ARCH only) stays.
if [ "${STRIP_DEBUG:-1}" = 1 ]; then
  whl=$(ls "$OUT"/causal_conv1d-"$CAUSAL_CONV1D_VERSION"-*.whl)
  "$py" -m wheel unpack -d "$work/strip" "$whl" >&2
  strip --strip-debug "$work"/strip/causal_conv1d-*/*.so
  rm "$whl"
  "$py" -m wheel pack -d "$OUT" "$work"/strip/causal_conv1d-*/ >&2
fi

# --- fla-core: pure Python wheel -------------------------------------------------------------------
log "$FLA_CORE_SPEC"
"$py" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "$FLA_CORE_SPEC"

# --- test tools the GPU machine (a bare Python with torch + triton) lacks ------------------------------
# For `import ramba`, pytest, hypothesis, fla-core (einops, packaging) and mamba_ssm's Triton ops (einops).
# Training tests (accelerate, pyyaml, numpy, ...) and benchmark plots (matplotlib) are not covered.
if [ "${TEST_TOOLS:-1}" = 1 ]; then
  log "test tools -> $OUT/testtools"
  mkdir -p "$OUT/testtools"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$OUT/testtools" \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 hypothesis==6.170.27 \
    sortedcontainers==2.4.0 einops==0.8.2 safetensors==0.8.0 tqdm==4.70.1
fi

log "wheels in $OUT"
ls -l "$OUT"/causal_conv1d-*.whl "$OUT"/mamba_ssm-*.whl "$OUT"/fla_core-*.whl "$OUT"/testtools/*.whl \
  | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF}'
