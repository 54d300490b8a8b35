"""Runnable experiments: `python -m experiments` lists them."""
