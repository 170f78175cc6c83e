"""Benchmark, soak test and the server harness they share with tests/test_process.py (see bench/README.md)."""
