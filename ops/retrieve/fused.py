"""Fused Triton retrieval: landmark scores, visibility mask and a streaming top-k in one kernel.

Each program takes a block of queries of one (batch, retrieval head), streams over the chunks it may see in
tiles, and merges every score tile into a running top-k held in registers: the [L, C] score matrix never
exists in memory, so memory stays linear in L*K whatever the number of chunks. A (score, chunk) pair is one
int64 key, the order-preserving integer image of the fp32 score in the high half and the chunk index in the
low half, so comparing keys ranks by score and breaks ties towards the more recent chunk, like the reference.
The visibility of each chunk comes from the positions inside the kernel, and when one program sees all the
chunks of its queries it also sorts its top-k by chunk and writes the indices and their scores: one launch
per call, no PyTorch work around it. With few queries and many chunks (decoding) the chunks are split over
several programs, each writing a partial top-k that a small PyTorch step merges.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .naive import SelectedScores, divide_by_sqrt_dim

MAX_TOPK = 64
SMALL_MEMORY = 4096  # chunks: at most this many landmarks (1 MB at dr=128 in bf16) stay in L2
MAX_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# launch settings for a long memory (chunks streamed from HBM), swept by benchmarks.retrieve_tuning; "insert":
# how a tile's passing scores enter the running top-k, as 64-bit (score, chunk) keys, with 32-bit work on the
# tile's score images ("images": cheaper tiles, dearer insertions), or "auto": images from IMAGES_FROM chunks on,
# where insertions are rare (on an H100, images took 0.89x the time of keys at 4K queries x 1M chunks and 0.92x
# at 64K x 256K chunks, but 4.7x at 4K x 64 chunks: benchmarks/results/retrieve_tuning.md, run 3)
LAUNCH: dict[str, int | str] = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3, "insert": "auto"}
IMAGES_FROM = 1 << 18  # chunks (16M tokens of 64): the smallest memory at which "images" was timed faster
EMPTY_HIGH = -(2**31)  # high half of every empty or masked key: the image of no non-NaN float
_EMPTY_HIGH = tl.constexpr(EMPTY_HIGH)


@triton.jit
def _image(bits):
    """Order-preserving int32 image of the float32 with these int32 bits; an involution: it also maps back."""
    return bits ^ ((bits >> 31) & 2147483647)


@triton.jit
def _max_nan(a, b):
    """max that keeps NaN (a NaN score ranks above all, as in the keys)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _floor(threshold):
    """The score of each row's K-th best key, -inf while a slot is empty: no lower score can enter."""
    high = (threshold >> 32).to(tl.int32)
    return tl.where(high == _EMPTY_HIGH, float("-inf"), _image(high).to(tl.float32, bitcast=True))


@triton.jit
def _scan(q, lmk_base, lo, hi, vis, best, threshold, rows, row_ok, b, h, L, dr, sk_c, sk_d, sqrt_dr, gumbel, seed,
          TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GUMBEL: tl.constexpr, IMAGES: tl.constexpr,
          EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """Merge the scores of chunks [lo, hi) into each row's running top-k (best [BLOCK_M, KP] keys, threshold the
    K-th best). MASKED=False is for tiles that every row of the block sees whole: no visibility or range test
    per score, and rows beyond L are kept out through their floor."""
    dims = tl.arange(0, BLOCK_D)
    floor = _floor(threshold)
    masked = tl.full((BLOCK_M, BLOCK_N), _EMPTY_HIGH, tl.int64) << 32
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        # with dr == BLOCK_D and whole tiles there is no mask, or only whole rows: Triton then pipelines the loads
        # (asynchronous copies), which a mask on the retrieval dim rules out
        lmk_ptrs = lmk_base + cols[:, None].to(tl.int64) * sk_c + dims[None, :] * sk_d
        if MASKED:
            lmk_mask = col_ok[:, None] if EVEN_D else col_ok[:, None] & (dims < dr)[None, :]
            lmk = tl.load(lmk_ptrs, mask=lmk_mask, other=0.0).to(DOT_DTYPE)
        elif EVEN_D:
            lmk = tl.load(lmk_ptrs).to(DOT_DTYPE)
        else:
            lmk = tl.load(lmk_ptrs, mask=(dims < dr)[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(lmk), input_precision=PRECISION)
        if GUMBEL:
            # counters (chunk, query row, head) all 32-bit: philox needs one width
            zero = tl.zeros((BLOCK_M, BLOCK_N), tl.uint32)
            noise, _, _, _ = tl.philox(seed, cols[None, :].to(tl.uint32) + zero,
                                       (b * L + rows)[:, None].to(tl.uint32) + zero, h.to(tl.uint32) + zero, zero)
            uniform = tl.maximum(tl.uint_to_uniform_float(noise), 1e-20)
            s = tl.math.div_rn(s, sqrt_dr) - gumbel * tl.log(-tl.log(uniform))
        # a cheap test first, on each row's best score (NaN passes, as a NaN key ranks above all): most tiles of a
        # long memory hold no score that reaches the current K-th best, and skip the per-score work
        if MASKED:
            seen = col_ok[None, :] & (cols[None, :] < vis[:, None])
            row_best = tl.reduce(tl.where(seen, s, float("-inf")), 1, _max_nan)
            row_floor = floor
        else:
            row_best = tl.reduce(s, 1, _max_nan)
            row_floor = tl.where(row_ok, floor, float("inf"))
        if tl.max((~(row_best < row_floor)).to(tl.int32), 0) > 0:
            maybe = ~(s < row_floor[:, None])
            if MASKED:
                maybe = maybe & seen
            # s is never -0.0 (sums start from +0.0), so equal scores have equal images
            image = _image(s.to(tl.int32, bitcast=True))
            if IMAGES:
                # 32-bit work on the tile: each step takes every row's best (score, then most recent chunk)
                image = tl.where(maybe, image, _EMPTY_HIGH)
                lane = cols.to(tl.int32)[None, :]  # chunk indices fit 31 bits (`unsupported`)
                passing = tl.max(tl.sum(maybe.to(tl.int32), 1), 0)  # at least as many as beat the K-th best in a row
                for _step in range(tl.minimum(passing, TOPK)):
                    top = tl.max(image, 1)
                    col = tl.max(tl.where(image == top[:, None], lane, -1), 1)
                    cand = (top.to(tl.int64) << 32) | col.to(tl.int64)
                    take = (top != _EMPTY_HIGH) & (cand > threshold)
                    best = tl.where((best == threshold[:, None]) & take[:, None], cand[:, None], best)
                    image = tl.where(lane == col[:, None], _EMPTY_HIGH, image)
                    threshold = tl.min(best, 1)
            else:
                # 64-bit keys for the tile: insert those that beat the current K-th best, largest first
                key = tl.where(maybe, (image.to(tl.int64) << 32) | cols[None, :].to(tl.int64), masked)
                beating = tl.sum((key > threshold[:, None]).to(tl.int32), 1)
                for _step in range(tl.minimum(tl.max(beating, 0), TOPK)):
                    cand = tl.max(key, 1)
                    take = cand > threshold
                    best = tl.where((best == threshold[:, None]) & take[:, None], cand[:, None], best)
                    key = tl.where(key == cand[:, None], masked, key)
                    threshold = tl.min(best, 1)
            floor = _floor(threshold)

    return best, threshold


@triton.jit(do_not_specialize=["L", "C", "shift", "chunks_per_split", "seed"])
def _retrieve_kernel(
    q_ptr, lmk_ptr, pos_ptr, out_ptr, score_ptr,
    L, Hr, dr, C, chunk_size, shift, chunks_per_split, sqrt_dr, gumbel, seed,
    sq_b, sq_l, sq_h, sq_d, sk_b, sk_c, sk_h, sk_d, sp_b, sp_l,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, GUMBEL: tl.constexpr,
    FINAL: tl.constexpr, IMAGES: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Top-TOPK of one block of queries over one range of chunks.

    FINAL (one range, no noise): indices [B, L, Hr, TOPK] int64 into out_ptr, most recent first and -1 last,
    and their scores float32 into score_ptr. Otherwise the keys [B, L, Hr, splits, TOPK] int64 into out_ptr.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hr
    h = pid_bh % Hr
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    dims = tl.arange(0, BLOCK_D)
    # chunks visible to each query: floor((position - shift) / chunk_size) clamped to [0, C]
    limit = tl.load(pos_ptr + b.to(tl.int64) * sp_b + rows.to(tl.int64) * sp_l, mask=row_ok, other=0) - shift
    vis = tl.minimum(tl.where(limit > 0, limit // chunk_size, 0), C).to(tl.int32)  # C < 2**31 (`unsupported`)
    lo = pid_s * chunks_per_split
    hi = tl.minimum(lo + chunks_per_split, tl.max(vis, 0))

    q_ptrs = q_ptr + b.to(tl.int64) * sq_b + h * sq_h + rows[:, None].to(tl.int64) * sq_l + dims[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (dims < dr)[None, :], other=0.0).to(DOT_DTYPE)
    lmk_base = lmk_ptr + b.to(tl.int64) * sk_b + h * sk_h

    # empty slots hold distinct keys below every real one; padding slots (TOPK..KP) one key above all, so
    # the minimum, the slot to replace next, is always a real slot
    slot = tl.broadcast_to(tl.arange(0, KP)[None, :], (BLOCK_M, KP))
    high = tl.where(slot < TOPK, _EMPTY_HIGH, 2147483647).to(tl.int64)
    low = tl.where(slot < TOPK, slot + 1, 2147483647).to(tl.int64)
    best = (high << 32) | low
    threshold = tl.min(best, 1)

    # tiles that every row of the block sees whole go without per-score masks; the rest (the block's last
    # chunks, rows of other documents or windows) with them
    full = tl.minimum(tl.min(tl.where(row_ok, vis, hi), 0), hi)
    full = tl.maximum(lo + (full - lo) // BLOCK_N * BLOCK_N, lo)
    best, threshold = _scan(q, lmk_base, lo, full, vis, best, threshold, rows, row_ok, b, h, L, dr, sk_c, sk_d,
                            sqrt_dr, gumbel, seed, TOPK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, GUMBEL,
                            IMAGES, EVEN_D, False)
    best, threshold = _scan(q, lmk_base, full, hi, vis, best, threshold, rows, row_ok, b, h, L, dr, sk_c, sk_d,
                            sqrt_dr, gumbel, seed, TOPK, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, PRECISION, GUMBEL,
                            IMAGES, EVEN_D, True)

    if FINAL:
        # chunk index (-1 for an empty slot, -2 for padding) above the score's image, sorted most recent first
        high = (best >> 32).to(tl.int32)
        chunk = tl.where(high == _EMPTY_HIGH, -1, best & 0xFFFFFFFF)
        chunk = tl.where(slot < TOPK, chunk, -2)
        packed = tl.sort(((chunk + 2) << 32) | (high.to(tl.int64) & 0xFFFFFFFF), dim=1, descending=True)
        chunk = (packed >> 32) - 2
        bits = _image((packed & 0xFFFFFFFF).to(tl.int32))
        score = tl.math.div_rn(bits.to(tl.float32, bitcast=True), sqrt_dr)
        score = tl.where(chunk >= 0, score, float("-inf"))
        out_row = (b.to(tl.int64) * L + rows) * Hr + h
        ok = row_ok[:, None] & (slot < TOPK)
        tl.store(out_ptr + out_row[:, None] * TOPK + slot, chunk, mask=ok)
        tl.store(score_ptr + out_row[:, None] * TOPK + slot, score, mask=ok)
    else:
        splits = tl.num_programs(2)
        out_row = ((b.to(tl.int64) * L + rows) * Hr + h) * splits + pid_s
        tl.store(out_ptr + out_row[:, None] * TOPK + slot, best, mask=row_ok[:, None] & (slot < TOPK))


def unsupported(qr: torch.Tensor, landmarks: torch.Tensor, topk: int, gumbel: float = 0.0) -> str | None:
    """Why the Triton path cannot run these inputs, or None when it can."""
    if qr.dim() != 4 or landmarks.dim() != 4:
        return (f"qr must be [B, L, Hr, dr] and landmarks [B, C, Hr, dr], got {tuple(qr.shape)}, "
                f"{tuple(landmarks.shape)}")
    if qr.shape[0] != landmarks.shape[0] or qr.shape[2:] != landmarks.shape[2:]:
        return f"qr {tuple(qr.shape)} and landmarks {tuple(landmarks.shape)} must agree on batch, heads and dim"
    if qr.dtype not in SUPPORTED_DTYPES or landmarks.dtype not in SUPPORTED_DTYPES:
        return f"qr and landmarks must be float32, bfloat16 or float16, got {qr.dtype} and {landmarks.dtype}"
    if qr.device != landmarks.device:
        return f"qr and landmarks must be on one device, got {qr.device} and {landmarks.device}"
    if qr.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"runs on CUDA tensors only (or on CPU with TRITON_INTERPRET=1), got {qr.device.type}"
    if not 1 <= qr.shape[-1] <= MAX_DIM:
        return f"the retrieval head dim must lie in [1, {MAX_DIM}], got {qr.shape[-1]}"
    if not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        return f"topk must be an integer in [1, {MAX_TOPK}], got {topk!r}"
    if landmarks.shape[1] >= 2**31 - 1 or qr.shape[0] * qr.shape[1] >= 2**31:
        return (f"at most 2**31 - 2 chunks and 2**31 - 1 queries, got {landmarks.shape[1]} and "
                f"{qr.shape[0] * qr.shape[1]}")
    if qr.shape[0] * qr.shape[2] > 65535:
        return f"B * Hr must be at most 65535, got {qr.shape[0] * qr.shape[2]}"
    if not math.isfinite(gumbel) or gumbel < 0:
        return f"gumbel must be a finite number >= 0, got {gumbel!r}"
    return None


@functools.lru_cache(maxsize=None)
def _cores(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def plan(B: int, L: int, Hr: int, C: int, topk: int, device: torch.device,
         splits: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, chunks per split) for a launch; splits=None picks them: with a memory small enough
    to stay in L2, smaller query blocks fill the GPU; else, when too few query blocks would fill it
    (decoding against a long memory), the chunks are split into ranges scanned in parallel."""
    block_m = min(LAUNCH["block_m"] if topk <= 16 else LAUNCH["block_m"] // 2, max(16, triton.next_power_of_2(L)))
    block_n = LAUNCH["block_n"]
    if splits is None:
        cores = _cores(device)
        if C <= SMALL_MEMORY:
            while block_m > 16 and triton.cdiv(L, block_m) * B * Hr < 2 * cores:
                block_m //= 2
        programs = triton.cdiv(L, block_m) * B * Hr
        splits = 1 if programs >= cores else max(1, min(triton.cdiv(4 * cores, programs), triton.cdiv(C, block_n)))
    per_split = triton.cdiv(triton.cdiv(max(C, 1), splits), block_n) * block_n
    return block_m, block_n, per_split


def _images(num_chunks: int) -> bool:
    """Whether the kernel inserts through score images for a memory of num_chunks (LAUNCH["insert"])."""
    insert = LAUNCH["insert"]
    if insert not in ("keys", "images", "auto"):
        raise ValueError(f"retrieve: LAUNCH['insert'] must be 'keys', 'images' or 'auto', got {insert!r}")
    return insert == "images" or (insert == "auto" and num_chunks >= IMAGES_FROM)


def _select(qr: torch.Tensor, landmarks: torch.Tensor, topk: int, positions: torch.Tensor, chunk_size: int,
            window: int | None, gumbel: float, splits: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices [B, L, Hr, K] of the top-k visible chunks, most recent first, -1 (empty) last, and their scores
    [B, L, Hr, K] float32 (None with Gumbel noise, whose keys hold perturbed scores)."""
    B, L, Hr, dr = qr.shape
    C = landmarks.shape[1]
    block_m, block_n, per_split = plan(B, L, Hr, C, topk, qr.device, splits)
    n_splits = triton.cdiv(C, per_split)
    final = n_splits == 1 and gumbel == 0
    out = torch.empty(B, L, Hr, 1 if final else n_splits, topk, dtype=torch.int64, device=qr.device)
    scores = torch.empty(B, L, Hr, topk, dtype=torch.float32, device=qr.device) if final else out
    low = qr.dtype == landmarks.dtype and qr.dtype != torch.float32
    # Triton's interpreter keeps bfloat16 as raw uint16 bits and multiplies those in tl.dot: upcast there
    low = low and not (qr.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    dot_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[qr.dtype] if low else tl.float32
    seed = int(torch.randint(0, 2**62, ())) if gumbel > 0 else 0
    shift = 0 if window is None else window - chunk_size
    grid = (triton.cdiv(L, block_m), B * Hr, n_splits)
    block_d = max(16, triton.next_power_of_2(dr))
    _retrieve_kernel[grid](
        qr, landmarks, positions, out, scores, L, Hr, dr, C, chunk_size, shift, per_split, math.sqrt(dr),
        gumbel, seed, *qr.stride(), *landmarks.stride(), *positions.stride(),
        TOPK=topk, KP=triton.next_power_of_2(topk), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_DTYPE=dot_dtype,
        PRECISION="tf32" if low else "ieee", GUMBEL=gumbel > 0, FINAL=final, IMAGES=_images(C),
        EVEN_D=dr == block_d,
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"],
    )
    if final:
        return out.view(B, L, Hr, topk), scores
    keys = out.flatten(-2)
    if n_splits > 1:  # merge the partial lists
        keys = keys.topk(topk, dim=-1).values
    high = (keys >> 32).to(torch.int32)
    indices, order = torch.where(high == EMPTY_HIGH, -1, keys & 0xFFFFFFFF).sort(dim=-1, descending=True)
    if gumbel > 0:  # the keys hold the perturbed scores
        return indices, None
    bits = torch.gather(high ^ ((high >> 31) & 0x7FFFFFFF), -1, order)  # the image maps back to the float bits
    scores = divide_by_sqrt_dim(bits.view(torch.float32), dr).masked_fill(indices < 0, float("-inf"))
    return indices, scores


def retrieve_triton(
    qr: torch.Tensor,
    landmarks: torch.Tensor,
    topk: int,
    chunk_size: int,
    positions: torch.Tensor,
    window: int | None = None,
    gumbel: float = 0.0,
    *,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `retrieve_reference`, fused: memory linear in L*K, never [L, C].

    qr [B, L, Hr, dr], landmarks [B, C, Hr, dr], positions [B, L] -> indices [B, L, Hr, K] int64 (most recent
    first, -1 last), scores [B, L, Hr, K] float32 (-inf for empty slots), differentiable w.r.t. qr and
    landmarks. `splits` forces the number of chunk ranges scanned in parallel (None: automatic).
    """
    reason = unsupported(qr, landmarks, topk, gumbel)
    if reason is None and positions.shape != qr.shape[:2]:
        reason = f"positions must be [B, L] = {tuple(qr.shape[:2])}, got {tuple(positions.shape)}"
    if reason is None and splits is not None and not (isinstance(splits, int) and 1 <= splits <= 65535):
        reason = f"splits must be an integer in [1, 65535], got {splits!r}"
    if reason is not None:
        raise ValueError(f"retrieve_triton: {reason}")
    B, L, Hr, _ = qr.shape
    C = landmarks.shape[1]
    scores = None
    if C == 0 or qr.numel() == 0:
        indices = torch.full((B, L, Hr, topk), -1, dtype=torch.int64, device=qr.device)
    else:
        positions = positions.to(qr.device, torch.int64)
        indices, scores = _select(qr.detach(), landmarks.detach(), topk, positions, chunk_size, window,
                                  float(gumbel), splits)
    if scores is not None and not (torch.is_grad_enabled() and (qr.requires_grad or landmarks.requires_grad)):
        return indices, scores
    return indices, SelectedScores.apply(qr, landmarks, indices, scores)
