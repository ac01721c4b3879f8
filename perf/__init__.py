"""Benchmark suites for sparse_triton against the dense baselines (see perf/README.md).

Not part of the installed package: run from the repository root with ``PYTHONPATH=.``.
"""
