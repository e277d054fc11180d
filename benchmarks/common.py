"""Shared basics of the benchmarks: their error type, the parsing of lengths and depths, the command line."""

from __future__ import annotations

import sys


class BenchmarkError(ValueError):
    """Bad benchmark input: an unknown task, a bad option, a checkpoint that does not load."""


def parse_length(text: str) -> int:
    """'64k' -> 65536, '1m' -> 1048576, '4096' -> 4096."""
    text = text.strip().lower()
    scale = {"k": 2**10, "m": 2**20, "g": 2**30}.get(text[-1:], 1)
    return int(float(text.rstrip("kmg")) * scale)


def parse_counts(text: str, what: str, example: str) -> list[int]:
    """'4k,64k,1m' -> [4096, 65536, 1048576], in the given order; BenchmarkError 'bad {what} ...: give {example}'
    for an item that is not a count of at least 1."""
    counts = []
    for item in text.split(","):
        try:
            value = parse_length(item)
        except ValueError:
            value = 0
        if value < 1:
            raise BenchmarkError(f"bad {what} {item.strip()!r}: give {example}")
        counts.append(value)
    return counts


def parse_lengths(text: str) -> list[int]:
    """'4k,64k,1m' -> [4096, 65536, 1048576] (sorted, without repeats)."""
    return sorted(set(parse_counts(text, "length", "token counts such as 4096, 4k, 1m or 64m")))


def format_length(n: int) -> str:
    """4096 -> '4K', 2**20 -> '1M', 3000 -> '3000'."""
    if n % 2**20 == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}K" if n % 2**10 == 0 else str(n)


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each a fraction of the haystack in [0, 1]."""
    try:
        depths = sorted({float(x) for x in text.split(",")})
    except ValueError:
        raise BenchmarkError(f"bad depths {text!r}: give fractions such as 0,0.25,0.5,0.75,1") from None
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise BenchmarkError(f"depths must lie in [0, 1], got {text!r}")
    return depths


def command_line(module: str, argv: list[str] | None) -> str:
    """`python -m benchmarks.<module>` with its arguments (sys.argv[1:] when argv is None), for reports."""
    return " ".join([f"python -m benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])
