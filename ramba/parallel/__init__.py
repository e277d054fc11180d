"""Context parallelism: one sequence sharded across the ranks of a process group, each rank holding a
contiguous slice [B, L/P, ...] of every row (rank r holds positions r*Lr .. (r+1)*Lr - 1).

The model: `with context_parallel(group): out = model(ids_slice, labels=labels_slice)`, then
`out.loss.backward()` and `all_reduce_gradients(model, group)`, or all three in `loss_and_gradients` (ramba.parallel.model says what is sharded and
what moves between ranks). Inference: `with context_parallel(group): model(ids_slice, cache=cache)` prefills
a cache sharded across the ranks, then `model(next_tokens, cache=cache)` decodes (ramba.parallel.cache);
`generate_sharded(model, ids_slice, max_new_tokens)` does both, greedily (ramba.parallel.generation).
`prefill_sharded(model, whole_prompt, cache, segment_length)` prefills a prompt of any length in rounds of one
piece a rank (ramba.parallel.prefill), each rank keeping the chunk memory of its pieces.
Building blocks (ramba.parallel.context), exact against the single-process ops and
differentiable: `halo_exchange` (the last positions of the previous rank), `all_gather_autograd`,
`context_parallel_swa`, `context_parallel_conv1d` and `context_parallel_scan`; `traffic()` counts the bytes
they moved.
"""

from .context import (all_gather_autograd, context_parallel_conv1d, context_parallel_scan, context_parallel_swa,
                      halo_exchange, reset_traffic, traffic)
from .generation import generate_sharded
from .group import ContextParallel, Mesh, active, context_parallel, split_world
from .model import all_reduce_gradients, loss_and_gradients
from .prefill import prefill_sharded

__all__ = ["ContextParallel", "Mesh", "active", "all_gather_autograd", "all_reduce_gradients", "context_parallel",
           "context_parallel_conv1d", "context_parallel_scan", "context_parallel_swa", "generate_sharded", "halo_exchange",
           "loss_and_gradients", "prefill_sharded", "reset_traffic", "split_world", "traffic"]
