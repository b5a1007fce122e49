"""Benchmarks for fastpull (run from the repository root: ``python -m benchmarks.bench_pull``)."""
