"""The ops of HSA hybrids, each with its PyTorch reference beside its fast paths (ships as `ramba.ops`).

One entry per op, each with `backend="auto"` (see `ramba.ops.backends`): chunk retrieval and aggregation,
sliding-window attention, and Mamba2's SSD scan, causal conv and gated norm. This package imports nothing
else of ramba.
"""

from .aggregate import hsa_aggregate
from .retrieve import hsa_retrieve
from .ssd import causal_conv1d, gated_rms_norm, ssd_scan
from .swa import sliding_window_attention
from .utils import DocIndex

__all__ = ["DocIndex", "causal_conv1d", "gated_rms_norm", "hsa_aggregate", "hsa_retrieve", "sliding_window_attention",
           "ssd_scan"]
