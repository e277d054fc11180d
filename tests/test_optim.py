"""ramba.training.optim: the schedule, and one training step against a hand-written AdamW step."""

import copy
import math

import pytest
import torch

from ramba import HSAHybrid
from ramba.training.optim import build_optimizer, build_scheduler, lr_lambda, train_step
from test_model import small_config


def test_warmup_then_cosine_or_constant():
    cosine = lr_lambda(4, 24, 0.1)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(24) == pytest.approx(0.1) and cosine(100) == pytest.approx(0.1)
    constant = lr_lambda(4, 24, 1.0)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_a_time_budget_decays_the_schedule_but_keeps_the_warmup_in_steps():
    """With a time budget further along than the steps, the cosine follows the time share, and the first steps
    still warm up linearly (a run of many steps and few minutes does not start at full rate)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    share = [0.5]
    scheduler = build_scheduler(optimizer, 4, 1000, 0.1, time_used=lambda: share[0])
    half = lr_lambda(4, 1000, 0.1)(500)
    got = [scheduler.get_last_lr()[0]]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        got.append(scheduler.get_last_lr()[0])
    assert got == pytest.approx([0.25 * half, 0.5 * half, 0.75 * half, half, half, half])
    share[0] = 0.0  # time behind the steps: the plain step schedule
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(lr_lambda(4, 1000, 0.1)(6))


@pytest.mark.parametrize("clip", [None, 0.01])
def test_a_step_equals_a_hand_written_adamw_step(clip):
    """Two steps: gradients of the mean loss, their norm clipped, then AdamW (decay on matrices only) by hand."""
    torch.manual_seed(0)
    model = HSAHybrid(small_config()).double()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = {n: torch.zeros_like(p) for n, p in reference.items()}
    second = {n: torch.zeros_like(p) for n, p in reference.items()}
    lr, decay, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-8
    optimizer = build_optimizer(model, lr, decay, (b1, b2))
    scheduler = build_scheduler(optimizer, 2, 10, 0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 3):
        ids = torch.randint(0, 50, (2, 40), generator=g)
        shadow = copy.deepcopy(model)
        for n, p in shadow.named_parameters():
            p.data.copy_(reference[n])
        shadow(ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in shadow.named_parameters()}
        if clip is not None:
            norm = torch.sqrt(sum(gr.pow(2).sum() for gr in grads.values()))
            grads = {n: gr * min(1.0, clip / (float(norm) + 1e-6)) for n, gr in grads.items()}
        rate = lr * lr_lambda(2, 10, 0.1)(step - 1)
        for n, gr in grads.items():
            p = reference[n]
            if p.dim() >= 2:
                p.mul_(1 - rate * decay)
            first[n] = b1 * first[n] + (1 - b1) * gr
            second[n] = b2 * second[n] + (1 - b2) * gr * gr
            update = (first[n] / (1 - b1**step)) / ((second[n] / (1 - b2**step)).sqrt() + eps)
            p.sub_(rate * update)
        loss = train_step(model, optimizer, {"input_ids": ids, "labels": ids}, scheduler, clip=clip)
        assert not loss.requires_grad and loss > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n], rtol=1e-6, atol=1e-9, msg=n)
        assert p.grad is None, n
    assert scheduler.get_last_lr()[0] == pytest.approx(lr * lr_lambda(2, 10, 0.1)(2))
