"""Benchmarks for adam_jax; run ``python -m benchmarks.adam_bench --help``."""
