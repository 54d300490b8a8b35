"""Strict test configuration shared by the whole suite.

- 8 simulated CPU devices, so sharded code paths run on a laptop.
- Implicit rank promotion raises: a broadcast we did not mean is a bug.
- A `key` fixture, so every test draws from an explicit, seeded PRNG key.
- JAX's persistent compilation cache in `.pytest_cache/jax-compile`, shared by the xdist
  workers and the experiments' subprocesses: the suite compiles the same models and steps
  many times over (a quick experiment in-process, then again in its subprocess check), and
  a program compiled once is read back instead of compiled again. The cache key covers
  the program, the flags and the jaxlib version, so an entry is never reused across them;
  `JAXNETS_TEST_COMPILE_CACHE=0` turns it off.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
_CACHE_DIR = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compile"
if os.environ.get("JAXNETS_TEST_COMPILE_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE_DIR))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

_saved = {"hits": 0, "seconds": 0.0}


def _on_duration(event, duration, **_):
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        _saved["hits"] += 1
        _saved["seconds"] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_sessionfinish(session):
    """An xdist worker hands what the cache saved it to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["jax_compile_cache"] = dict(_saved)


def pytest_testnodedown(node, error):
    d = getattr(node, "workeroutput", {}).get("jax_compile_cache")
    if d:
        _saved["hits"] += d["hits"]
        _saved["seconds"] += d["seconds"]


def pytest_terminal_summary(terminalreporter):
    if _saved["hits"]:
        terminalreporter.write_line(
            f"jax compilation cache: {_saved['hits']} programs read back, "
            f"{_saved['seconds']:.0f} s of compiling saved (subprocesses not counted)"
        )


@pytest.fixture
def key():
    return jax.random.key(0)
