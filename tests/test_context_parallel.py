"""Context parallelism (ramba.parallel): 2 and 3 gloo processes, each holding a contiguous slice of every
sequence, must reproduce the single-process ops on the full sequence, outputs and gradients (float64)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ramba.ops import causal_conv1d, sliding_window_attention, ssd_scan
from ramba.parallel import (all_gather_autograd, context_parallel_conv1d, context_parallel_scan,
                            context_parallel_swa, halo_exchange)

ATOL = 1e-9


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def bounds(lengths):
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return [(e - n, e) for n, e in zip(lengths, ends)]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def shared_sum(t):
    """The sum over ranks of a gradient of a parameter every rank holds whole."""
    t = t.clone()
    dist.all_reduce(t)
    return t


def check_halo(rank, size, lengths, width, group=None, ranks=None):
    ranks = list(range(size)) if ranks is None else ranks
    if rank not in ranks:
        return
    me = ranks.index(rank)
    gen = torch.Generator().manual_seed(11 + width)
    full = torch.randn(2, sum(lengths), 3, generator=gen, dtype=torch.float64)
    proj = torch.randn(2, sum(lengths) + width * len(lengths), 3, generator=gen, dtype=torch.float64)
    lo, hi = bounds(lengths)[me]
    x = leaf(full[:, lo:hi])
    out, valid = halo_exchange(x, width, group)
    want = torch.cat([torch.zeros(2, width, 3, dtype=torch.float64) if me == 0 else full[:, lo - width:lo],
                      full[:, lo:hi]], dim=1)
    close(out, want, "halo values")
    assert valid.shape == (2, width + hi - lo) and valid[:, width:].all()
    assert bool(valid[:, :width].all()) if me > 0 else not valid[:, :width].any()
    # the loss of rank j weighs its output with its block of proj: x's gradient = its own block + the halo
    # block of the next rank
    offs = [lo2 + width * j for j, (lo2, _) in enumerate(bounds(lengths))]
    (out * proj[:, offs[me]:offs[me] + width + hi - lo]).sum().backward()
    want_grad = proj[:, offs[me] + width:offs[me] + width + hi - lo].clone()
    if me + 1 < len(lengths) and width:
        want_grad[:, -width:] += proj[:, offs[me + 1]:offs[me + 1] + width]
    close(x.grad, want_grad, "halo gradient")


def check_gather(rank, size):
    x = leaf(torch.full((2, 3), float(rank + 1), dtype=torch.float64))
    g = all_gather_autograd(x)
    close(g, torch.stack([torch.full((2, 3), float(j + 1), dtype=torch.float64) for j in range(size)]), "gather")
    weights = torch.arange(size, dtype=torch.float64)[:, None, None] * (rank + 1)   # rank q weighs row j by j*(q+1)
    (g * weights).sum().backward()
    close(x.grad, torch.full((2, 3), rank * sum(q + 1 for q in range(size)), dtype=torch.float64), "gather grad")


def check_swa(rank, size, lengths, window, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(2, total, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    proj = torch.randn(2, total, 4, 8, generator=gen, dtype=torch.float64)
    fq, fk, fv = leaf(q), leaf(k), leaf(v)
    ref = sliding_window_attention(fq, fk, fv, window, backend="torch")
    (ref * proj).sum().backward()
    lo, hi = bounds(lengths)[rank]
    lq, lk, lv = leaf(q[:, lo:hi]), leaf(k[:, lo:hi]), leaf(v[:, lo:hi])
    out = context_parallel_swa(lq, lk, lv, window, backend="torch")
    close(out, ref[:, lo:hi].detach(), f"swa output (window {window}, slices {lengths})")
    (out * proj[:, lo:hi]).sum().backward()
    for name, local, whole in (("q", lq, fq), ("k", lk, fk), ("v", lv, fv)):
        close(local.grad, whole.grad[:, lo:hi], f"swa d{name} (window {window}, slices {lengths})")


def check_conv(rank, size, lengths, taps, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(2, total, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, taps, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    proj = torch.randn(2, total, 6, generator=gen, dtype=torch.float64)
    fx, fw, fb = leaf(x), leaf(w), leaf(bias)
    ref = causal_conv1d(fx, fw, fb, backend="torch")
    (ref * proj).sum().backward()
    lo, hi = bounds(lengths)[rank]
    lx, lw, lb = leaf(x[:, lo:hi]), leaf(w), leaf(bias)
    out = context_parallel_conv1d(lx, lw, lb, backend="torch")
    close(out, ref[:, lo:hi].detach(), "conv output")
    (out * proj[:, lo:hi]).sum().backward()
    close(lx.grad, fx.grad[:, lo:hi], "conv dx")
    close(shared_sum(lw.grad), fw.grad, "conv dweight")
    close(shared_sum(lb.grad), fb.grad, "conv dbias")


def check_scan(rank, size, lengths, seed, with_docs):
    gen = torch.Generator().manual_seed(seed)
    total, b, h, p, g, n = sum(lengths), 2, 4, 3, 2, 5
    x = torch.randn(b, total, h, p, generator=gen, dtype=torch.float64)
    dt = F.softplus(torch.randn(b, total, h, generator=gen, dtype=torch.float64))
    A = -torch.exp(torch.randn(h, generator=gen, dtype=torch.float64) * 0.5)
    B, C = (torch.randn(b, total, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    proj = torch.randn(b, total, h, p, generator=gen, dtype=torch.float64)
    proj_state = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    starts = None
    if with_docs:  # row 1: a document starting at rank 1's first token, and one inside the last slice
        starts = torch.zeros(b, total, dtype=torch.bool)
        starts[:, 0] = True
        starts[1, lengths[0]] = True
        starts[1, total - 2] = True
        starts[0, 3] = True
    full = [leaf(t) for t in (x, dt, A, B, C, D)]
    ref, ref_state = ssd_scan(*full[:5], 4, full[5], starts, return_final_state=True, backend="torch")
    ((ref * proj).sum() + (ref_state * proj_state).sum()).backward()
    lo, hi = bounds(lengths)[rank]
    local = [leaf(t[:, lo:hi]) for t in (x, dt)] + [leaf(A)] + [leaf(t[:, lo:hi]) for t in (B, C)] + [leaf(D)]
    out, state = context_parallel_scan(*local[:5], 4, local[5], None if starts is None else starts[:, lo:hi],
                                       return_final_state=True, backend="torch")
    what = f"scan (slices {lengths}, documents {with_docs})"
    close(out, ref[:, lo:hi].detach(), f"{what} output")
    last = rank == size - 1
    if last:
        close(state, ref_state.detach(), f"{what} final state")
    ((out * proj[:, lo:hi]).sum() + (state * proj_state).sum() * last).backward()
    for name, mine, whole in zip(("x", "dt", "A", "B", "C", "D"), local, full):
        grad = shared_sum(mine.grad) if name in ("A", "D") else mine.grad
        close(grad, whole.grad if name in ("A", "D") else whole.grad[:, lo:hi], f"{what} d{name}")


def worker(rank, size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        even = [7] * size
        uneven = [9, 6, 8][:size]
        for width in (0, 1, 3, 6):
            check_halo(rank, size, even, width)
        check_halo(rank, size, uneven, 4)
        check_gather(rank, size)
        if size == 3:  # a subgroup of ranks 1 and 2: peers are named by global rank
            sub = dist.new_group([1, 2])
            check_halo(rank, size, [5, 6], 3, group=sub, ranks=[1, 2])
        # windows: 1 (no halo), not dividing the slice, a halo as wide as the slice, uneven slices
        for seed, (lengths, window) in enumerate([(even, 1), (even, 3), (even, 5), (even, 8), (uneven, 7)]):
            check_swa(rank, size, lengths, window, seed)
        check_conv(rank, size, even, 4, 20)
        check_conv(rank, size, uneven, 2, 21)
        check_scan(rank, size, even, 30, False)
        check_scan(rank, size, uneven, 31, False)
        check_scan(rank, size, uneven, 32, True)
        # a halo wider than a slice: a clear error on every rank (before any message is sent)
        q = torch.randn(1, 7, 2, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match="wider than this rank's slice|more than this rank's slice"):
            context_parallel_swa(q, q, q, 9)
        with pytest.raises(ValueError, match="wider than this rank's slice"):
            halo_exchange(q, 8)
        with pytest.raises(ValueError, match="wider than this rank's slice"):
            context_parallel_conv1d(q[:, :2, 0], torch.randn(4, 4, dtype=torch.float64))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_context_parallel_matches_full_sequence(size, tmp_path):
    mp.spawn(worker, args=(size, str(tmp_path / "init")), nprocs=size, join=True)
