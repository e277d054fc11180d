"""Kernel benchmark: `python -m benchmarks.kernels` (see __main__.py); harness.py times and reports, one file
per op (aggregate.py, retrieve.py) builds its inputs, sections and checks."""
