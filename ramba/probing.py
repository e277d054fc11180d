"""Probes on frozen features: how much of a label a representation holds linearly, scored on held-out rows.

Each probe is fitted, full batch, on the first HELD_IN of the rows (features standardised with their mean and
deviation) and returns its accuracy on the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HELD_IN = 0.7  # the share of rows the probes are fitted on
RANK = 64  # of the bilinear probe
FIT_STEPS = 1500


def _standardise(x: torch.Tensor, cut: int) -> torch.Tensor:
    dims = tuple(range(x.dim() - 1))
    held_in = x[:cut]
    return (x - held_in.mean(dims)) / (held_in.std(dims) + 1e-5)


def linear_probe(x: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0) -> float:
    """Held-out accuracy of softmax regression from x [N, d] to labels [N] (fitted on the first 70%)."""
    cut = int(len(labels) * HELD_IN)
    x = _standardise(x, cut)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(FIT_STEPS):
        loss = F.cross_entropy(layer(x[:cut]), labels[:cut])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((layer(x[cut:]).argmax(1) == labels[cut:]).float().mean())


def bilinear_probe(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """Held-out accuracy of choosing labels [N] among the candidates b [N, C, db] by (a U) . (b V), a [N, da]."""
    cut = int(len(labels) * HELD_IN)
    a, b = _standardise(a, cut), _standardise(b, cut)
    torch.manual_seed(seed)
    U = (torch.randn(a.shape[1], RANK) / a.shape[1] ** 0.5).requires_grad_()
    V = (torch.randn(b.shape[2], RANK) / b.shape[2] ** 0.5).requires_grad_()
    opt = torch.optim.AdamW([U, V], lr=3e-3, weight_decay=0.05)

    def scores(rows: slice) -> torch.Tensor:
        return torch.einsum("nr,ncr->nc", a[rows] @ U, b[rows] @ V)

    for _ in range(FIT_STEPS):
        loss = F.cross_entropy(scores(slice(0, cut)), labels[:cut])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((scores(slice(cut, None)).argmax(1) == labels[cut:]).float().mean())
