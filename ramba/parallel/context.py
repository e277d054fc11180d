"""Context parallelism on torch.distributed: the local mixers of one sequence sharded across ranks, exactly.

Layout: the P ranks of `group` (default: the world) each hold a contiguous slice of every row, rank r the
positions r*Lr .. (r+1)*Lr - 1 of a sequence of P*Lr tokens, as tensors [B, Lr, ...]. Each function here
returns, on every rank, that rank's slice of what the single-process op returns on the full sequence, and
is differentiable: gradients that belong to another rank's inputs travel back to it.

Every function is collective: all ranks of the group must call it, in the same order, with slices of the same
shape (only the length may differ, and each must satisfy the stated preconditions), and must all run the
backward of its outputs (a rank whose loss ignores an output still needs it in its graph), else ranks wait on
each other forever. Packed documents, which may continue across ranks, come as a
`ramba.parallel.documents.SliceDocs` (the scan takes its starts as seq_start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from ramba.ops import DocIndex, causal_conv1d, sliding_window_attention, ssd_scan

if TYPE_CHECKING:
    from .documents import SliceDocs

__all__ = ["all_gather_autograd", "context_parallel_conv1d", "context_parallel_scan", "context_parallel_swa",
           "halo_exchange", "reset_traffic", "traffic"]


TRAFFIC: dict[str, int] = {"p2p": 0, "all_gather": 0, "all_reduce": 0, "all_to_all": 0}


def traffic() -> dict[str, int]:
    """Bytes this process moved through the collectives of this module since the last `reset_traffic`, by
    kind: point-to-point messages sent, all-gather bytes received ((P-1) parts), all-reduce bytes sent
    (2 (P-1)/P of the tensor, a ring all-reduce's share) and all-to-all bytes sent ((P-1)/P of the tensor). A model for the benchmarks, not a network counter."""
    return dict(TRAFFIC)


def reset_traffic() -> None:
    for kind in TRAFFIC:
        TRAFFIC[kind] = 0


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _peer(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of `group_rank` in `group` (point-to-point ops name global ranks)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _exchange(group: dist.ProcessGroup | None, send: Tensor | None, send_to: int | None, recv: Tensor | None,
              recv_from: int | None) -> None:
    """Send `send` to group rank `send_to` and receive into `recv` from group rank `recv_from` (either may be
    None), as one batch of point-to-point ops, and wait for both."""
    ops = []
    if send is not None:
        TRAFFIC["p2p"] += _bytes(send)
        ops.append(dist.P2POp(dist.isend, send, _peer(group, send_to), group))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, _peer(group, recv_from), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _HaloExchange(Function):
    """[B, Lr, ...] -> [B, width + Lr, ...]: the previous rank's last `width` positions (zeros on rank 0) first."""

    @staticmethod
    def forward(ctx, x: Tensor, width: int, group: dist.ProcessGroup | None) -> Tensor:
        rank, size = _rank_size(group)
        ctx.width, ctx.group, ctx.rank, ctx.size = width, group, rank, size
        halo = x.new_zeros((x.shape[0], width, *x.shape[2:]))
        send = x[:, x.shape[1] - width:].contiguous() if rank + 1 < size else None
        _exchange(group, send, rank + 1, halo if rank > 0 else None, rank - 1)
        return torch.cat([halo, x], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        width, rank, size = ctx.width, ctx.rank, ctx.size
        grad_x = grad[:, width:].clone()
        # the halo's gradient goes back to its owner, the previous rank; ours comes from the next rank
        send = grad[:, :width].contiguous() if rank > 0 else None
        recv = grad_x.new_empty((grad_x.shape[0], width, *grad_x.shape[2:])) if rank + 1 < size else None
        _exchange(ctx.group, send, rank - 1, recv, rank + 1)
        if recv is not None:
            grad_x[:, grad_x.shape[1] - width:] += recv
        return grad_x, None, None


def halo_exchange(x: Tensor, width: int, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """Prepend the previous rank's last `width` positions to this rank's slice.

    x: [B, Lr, ...] (same shape but for Lr on every rank) -> (out [B, width + Lr, ...], valid bool
    [B, width + Lr]): out[:, :width] holds the previous rank's x[:, -width:] (zeros on rank 0, where valid is
    False for those positions; valid is True everywhere else), out[:, width:] is x. Point-to-point: each rank
    sends one message to the next rank. Backward sends the halo's gradient to the previous rank, which adds it
    to the gradient of its last `width` positions. Precondition: 0 <= width <= Lr (ValueError otherwise).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"halo_exchange: width must be an integer >= 0, got {width!r}")
    if x.dim() < 2:
        raise ValueError(f"halo_exchange: x must be [B, Lr, ...], got shape {tuple(x.shape)}")
    if width > x.shape[1]:
        raise ValueError(f"halo_exchange: the halo ({width} positions) is wider than this rank's slice "
                         f"({x.shape[1]} positions): use fewer ranks or longer slices (each slice must hold at "
                         f"least {width} positions)")
    rank, size = _rank_size(group)
    valid = torch.ones(x.shape[0], width + x.shape[1], dtype=torch.bool, device=x.device)
    if rank == 0:
        valid[:, :width] = False
    if size == 1 or width == 0:
        return torch.cat([x.new_zeros((x.shape[0], width, *x.shape[2:])), x], dim=1), valid
    return _HaloExchange.apply(x, width, group), valid


class _AllGather(Function):
    """x [...] -> [P, ...]; backward: all-reduce (sum) of the gradient, this rank's row."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        rank, size = _rank_size(group)
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        TRAFFIC["all_gather"] += (size - 1) * _bytes(x)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        size = grad.shape[0]
        TRAFFIC["all_reduce"] += 2 * (size - 1) * _bytes(grad) // size
        return grad[ctx.rank], None


def all_gather_autograd(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """x [...] (same shape on every rank) -> [P, ...], row j from rank j; differentiable: the gradient of x
    is the sum over ranks of the gradient of their row j = this rank. Uses all_gather and all_reduce only,
    which every backend has (gloo included); meant for small tensors (states, decays)."""
    if dist.get_world_size(group) == 1:
        return x.unsqueeze(0)
    return _AllGather.apply(x, group)


class _Tie(Function):
    """Returns x unchanged, with `other` in its graph: backward gives `other` a zero gradient, so that the
    collective in `other`'s backward runs on every rank, also on one whose result does not depend on it."""

    @staticmethod
    def forward(ctx, x: Tensor, other: Tensor) -> Tensor:
        ctx.other_shape, ctx.other_dtype = other.shape, other.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad.new_zeros(ctx.other_shape, dtype=ctx.other_dtype)


def context_parallel_swa(q: Tensor, k: Tensor, v: Tensor, window: int, group: dist.ProcessGroup | None = None,
                         backend: str = "auto", docs: SliceDocs | None = None,
                         history: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Sliding-window attention of this rank's slice, equal to its slice of the full-sequence attention.

    q: [B, Lr, HQ, D], k, v: [B, Lr, H, D], RoPE already applied with global positions -> [B, Lr, HQ, D]
    (query t sees keys t-window+1 .. t of the whole sequence). The window-1 keys and values before the slice
    come from the previous rank (one halo exchange of k and v together), then `sliding_window_attention`
    runs in its cached form; on rank 0 key_valid marks the missing halo. Gradients of the halo reach the
    previous rank's k, v. Precondition: window - 1 <= Lr. docs (`ramba.parallel.documents.SliceDocs`): packed
    documents, which may continue across ranks; the attention then runs in its full form on the halo and the
    slice together, with the halo's document ids, and the halo's outputs are dropped. history: the keys and
    values [B, window-1, H, D] of the positions before rank 0's slice (a sharded cache continuing, the same on
    every rank; inference only): rank 0's halo.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"context_parallel_swa: window must be an integer >= 1, got {window!r}")
    if k.shape != v.shape or q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"context_parallel_swa: q [B, Lr, HQ, D] and k, v [B, Lr, H, D] must agree, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    width = window - 1
    if history is not None:
        if docs is not None or history[0].shape[1] != width:
            raise ValueError(f"context_parallel_swa: history must hold the {width} keys before the sequence, without "
                             f"docs, got {history[0].shape[1]}")
        if dist.get_rank(group) == 0:
            k, v = torch.cat([history[0].to(k.dtype), k], dim=1), torch.cat([history[1].to(v.dtype), v], dim=1)
            q = torch.cat([q.new_zeros((q.shape[0], width, *q.shape[2:])), q], dim=1)
        out = context_parallel_swa(q, k, v, window, group, backend, docs)
        return out[:, width:] if dist.get_rank(group) == 0 else out
    if dist.get_world_size(group) == 1 or width == 0:
        return sliding_window_attention(q, k, v, window, docs, backend)
    if width > q.shape[1]:
        raise ValueError(f"context_parallel_swa: the window ({window}) needs a halo of {width} keys, more than "
                         f"this rank's slice of {q.shape[1]} positions: use fewer ranks or longer slices")
    kv, valid = halo_exchange(torch.cat([k, v], dim=-1), width, group)
    keys, values = kv.split(k.shape[-1], dim=-1)
    if docs is not None:  # rank 0's halo is a document of its own (id -1): no query of the slice sees it
        queries = torch.cat([q.new_zeros((q.shape[0], width, *q.shape[2:])), q], dim=1)
        out = sliding_window_attention(queries, keys, values, window, docs.with_halo(width), backend)
        return out[:, width:]
    key_valid = valid if dist.get_rank(group) == 0 else None
    return sliding_window_attention(q, keys, values, window, backend=backend, key_valid=key_valid)


def context_parallel_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                            group: dist.ProcessGroup | None = None, backend: str = "auto",
                            docs: SliceDocs | None = None, history: Tensor | None = None) -> Tensor:
    """Mamba2's depthwise causal conv on this rank's slice: x [B, Lr, C], weight [C, K], bias [C] -> [B, Lr, C],
    equal to the slice of `causal_conv1d` on the full sequence. The K-1 inputs before the slice come from the
    previous rank (zeros on rank 0, which is what the conv assumes before the first token); the conv runs on
    the halo and the slice together in its full form and the halo's outputs are dropped. Precondition:
    K - 1 <= Lr. docs (`ramba.parallel.documents.SliceDocs`): packed documents; the taps stop at each document's
    first token, also when its document started on an earlier rank. history [B, K-1, C]: the inputs before rank
    0's slice (a sharded cache continuing, the same on every rank; without docs): rank 0's halo instead of zeros.
    """
    if weight.dim() != 2:
        raise ValueError(f"context_parallel_conv1d: weight must be [C, K], got shape {tuple(weight.shape)}")
    width = weight.shape[1] - 1
    if history is not None and (docs is not None or history.shape[1] != width):
        raise ValueError(f"context_parallel_conv1d: history must hold the {width} inputs before the sequence, "
                         f"without docs, got shape {tuple(history.shape)}")
    extended, _ = halo_exchange(x, width, group)
    if history is not None and dist.get_rank(group) == 0:
        extended = torch.cat([history.to(x.dtype), x], dim=1)
    ids = None if docs is None else DocIndex(docs.with_halo(width))
    return causal_conv1d(extended, weight, bias, ids, backend=backend)[:, width:]


def context_parallel_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                          D: Tensor | None = None, seq_start: Tensor | DocIndex | None = None,
                          group: dist.ProcessGroup | None = None, *, return_final_state: bool = False,
                          initial_state: Tensor | None = None, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Mamba2's SSD scan of this rank's slice, equal to its slice of `ssd_scan` on the full sequence.

    x: [B, Lr, H, P]; dt: [B, Lr, H] (after softplus); A: [H]; B, C: [B, Lr, G, N]; D: [H]; seq_start: bool
    [B, Lr] (True where a document starts) or a DocIndex of the slice -> y [B, Lr, H, P] in x's dtype (and, with
    return_final_state, the true state after this rank's last token [B, H, P, N], in the compute dtype).
    initial_state [B, H, P, N]: the state before rank 0's first token (a sharded cache continuing, the same on
    every rank; inference only), zero when None.

    1. Scan the slice from a zero state (`ssd_scan`, return_final_state): y0, s_r [B, H, P, N].
    2. All-gather (one small message, differentiable) every rank's s_j and its carry factor c_j [B, H]:
       exp(sum of dt*A over the slice), or 0 where a document starts in the slice (the state is dropped there).
    3. The state entering rank r, in order: h = initial_state (or 0); for j < r: h = c_j * h + s_j.
    4. Correct the outputs (no second scan): y_t = y0_t + (C_t · h) * exp(sum_{s <= t} dt_s*A) for tokens t
       before the slice's first document start, which the zero-state scan left out.
    """
    starts = seq_start.starts if isinstance(seq_start, DocIndex) else seq_start
    y0, s = ssd_scan(x, dt, A, B, C, chunk_size, D, seq_start, return_final_state=True, backend=backend)
    ct = s.dtype
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    log_decay = (dt.to(ct) * A.to(ct)).cumsum(dim=1)                          # [B, Lr, H]: from the slice start
    reach = log_decay.exp()
    carry = (dt.to(ct) * A.to(ct)).sum(dim=1).exp()                            # [B, H]
    if starts is not None:
        open_ = starts.long().cumsum(dim=1) == 0                               # [B, Lr]: no start up to t
        reach = reach * open_.unsqueeze(-1)
        carry = carry * (~starts.bool().any(dim=1)).unsqueeze(-1)
    rank, size = _rank_size(group)
    if size == 1 and initial_state is None:
        return (y0, s) if return_final_state else y0
    gathered = all_gather_autograd(torch.cat([s.flatten(1), carry], dim=1), group)  # [P, B, H*P*N + H]
    states = gathered[..., :h * p * n].view(size, b, h, p, n)
    carries = gathered[..., h * p * n:]
    state_in = states.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(ct)
    for j in range(rank):
        state_in = carries[j][..., None, None] * state_in + states[j]
    y = y0
    if rank > 0 or initial_state is not None:
        into = torch.einsum("blgn,bgkpn->blgkp", C.to(ct), state_in.view(b, g, h // g, p, n)).reshape(b, l, h, p)
        y = (y0.to(ct) + into * reach.unsqueeze(-1)).to(x.dtype)
    # rank 0 reads nothing gathered: its outputs still carry the gather, whose backward is collective
    y = _Tie.apply(y, gathered)
    if return_final_state:
        return y, _Tie.apply(carry[..., None, None] * state_in + s, gathered)
    return y
