"""The CPU-checkable parts of benchmarks/long_context.py: length parsing (benchmarks/common.py); the dense
baseline's KV cache is tested in test_dense.py."""

from benchmarks.common import parse_length


def test_parse_length():
    assert [parse_length(x) for x in ("64k", "1m", "16M", "4096", "0.5k")] == [65536, 2**20, 2**24, 4096, 512]
