"""The optimizer, the learning-rate schedule and one plain training step, shared by the recipes' trainer and
short studies (benchmarks.learnability, benchmarks.training)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to min_ratio at step `total` (min_ratio=1: constant after warmup)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: no weight decay on norms, biases and parameters marked
    _no_weight_decay."""
    decay, plain = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (plain if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over param_groups(model, weight_decay); fused=True takes PyTorch's fused CUDA implementation."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float,
                    time_used: Callable[[], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of lr_lambda, stepped once per optimizer step. With `time_used` (the share of a time
    budget spent, 0 to 1) the decay follows whichever budget is further along: step or share x total; the
    warmup still counts optimizer steps, so that a large step budget with a short time budget does not skip it."""
    f = lr_lambda(warmup, total, min_ratio)
    if time_used is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)

    def budgeted(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup))
        return warm * f(max(step, int(time_used() * total), warmup))  # f is 1 at the warmup's end, then decays
    return torch.optim.lr_scheduler.LambdaLR(optimizer, budgeted)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, clip: float | None = None,
               autocast: torch.dtype | None = None,
               loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
               ) -> torch.Tensor:
    """One optimizer step on one batch: `model(**batch).loss`, or `loss_fn(model, batch)` when given (under
    autocast to that dtype on the batch's device when given), backward, gradient norm clipped to `clip` when
    given, optimizer and scheduler steps, gradients zeroed. Returns the loss, detached."""
    device = next(iter(batch.values())).device
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
