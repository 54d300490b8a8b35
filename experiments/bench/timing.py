"""Interleaved timing: every implementation runs once per round, in a rotating order.

On a shared, noisy machine the load changes from second to second; timing the candidates
one after the other in the same process, round after round, exposes them to the same load,
so their ratio is far more stable than either time alone. We report medians over rounds and
the min-max spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each ``steps[name]()`` (each call must block until its work is done).

    ``warmup`` untimed calls each first (compilation, caches), then ``rounds`` rounds; round r
    starts at candidate ``r mod n`` so no candidate always runs right after the same other one.
    ``clock`` is wall time by default; ``time.process_time`` (CPU seconds of this process)
    is steadier on a loaded machine when every candidate runs single-threaded.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = clock()
            steps[name]()
            times[name].append(clock() - t0)
    return times


def summary(times: Mapping[str, list[float]], base: str = "jaxnets") -> dict[str, dict]:
    """Median, min and max per candidate, and each reference's time over ``base``'s.

    ``ratio`` = median(reference) / median(base): above 1 means ``base`` is faster.
    ``ratio_range`` is the min-max of the per-round ratios (round r of both).
    """
    out: dict[str, dict] = {}
    for name, ts in times.items():
        out[name] = {
            "median": statistics.median(ts),
            "min": min(ts),
            "max": max(ts),
            "n": len(ts),
        }
    if base in times:
        for name, ts in times.items():
            if name == base:
                continue
            per_round = [t / b for t, b in zip(ts, times[base], strict=True)]
            out[name]["ratio"] = out[name]["median"] / out[base]["median"]
            out[name]["ratio_range"] = [min(per_round), max(per_round)]
    return out
