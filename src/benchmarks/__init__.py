"""Benchmarks behind src/benchmark.py (not part of the installed `deit` package)."""
