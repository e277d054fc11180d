# Sourced by the scripts that run on a lent GPU machine (no internet): unpacks the carried wheel archives
# (.wheels/*.tar.xz) onto PYTHONPATH, installs the carried wheels (.wheels:
# pytest, hypothesis, accelerate, pyyaml, safetensors, tqdm, matplotlib, pytest-xdist and their dependencies,
# built for the machine's Python) and this repository, then says what it runs on.
export PYTHONUNBUFFERED=1
# Triton autotuning results kept on disk: each later process (tests, benchmarks) on the machine skips the search
export TRITON_CACHE_AUTOTUNING=1
# wheel archives made by the workplace's pack-wheels.sh (flash-attn 4; scripts/build_gpu_wheels.sh's kernels)
for archive in .wheels/*.tar.xz; do
    [ -e "$archive" ] && [ ! -e "/tmp/site/.$(basename "$archive")" ] || continue
    mkdir -p /tmp/site && xz -d < "$archive" | tar x -C /tmp/site && touch "/tmp/site/.$(basename "$archive")"
done
[ -f /tmp/site/activate.sh ] && . /tmp/site/activate.sh
nvidia-smi -L
python3 -m pip install -q --no-index --find-links .wheels pytest hypothesis accelerate pyyaml safetensors tqdm \
    matplotlib 2>&1 | tail -1
python3 -m pip install -q --no-index --find-links .wheels pytest-xdist 2>&1 | tail -1  # parallel tests, if carried
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
