"""Peak memory of a T = 10,000 LSTM training step, with and without rematerialisation.

For each implementation (``impl="fused"``, the default custom VJP, and ``impl="scan"``,
``jax.grad`` through ``lax.scan``) and ``remat_chunk`` 0 (keep every step's residuals) or
k (keep the carry every k steps, recompute the rest: ``jax.checkpoint`` on chunks of the scan
for ``"scan"``, chunk recomputation inside the backward for ``"fused"``), a fresh
subprocess compiles and runs one gradient step of ``mean(LSTM(x)^2)`` and reports

- ``xla_temp_bytes``: XLA's buffer assignment for the step
  (``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``), and
- ``peak_rss_bytes``: the process's measured peak resident memory while the step runs
  (Linux: ``VmHWM`` reset after compiling via ``/proc/self/clear_refs``; elsewhere
  ``ru_maxrss``), and ``rss_before_step_bytes`` just before it runs (jax, the inputs and the
  compiled step), so the step's own footprint is the difference.

Run alone: ``python -m experiments.bench.memory [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

FULL = {"time": 10_000, "batch": 32, "features": 32, "hidden": 256, "chunk": 100}
QUICK = {"time": 200, "batch": 4, "features": 3, "hidden": 16, "chunk": 10}
CONFIGS = [("fused", False), ("fused", True), ("scan", False), ("scan", True)]


def child(impl: str, remat: bool, shape: dict) -> dict:
    """One configuration, in this process: compile, measure, run once."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxnets.rnn import LSTM

    layer = LSTM(shape["hidden"], impl=impl, remat_chunk=shape["chunk"] if remat else 0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(
        rng.standard_normal((shape["batch"], shape["time"], shape["features"]), dtype=np.float32)
    )
    params = layer.init(jax.random.key(0), x[:, :2])["params"]

    def loss(p, x):
        out, _ = layer.apply({"params": p}, x)
        return jnp.mean(jnp.square(out))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, x).compile()
    analysis = compiled.memory_analysis()
    # reset the high-water mark so compilation's own peak does not hide the step's
    reset = _reset_peak_rss()
    before = _rss("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value, grads = compiled(params, x)
    jax.block_until_ready(grads)
    peak = _rss("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl,
        "remat_chunk": shape["chunk"] if remat else 0,
        "xla_temp_bytes": int(getattr(analysis, "temp_size_in_bytes", -1)),
        "rss_before_step_bytes": before,
        "peak_rss_bytes": peak,
        "loss": float(value),
        "grad_norm": float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))),
    }


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) in bytes, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(quick: bool = False) -> dict:
    """Every configuration in its own subprocess (peak RSS is per process)."""
    shape = QUICK if quick else FULL
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    runs = []
    for impl, remat in CONFIGS:
        cmd = [sys.executable, "-m", "experiments.bench.memory", "--child", impl, str(int(remat))]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
        if proc.returncode != 0:
            runs.append({"impl": impl, "remat": remat, "error": proc.stderr.strip()[-2000:]})
            continue
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"shape": shape, "runs": runs}


def table(result: dict) -> str:
    """Markdown table of ``measure``'s result."""
    s = result["shape"]
    lines = [
        f"LSTM training step, T = {s['time']}, batch {s['batch']}, I = {s['features']}, "
        f"H = {s['hidden']} (float32):",
        "",
        "| impl | remat_chunk | XLA temp | peak RSS | RSS before step | step's own |",
        "|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['remat']} | failed: {r['error'][-80:]} | | | |")
            continue
        own = r["peak_rss_bytes"] - r["rss_before_step_bytes"]
        lines.append(
            f"| {r['impl']} | {r['remat_chunk']} | {r['xla_temp_bytes'] / mib:.0f} MiB | "
            f"{r['peak_rss_bytes'] / mib:.0f} MiB | {r['rss_before_step_bytes'] / mib:.0f} MiB | "
            f"{own / mib:.0f} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.memory")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "REMAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        impl, remat = args.child
        print(json.dumps(child(impl, bool(int(remat)), QUICK if args.quick else FULL)))
        return
    print(table(measure(quick=args.quick)))


if __name__ == "__main__":
    main()
