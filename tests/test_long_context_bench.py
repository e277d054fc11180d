"""The CPU-checkable parts of benchmarks/long_context.py: length parsing (benchmarks/common.py) and the dense
baseline's KV cache."""

import torch

from benchmarks.common import parse_length
from benchmarks.long_context import DenseModel
from ramba import HSAHybridConfig


def test_parse_length():
    assert [parse_length(x) for x in ("64k", "1m", "16M", "4096", "0.5k")] == [65536, 2**20, 2**24, 4096, 512]


def test_dense_baseline_cache_equals_full_pass():
    torch.manual_seed(0)
    config = HSAHybridConfig.preset("tiny", d_model=64, num_heads=2, head_dim=32, intermediate_size=96)
    model = DenseModel(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (1, 50))
    with torch.no_grad():
        full = model(ids, [[] for _ in model.blocks], 50)
        caches = [[] for _ in model.blocks]
        pieces = [model(ids[:, a:b], caches, b - a) for a, b in ((0, 20), (20, 21), (21, 50))]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-10)
