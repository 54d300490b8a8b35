"""Strict test configuration shared by the whole suite.

- 8 simulated CPU devices, so sharded code paths run on a laptop.
- Implicit rank promotion raises: a broadcast we did not mean is a bug.
- A `key` fixture, so every test draws from an explicit, seeded PRNG key.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
