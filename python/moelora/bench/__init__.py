"""Benchmarks: kernel microbenchmarks (``python -m moelora.bench.kernels``) and workloads."""
