"""Triton chunk aggregation: forward, dq/dweights per token, dk/dv per chunk through a reverse index.

Shapes as in `aggregate_reference`: q [B, L, HQ, D]; k, v [B, C*S, H, D]; indices, weights [B, L, H, K].
The forward keeps one log-sum-exp per (token, query head, slot); the backward recomputes the probabilities
from it. dk and dv are accumulated per chunk over exactly the (token, slot) pairs that selected it, so the
backward's work is linear in L * K.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .naive import aggregate_reference

__all__ = ["aggregate_triton", "route_pairs", "run_forward", "shape_unsupported", "split_segments", "unsupported"]

HEAD_DIMS = (32, 64, 128)
CHUNK_SIZES = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
# Launch settings of the three kernels for 16-bit tiles of up to 16 query heads x 64 chunk tokens x head dim 64,
# the fastest of `python -m benchmarks.aggregate_tuning` on an H200 (benchmarks/results/aggregate_tuning.md);
# larger or float32 tiles keep the settings of LARGE_TILES. dkdv: "rows" (pair, query head) rows per step, and
# about "programs" programs (several per SM; a long pair list is split between them).
LAUNCH: dict[str, dict[str, int]] = {
    "fwd": {"num_warps": 1, "num_stages": 2},
    "dq": {"num_warps": 1, "num_stages": 3},
    "dkdv": {"rows": 128, "programs": 2048, "num_warps": 4, "num_stages": 2},
}
LARGE_TILES: dict[str, dict[str, int]] = {
    "fwd": {"num_warps": 4, "num_stages": 2},
    "dq": {"num_warps": 4, "num_stages": 2},
    "dkdv": {"rows": 64, "programs": 512, "num_warps": 8, "num_stages": 1},
}


def _launch(kernel: str, heads: int, chunk: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """The settings of `kernel` for tiles of `heads` query heads x `chunk` chunk tokens x `head_dim` in `dtype`."""
    small = heads <= 16 and chunk <= 64 and head_dim <= 64 and dtype.itemsize == 2
    return dict((LAUNCH if small else LARGE_TILES)[kernel])


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b in fp32; UPCAST widens exact bf16 operands first (the CPU interpreter has no bf16 dot)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _fwd_kernel(Q, K, V, IDX, W, O, LSE,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                L, H, G, C, NSLOT, scale_log2,
                S: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, OFF_BY_ONE: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (token, b * kv head, block of BG query heads); loops over the K slots.

    A slot whose index lies outside [0, C) reads nothing and contributes nothing, like an empty slot (-1).
    """
    t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    offs_g = tl.program_id(2) * BG + tl.arange(0, BG)
    g_mask = offs_g < G
    offs_s = tl.arange(0, S)
    offs_d = tl.arange(0, D)
    heads = h * G + offs_g
    q = tl.load(Q + b * sqb + t * sqt + heads[:, None] * sqh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    row = (b * L + t) * H + h
    k_base = K + b * skb + h * skh + offs_d[None, :]
    v_base = V + b * svb + h * svh + offs_d[None, :]
    acc = tl.zeros([BG, D], dtype=tl.float32)
    for i in range(NSLOT):
        c = tl.load(IDX + row * NSLOT + i).to(tl.int64)
        c = tl.where(c < C, c, -1)
        valid = c >= 0
        w = tl.where(valid, tl.load(W + row * NSLOT + i), 0.0)
        c_rows = tl.zeros([S, 1], dtype=tl.int64) + c  # a block, not a splat of the scalar mask
        tok = tl.maximum(c_rows, 0) * S + offs_s[:, None]
        kt = tl.load(k_base + tok * skt, mask=c_rows >= 0, other=0.0)
        vt = tl.load(v_base + tok * svt, mask=c_rows >= 0, other=0.0)
        s = _dot(q, tl.trans(kt), UPCAST, PRECISION) * scale_log2
        m = tl.max(s, 1)
        if OFF_BY_ONE:
            m = tl.maximum(m, 0.0)
        p = tl.exp2(s - m[:, None])
        denom = tl.sum(p, 1)
        if OFF_BY_ONE:
            denom += tl.exp2(-m)
        acc += _dot(p.to(vt.dtype), vt, UPCAST, PRECISION) * (w / denom)[:, None]
        tl.store(LSE + (row * G + offs_g) * NSLOT + i, m + tl.log2(denom), mask=g_mask)
    tl.store(O + b * sob + t * sot + heads[:, None] * soh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=g_mask[:, None])


@triton.jit
def _dq_kernel(Q, K, V, DO, IDX, W, LSE, DQ, DW, R,
               sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sob, sot, soh,
               L, H, G, C, NSLOT, scale_log2, scale,
               S: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    """Same grid as the forward: dq, the partial dweights of this head block, and R = dO . o_i per slot."""
    t = tl.program_id(0).to(tl.int64)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    g_block = tl.program_id(2).to(tl.int64)
    offs_g = g_block * BG + tl.arange(0, BG)
    g_mask = offs_g < G
    offs_s = tl.arange(0, S)
    offs_d = tl.arange(0, D)
    heads = h * G + offs_g
    q = tl.load(Q + b * sqb + t * sqt + heads[:, None] * sqh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    do = tl.load(DO + b * sdb + t * sdt + heads[:, None] * sdh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    row = (b * L + t) * H + h
    n_rows = tl.num_programs(0).to(tl.int64) * tl.num_programs(1)
    k_base = K + b * skb + h * skh + offs_d[None, :]
    v_base = V + b * svb + h * svh + offs_d[None, :]
    dq = tl.zeros([BG, D], dtype=tl.float32)
    for i in range(NSLOT):
        c = tl.load(IDX + row * NSLOT + i).to(tl.int64)
        c = tl.where(c < C, c, -1)
        valid = c >= 0
        w = tl.where(valid, tl.load(W + row * NSLOT + i), 0.0)
        c_rows = tl.zeros([S, 1], dtype=tl.int64) + c  # a block, not a splat of the scalar mask
        tok = tl.maximum(c_rows, 0) * S + offs_s[:, None]
        kt = tl.load(k_base + tok * skt, mask=c_rows >= 0, other=0.0)
        vt = tl.load(v_base + tok * svt, mask=c_rows >= 0, other=0.0)
        lse = tl.load(LSE + (row * G + offs_g) * NSLOT + i, mask=g_mask, other=0.0)
        p = tl.exp2(_dot(q, tl.trans(kt), UPCAST, PRECISION) * scale_log2 - lse[:, None])
        dp = _dot(do, tl.trans(vt), UPCAST, PRECISION)
        r = tl.where(g_mask, tl.sum(p * dp, 1), 0.0)  # dO . o_i, with p in fp32
        tl.store(R + (row * G + offs_g) * NSLOT + i, r, mask=g_mask)
        tl.store(DW + g_block * n_rows * NSLOT + row * NSLOT + i, tl.where(valid, tl.sum(r, 0), 0.0))
        ds = p * (dp - r[:, None]) * w
        dq += _dot(ds.to(kt.dtype), kt, UPCAST, PRECISION)
    tl.store(DQ + b * sob + t * sot + heads[:, None] * soh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=g_mask[:, None])


@triton.jit
def _dkdv_kernel(Q, K, V, DO, W, LSE, R, PAIRS, SEGS, DK, DV,
                 sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, sgb, sgt, sgh,
                 L, H, G, C, NSLOT, N_SEGS, scale_log2, scale,
                 BS: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BP: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program per (segment of one chunk's pair list, block of BS chunk tokens).

    A segment is SEGS[:, sid] = (key = (b * H + h) * C + chunk, start, end) into PAIRS, the sorted flat
    (b, t, h, slot) positions. Rows of a step are BP pairs x BG query heads. The fp32 dk, dv tiles are added
    atomically into DK, DV (strides sgb, sgt, sgh), as several segments may share a chunk.
    """
    sid = tl.program_id(0)
    key = tl.load(SEGS + sid)
    start = tl.load(SEGS + N_SEGS + sid)
    end = tl.load(SEGS + 2 * N_SEGS + sid)
    c = key % C
    b = key // C // H
    h = key // C % H
    offs_n = c * (BS * tl.num_programs(1)) + tl.program_id(1) * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BP * BG)
    pair_of_row = offs_m // BG
    g_of_row = offs_m % BG
    has_pairs = (tl.zeros([BS, 1], dtype=tl.int64) + start) < end
    kt = tl.load(K + b * skb + h * skh + offs_n[:, None] * skt + offs_d[None, :], mask=has_pairs, other=0.0)
    vt = tl.load(V + b * svb + h * svh + offs_n[:, None] * svt + offs_d[None, :], mask=has_pairs, other=0.0)
    dk = tl.zeros([BS, D], dtype=tl.float32)
    dv = tl.zeros([BS, D], dtype=tl.float32)
    for p0 in range(start, end, BP):
        p_mask = p0 + pair_of_row < end
        pair = tl.load(PAIRS + p0 + pair_of_row, mask=p_mask, other=0)
        slot = pair % NSLOT
        row = pair // NSLOT
        t = row // H % L
        w = tl.load(W + pair, mask=p_mask, other=0.0)
        for g0 in range(0, G, BG):
            g = g0 + g_of_row
            m_mask = p_mask & (g < G)
            heads = h * G + g
            q = tl.load(Q + b * sqb + t[:, None] * sqt + heads[:, None] * sqh + offs_d[None, :],
                        mask=m_mask[:, None], other=0.0)
            do = tl.load(DO + b * sdb + t[:, None] * sdt + heads[:, None] * sdh + offs_d[None, :],
                         mask=m_mask[:, None], other=0.0)
            stat = (row * G + g) * NSLOT + slot
            lse = tl.load(LSE + stat, mask=m_mask, other=0.0)
            r = tl.load(R + stat, mask=m_mask, other=0.0)
            p = tl.exp2(_dot(q, tl.trans(kt), UPCAST, PRECISION) * scale_log2 - lse[:, None])
            p = tl.where(m_mask[:, None], p, 0.0) * w[:, None]
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
            ds = p * (_dot(do, tl.trans(vt), UPCAST, PRECISION) - r[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    out = b * sgb + offs_n[:, None] * sgt + h * sgh + offs_d[None, :]
    tl.atomic_add(DK + out, dk * scale, mask=has_pairs)
    tl.atomic_add(DV + out, dv, mask=has_pairs)


def shape_unsupported(head_dim: int, chunk_size: int, *dtypes: torch.dtype) -> Exception | None:
    """The error the kernels would raise for this head dim, chunk size and dtypes (of q, k, v), or None when they
    take them."""
    if head_dim not in HEAD_DIMS:
        return ValueError(f"aggregate_triton: head dim {head_dim} is not supported (supported: {HEAD_DIMS})")
    if chunk_size not in CHUNK_SIZES:
        return ValueError(f"aggregate_triton: chunk_size {chunk_size} is not supported (supported: {CHUNK_SIZES})")
    if dtypes[0] not in DTYPES or len(set(dtypes)) > 1:
        return TypeError(f"aggregate_triton: q, k, v must share one dtype among float16, bfloat16, float32, got "
                         f"{', '.join(map(str, dtypes))}")
    return None


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                weights: torch.Tensor, chunk_size: int, host_kv: bool = False) -> Exception | None:
    """The error the Triton path would raise for these (shape-checked) inputs, or None when it takes them.

    host_kv: k and v may lie in pinned CPU memory while the rest is on the GPU (the forward kernel alone reads
    them so)."""
    err = shape_unsupported(q.shape[-1], chunk_size, q.dtype, k.dtype, v.dtype)
    if err is not None:
        return err
    if indices.dtype not in (torch.int32, torch.int64):
        return TypeError(f"aggregate_triton: indices must be int32 or int64, got {indices.dtype}")
    in_host = host_kv and q.device.type == "cuda" and k.device.type == v.device.type == "cpu"
    if in_host and not (k.is_pinned() and v.is_pinned()):
        return ValueError("aggregate_triton: k and v in CPU memory must be pinned (torch.empty(..., pin_memory=True)) "
                          "for the GPU to read them")
    devices = {t.device for t in ((q, indices, weights) if in_host else (q, k, v, indices, weights))}
    if len(devices) > 1:
        return ValueError(f"aggregate_triton: all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return RuntimeError(f"aggregate_triton: runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got "
                            f"{q.device.type}")
    return None


def route_pairs(indices: torch.Tensor, num_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse index of the selections, chunk -> the (token, slot) pairs that chose it.

    indices [B, L, H, K] -> pairs [B*L*H*K] int64, the flat positions into indices sorted stably by the key
    (b * H + h) * num_chunks + chunk (empty slots, and indices outside [0, num_chunks), last), and offsets
    [B*H*num_chunks + 1] int64: the pairs of key j are pairs[offsets[j]:offsets[j + 1]].
    """
    B, L, H, _ = indices.shape
    n_keys = B * H * num_chunks
    # 32-bit keys where they fit: a radix sort of them takes half the passes
    key_type = torch.int32 if n_keys < 2**31 else torch.int64
    first_key = torch.arange(0, n_keys, num_chunks, device=indices.device, dtype=key_type).view(B, 1, H, 1)
    listed = (indices >= 0) & (indices < num_chunks)
    keys = torch.where(listed, indices.to(key_type) + first_key, n_keys).flatten()
    sorted_keys, pairs = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(n_keys + 1, device=keys.device, dtype=key_type))
    return pairs, offsets


@triton.jit
def _segments_kernel(OFFSETS, SEGS, n_keys, n_segs, seg_len, log_keys, BLOCK: tl.constexpr):
    """One program. First ENDS (SEGS past its three rows) = the running count of segments up to each key;
    then for each segment id its key (binary search in ENDS), start and end; spare segments get (0, 0, 0)."""
    ends = SEGS + 3 * n_segs
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int64), 0)
    for k0 in range(0, n_keys, BLOCK):
        j = k0 + tl.arange(0, BLOCK)
        m = j < n_keys
        count = tl.load(OFFSETS + j + 1, mask=m, other=0) - tl.load(OFFSETS + j, mask=m, other=0)
        n = (count + seg_len - 1) // seg_len
        tl.store(ends + j, carry + tl.cumsum(n, 0), mask=m)
        carry += tl.sum(n, 0)
    tl.debug_barrier()
    for s0 in range(0, n_segs, BLOCK):
        sid = s0 + tl.arange(0, BLOCK)
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = lo + n_keys
        for _ in range(log_keys):  # the first key whose running count exceeds sid
            active = lo < hi
            mid = (lo + hi) // 2
            above = tl.load(ends + mid, mask=active, other=0) > sid
            lo = tl.where(active & ~above, mid + 1, lo)
            hi = tl.where(active & above, mid, hi)
        used = (lo < n_keys) & (sid < n_segs)
        key = tl.minimum(lo, n_keys - 1)
        before = tl.load(ends + key - 1, mask=used & (key > 0), other=0)
        start = tl.load(OFFSETS + key, mask=used, other=0) + (sid - before) * seg_len
        end = tl.minimum(start + seg_len, tl.load(OFFSETS + key + 1, mask=used, other=0))
        out = sid < n_segs
        tl.store(SEGS + sid, tl.where(used, key, 0), mask=out)
        tl.store(SEGS + n_segs + sid, tl.where(used, start, 0), mask=out)
        tl.store(SEGS + 2 * n_segs + sid, tl.where(used, end, 0), mask=out)


def split_segments(offsets: torch.Tensor, seg_len: int, n_segs: int) -> torch.Tensor:
    """Cut each key's pair list into segments of at most seg_len pairs, in one launch and without a device sync.

    offsets [n_keys + 1] from route_pairs -> [3, n_segs] int64 rows (key, start, end); n_segs must be at least
    the number of segments, and the spare ones are empty (start == end == 0, key 0).
    """
    n_keys = offsets.numel() - 1
    segs = torch.empty(3 * n_segs + n_keys, dtype=torch.int64, device=offsets.device)  # n_keys of scratch at the end
    _segments_kernel[(1,)](offsets, segs, n_keys, n_segs, seg_len, n_keys.bit_length(), BLOCK=1024, num_warps=4)
    return segs[:3 * n_segs].view(3, n_segs)


def _head_block(G: int) -> int:
    """Query heads per program of the per-token kernels: G padded to a power of two in [16, 64] (tl.dot M >= 16)."""
    return min(max(16, triton.next_power_of_2(G)), 64)


def _dot_flags(q: torch.Tensor) -> dict[str, object]:
    """UPCAST for bf16 under the interpreter; float32 inputs take three tf32 products per dot (about float32
    accuracy: plain tf32 errs by ~1e-3 on these softmax outputs)."""
    return dict(UPCAST=q.dtype == torch.bfloat16 and q.device.type != "cuda",
                PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def run_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                chunk_size: int, scale: float, off_by_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel alone: o [B, L, HQ, D] in q's dtype and the log-sum-exps [B, L, HQ, K] (float32), on
    q's device. Inputs as `aggregate_triton` takes them after its checks (last dims contiguous, float32
    weights); k and v may also lie in pinned CPU memory when q is on the GPU, which the kernel then reads in
    place (only the selected chunks cross the bus)."""
    B, L, HQ, D = q.shape
    H, K = k.shape[2], indices.shape[-1]
    G = HQ // H
    BG = _head_block(G)
    o = torch.empty(B, L, HQ, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, L, HQ, K, dtype=torch.float32, device=q.device)
    grid = (L, B * H, triton.cdiv(G, BG))
    _fwd_kernel[grid](q, k, v, indices, weights, o, lse,
                      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                      L, H, G, k.shape[1] // chunk_size, K, scale * LOG2E,
                      S=chunk_size, D=D, BG=BG, OFF_BY_ONE=off_by_one, **_dot_flags(q),
                      **_launch("fwd", BG, chunk_size, D, q.dtype))
    return o, lse


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                weights: torch.Tensor, chunk_size: int, scale: float, off_by_one: bool) -> torch.Tensor:
        o, lse = run_forward(q, k, v, indices, weights, chunk_size, scale, off_by_one)
        ctx.save_for_backward(q, k, v, indices, weights, lse)
        ctx.chunk_size, ctx.scale = chunk_size, scale
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, indices, weights, lse = ctx.saved_tensors
        S, scale = ctx.chunk_size, ctx.scale
        B, L, HQ, D = q.shape
        H, K = k.shape[2], indices.shape[-1]
        G = HQ // H
        do = _last_dim_contiguous(do)
        BG = _head_block(G)
        n_gb = triton.cdiv(G, BG)
        dq = torch.empty(B, L, HQ, D, dtype=q.dtype, device=q.device)
        dw = torch.empty(n_gb, B, L, H, K, dtype=torch.float32, device=q.device)
        r = torch.empty_like(lse)
        _dq_kernel[(L, B * H, n_gb)](
            q, k, v, do, indices, weights, lse, dq, dw, r,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            L, H, G, k.shape[1] // S, K, scale * LOG2E, scale, S=S, D=D, BG=BG, **_dot_flags(q),
            **_launch("dq", BG, S, D, q.dtype))
        dk = dv = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk, dv = _dkdv(q, k, v, do, indices, weights, lse, r, S, scale)
        return dq, dk, dv, None, dw[0] if n_gb == 1 else dw.sum(0), None, None, None


def _dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, indices: torch.Tensor,
          weights: torch.Tensor, lse: torch.Tensor, r: torch.Tensor, S: int,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv [B, C*S, H, D] in k's dtype: one program per (segment of a chunk's pairs, block of chunk tokens)."""
    B, L, HQ, D = q.shape
    H, K = k.shape[2], indices.shape[-1]
    G = HQ // H
    C = k.shape[1] // S
    BG = min(triton.next_power_of_2(G), 64)
    BS = min(S, 64)
    launch = _launch("dkdv", BG, BS, D, q.dtype)
    BP = max(1, launch.pop("rows") // BG)
    n_pairs = B * L * H * K
    seg_len = BP * triton.cdiv(triton.cdiv(n_pairs, launch.pop("programs")), BP)
    n_segs = min(B * H * C, n_pairs) + triton.cdiv(n_pairs, seg_len)
    pairs, offsets = route_pairs(indices, C)
    segs = split_segments(offsets, seg_len, n_segs)
    grads = torch.zeros(2, B, C * S, H, D, dtype=torch.float32, device=q.device)  # dk, dv
    dk, dv = grads
    _dkdv_kernel[(n_segs, S // BS)](
        q, k, v, do, weights, lse, r, pairs, segs, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        L, H, G, C, K, n_segs, scale * LOG2E, scale,
        BS=BS, D=D, BG=BG, BP=BP, **_dot_flags(q), **launch)
    dk, dv = grads.to(k.dtype)  # k and v share one dtype
    return dk, dv


def aggregate_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
    scale: float,
    softmax_off_by_one: bool = False,
) -> torch.Tensor:
    """Same contract as `aggregate_reference`, through Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    q [B, L, HQ, D]; k, v [B, C*S, H, D]; indices, weights [B, L, H, K] -> o [B, L, HQ, D] in q's dtype.
    Head dims 32/64/128, chunk sizes 32/64/128, q, k, v in one of float16/bfloat16/float32, any K and any G.
    Accumulates in float32; float32 inputs take tf32x3 dots on the GPU (about float32 accuracy). An index
    outside [0, C) counts as an empty slot: the kernels never read outside k and v (hsa_aggregate raises for
    such indices unless told not to check).
    """
    err = unsupported(q, k, v, indices, weights, chunk_size)
    if err is not None:
        raise err
    if q.numel() == 0 or k.shape[1] == 0 or indices.shape[-1] == 0:  # nothing to attend to: no kernel needed
        return aggregate_reference(q, k, v, indices, weights, chunk_size, scale, softmax_off_by_one)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    weights = weights.to(torch.float32).contiguous()
    return _Aggregate.apply(q, k, v, indices.contiguous(), weights, chunk_size, float(scale),
                            bool(softmax_off_by_one))
