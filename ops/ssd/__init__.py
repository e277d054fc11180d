"""Mamba2's SSD scan, causal conv and gated norm: pure-PyTorch references (compiled in `.compiled`, the
mamba_ssm wrappers in `.cuda`)."""

from .naive import causal_conv1d_ref, gated_rms_norm, ssd_scan, ssd_step

__all__ = ["ssd_scan", "ssd_step", "causal_conv1d_ref", "gated_rms_norm"]
