"""ramba.probing: the probes find planted structure and nothing in random labels."""

import torch

from ramba.probing import bilinear_probe, linear_probe


def test_linear_probe_recovers_a_planted_label_and_not_a_random_one():
    torch.manual_seed(0)
    x = torch.randn(600, 16)
    planted = (x @ torch.randn(16, 10)).argmax(1)
    assert linear_probe(x, planted, 10) > 0.85
    assert linear_probe(x, torch.randint(0, 10, (600,)), 10) < 0.3  # chance 0.1


def test_bilinear_probe_finds_the_matching_candidate():
    torch.manual_seed(0)
    n, d = 500, 12
    a, b = torch.randn(n, d), torch.randn(n, 4, d)
    labels = torch.randint(0, 4, (n,))
    b[torch.arange(n), labels] = a @ torch.randn(d, d) + 0.1 * torch.randn(n, d)  # the match: a linear map of a
    assert bilinear_probe(a, b, labels) > 0.9
    assert bilinear_probe(a, b, torch.randint(0, 4, (n,))) < 0.45  # chance 0.25
