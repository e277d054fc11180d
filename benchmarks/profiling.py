"""A short CUDA profile of a few calls: the ops that took the most device time, as a text table."""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def top_ops(fn: Callable[[], object], calls: int = 3, rows: int = 12) -> str:
    """Run `fn` `calls` times under the profiler; the `rows` ops with the most total CUDA time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
