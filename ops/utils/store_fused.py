"""Triton kernel of write_chunks (store.py): one program per (row, token of the chunk) copies the token's H*D
values to the row's slot, through a pointer that may also address pinned CPU memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements of a token's H*D values copied per step of the kernel's loop


@triton.jit
def _write_kernel(BUF, NEW, SLOT, MASK, sbb, sbt, snb, snt, C, S,
                  ROW: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (row b, token t of the chunk): copies the token's ROW = H*D values if b is in the mask."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    at = tl.minimum(tl.maximum(tl.load(SLOT + b).to(tl.int64), 0), C - 1)
    # the row's mask read as a vector (the interpreter takes no scalar in a vector mask)
    keep = tl.load(MASK + b + tl.arange(0, BLOCK) * 0) != 0
    for start in range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = (offs < ROW) & keep
        x = tl.load(NEW + b * snb + t * snt + offs, mask=inside)
        tl.store(BUF + b * sbb + (at * S + t) * sbt + offs, x, mask=inside)


def write_chunks_triton(buffer: torch.Tensor, chunk: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> None:
    """buffer [B, C*S, H, D], chunk [B, S, H, D] (each with its [H, D] values contiguous), slot [B] integer,
    mask [B] bool: write_chunks_reference's contract, checked by the caller; chunk in the buffer's dtype."""
    B, S, H, D = chunk.shape
    _write_kernel[(B, S)](buffer, chunk, slot.contiguous(), mask.contiguous().view(torch.uint8), buffer.stride(0),
                          buffer.stride(1), chunk.stride(0), chunk.stride(1), buffer.shape[1] // S, S, ROW=H * D,
                          BLOCK=min(BLOCK, triton.next_power_of_2(H * D)))
