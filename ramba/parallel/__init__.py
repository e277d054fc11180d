"""Context parallelism: one sequence sharded across the ranks of a process group, each rank holding a
contiguous slice [B, L/P, ...] of every row (rank r holds positions r*Lr .. (r+1)*Lr - 1).

Building blocks (ramba.parallel.context), exact against the single-process ops and differentiable:
`halo_exchange` (the last positions of the previous rank), `all_gather_autograd`, `context_parallel_swa`,
`context_parallel_conv1d` and `context_parallel_scan`.
"""

from .context import (all_gather_autograd, context_parallel_conv1d, context_parallel_scan, context_parallel_swa,
                      halo_exchange)

__all__ = ["all_gather_autograd", "context_parallel_conv1d", "context_parallel_scan", "context_parallel_swa",
           "halo_exchange"]
