"""Shared test set-up: without a CUDA GPU, run the Triton kernels through Triton's interpreter on CPU tensors;
a fixture that runs a test on one thread."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny models run faster so, and much faster when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
