"""Benchmarks: `python -m bench` measures speed and memory against baselines from the same run."""
