# Sourced by the scripts that run on a lent GPU machine (no internet): installs the carried wheels (.wheels:
# pytest, hypothesis, accelerate, pyyaml, safetensors, tqdm, matplotlib, pytest-xdist and their dependencies,
# built for the machine's Python) and this repository, then says what it runs on.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --find-links .wheels pytest hypothesis accelerate pyyaml safetensors tqdm \
    matplotlib 2>&1 | tail -1
python3 -m pip install -q --no-index --find-links .wheels pytest-xdist 2>&1 | tail -1  # parallel tests, if carried
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
