"""Without a CUDA GPU, run the Triton kernels through Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
