"""Benchmarks: jaxnets against PyTorch and Flax, timed side by side (``python -m experiments.bench``)."""
