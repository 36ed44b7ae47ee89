"""Benchmarks: one module per measurement, run from the repository root as ``python -m benchmarks.<name>``; each
writes its result, headed by :func:`benchmarks.report.header`, into ``benchmarks/results/``."""
