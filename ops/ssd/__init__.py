"""Mamba2's SSD scan and causal conv: pure-PyTorch references (the CUDA wrappers live in `.cuda`)."""

from .naive import causal_conv1d_ref, ssd_scan, ssd_step

__all__ = ["ssd_scan", "ssd_step", "causal_conv1d_ref"]
