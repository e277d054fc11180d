"""Writing whole chunks into a chunk memory buffer at one slot per row, in place and without a device sync: what
a decoding step does when rows complete a chunk. `write_chunks_reference` in PyTorch; on the GPU the Triton
kernel of store_fused.py, which also writes a buffer kept in pinned CPU memory (an offloaded cache) in place.
"""

from __future__ import annotations

import torch

from ..backends import pick


def _check(buffer: torch.Tensor, chunk: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> None:
    if buffer.dim() != 4 or chunk.dim() != 4 or chunk.shape[0] != buffer.shape[0] or \
            chunk.shape[2:] != buffer.shape[2:] or chunk.shape[1] == 0 or buffer.shape[1] % chunk.shape[1]:
        raise ValueError(f"write_chunks: buffer must be [B, C*S, H, D] and chunk [B, S, H, D] with S >= 1 dividing "
                         f"the buffer's length, got {tuple(buffer.shape)} and {tuple(chunk.shape)}")
    if buffer.shape[1] == 0:
        raise ValueError("write_chunks: the buffer holds no slot (C = 0): reserve room for at least one chunk")
    B = buffer.shape[0]
    if slot.shape != (B,) or mask.shape != (B,) or mask.dtype != torch.bool or slot.is_floating_point():
        raise ValueError(f"write_chunks: slot must be an integer [B={B}] tensor and mask a bool [B] tensor, got "
                         f"{slot.dtype} {tuple(slot.shape)} and {mask.dtype} {tuple(mask.shape)}")


def write_chunks_reference(buffer: torch.Tensor, chunk: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> None:
    """buffer [B, C*S, H, D] (chunk c of row b: tokens c*S to c*S+S-1); chunk [B, S, H, D]; slot [B] integer;
    mask [B] bool. Writes chunk[b] (cast to the buffer's dtype) at slot min(max(slot[b], 0), C - 1) of row b for
    every row in the mask; other rows and slots keep what they hold."""
    _check(buffer, chunk, slot, mask)
    B, S = chunk.shape[:2]
    chunks = buffer.view(B, buffer.shape[1] // S, S, *buffer.shape[2:])
    rows = torch.arange(B, device=buffer.device)
    at = slot.to(buffer.device).clamp(0, chunks.shape[1] - 1)
    old = chunks[rows, at]
    keep = mask.to(buffer.device)[:, None, None, None]
    chunks[rows, at] = torch.where(keep, chunk.to(buffer.device, buffer.dtype), old)


def _rows_contiguous(x: torch.Tensor) -> bool:
    """Each token's [H, D] values contiguous (the kernel copies them as one run)."""
    return x.stride(3) == 1 and x.stride(2) == x.shape[3]


def write_chunks(buffer: torch.Tensor, chunk: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor,
                 backend: str = "auto") -> None:
    """write_chunks_reference's contract (in place, no device sync). chunk, slot and mask on one device; the
    buffer there too, or in pinned CPU memory when they are on the GPU (written by the Triton kernel in place).
    backend: "auto" (Triton for CUDA chunks, else PyTorch), "triton" or "torch"."""
    _check(buffer, chunk, slot, mask)
    host = chunk.device.type == "cuda" and buffer.device.type == "cpu"
    if host and not buffer.is_pinned():
        raise ValueError("write_chunks: a CPU buffer written from the GPU must be pinned (pin_memory=True)")
    if pick("ops", backend, chunk.device) != "triton":
        if host:
            raise RuntimeError("write_chunks: a buffer in CPU memory written from the GPU takes the Triton backend: "
                               "pass backend='auto' or 'triton'")
        write_chunks_reference(buffer, chunk, slot, mask)
        return
    if not _rows_contiguous(buffer):
        raise ValueError("write_chunks: the buffer's last two dims must be contiguous for the Triton backend")
    from .store_fused import write_chunks_triton

    chunk = chunk.to(buffer.dtype)  # torch's rounding (the kernel copies)
    write_chunks_triton(buffer, chunk if _rows_contiguous(chunk) else chunk.contiguous(), slot, mask)
