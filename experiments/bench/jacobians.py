"""Per-step Jacobians, explicit BPTT and lag curves against one ``jax.grad`` (tanh RNN, LSTM).

Shape: batch B = 16, T = 200 steps, 32 input features, H = 256 units (the H and T of the recurrent benchmarks;
B = 16 keeps the dense LSTM Jacobians, B T (2H)^2 floats = 3.4 GB, inside a laptop's
memory). Loss: many-to-one, ``sum(outputs[:, -1] ** 2)``. Every candidate is one jitted
call, blocking, timed interleaved with the others (`experiments.bench.timing`) after a
warm-up call that compiles it:

- ``grad``: ``jax.grad`` of the loss through ``layer.apply`` (the layer's default
  ``impl="fused"``), the baseline; ``grad_scan``: the same with ``impl="scan"`` (plain
  ``lax.scan`` autodiff, what the Jacobian code differentiates).
- ``jacobians_dense``: `jaxnets.bptt.step_jacobians`, all T per-step Jacobians as one dense
  (B, T, N, N) array (N = H, or 2H for the LSTM's (h, c)).
- ``jacobians_factored``: `jaxnets.bptt.factored_jacobians`, the same Jacobians exactly, as
  per-step gate vectors and W_hh (O(T G N) memory).
- ``explicit_dense`` / ``explicit_factored``: `jaxnets.bptt.explicit_bptt` (parameter
  gradient by J_k^T recursion and per-step VJPs, ``per_step=False``) with either form.
- ``lag_curve``: `jaxnets.bptt.state_gradients` + `jaxnets.bptt.lag_curve`, the
  gradient-norm-versus-lag curve.

Compile time (``jit(...).lower(...).compile()``, nothing run) of grad, dense Jacobians,
explicit BPTT and the lag curve at T = 10 and T = 1000: time is a ``lax.scan``, so it should
not grow with T.

``python -m experiments.bench.jacobians [--quick]`` prints a markdown table; ``measure()``
returns the numbers. Targets: all per-step Jacobians <= 3x one gradient (5x at most), the
lag curve <= 1.5x, compile time flat in T.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp

from experiments.bench import timing
from jaxnets import bptt
from jaxnets import rnn as jrnn

__all__ = ["Shape", "QUICK", "measure", "markdown", "candidates", "compile_times", "main"]


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 16
    time: int = 200
    features: int = 32
    hidden: int = 256


QUICK = Shape(batch=4, time=20, features=4, hidden=16)
CELLS = {"rnn": jrnn.RNN, "lstm": jrnn.LSTM}


def loss_fn(outputs, final_state):
    """Many-to-one: the last step's output."""
    return jnp.sum(outputs[:, -1] ** 2)


def candidates(cell: str, shape: Shape) -> dict:
    """Blocking closures, one per timed computation."""
    x = jax.random.normal(jax.random.key(0), (shape.batch, shape.time, shape.features))
    layer = CELLS[cell](shape.hidden)
    variables = layer.init(jax.random.key(1), x)
    scan_layer = CELLS[cell](shape.hidden, impl="scan")

    def grad_of(lay):
        return jax.jit(jax.grad(lambda v, x: loss_fn(*lay.apply(v, x))))

    fns = {
        "grad": grad_of(layer),
        "grad_scan": grad_of(scan_layer),
        "jacobians_dense": jax.jit(lambda v, x: bptt.step_jacobians(layer, v, x)),
        "jacobians_factored": jax.jit(lambda v, x: bptt.factored_jacobians(layer, v, x)),
        "explicit_dense": jax.jit(
            lambda v, x: (
                bptt.explicit_bptt(
                    layer, v, x, loss_fn, jacobian_method="structured", per_step=False
                ).grads
            )
        ),
        "explicit_factored": jax.jit(
            lambda v, x: (
                bptt.explicit_bptt(
                    layer, v, x, loss_fn, jacobian_method="factored", per_step=False
                ).grads
            )
        ),
        "lag_curve": jax.jit(
            lambda v, x: bptt.lag_curve(bptt.state_gradients(layer, v, x, loss_fn).state_grads)
        ),
    }
    return {name: (lambda f=f: jax.block_until_ready(f(variables, x))) for name, f in fns.items()}


def compile_times(cell: str, shape: Shape, lengths=(10, 1000)) -> dict:
    """Seconds to lower and compile each computation at each sequence length."""
    layer = CELLS[cell](shape.hidden)
    out: dict = {}
    for T in lengths:
        x = jax.ShapeDtypeStruct((shape.batch, T, shape.features), jnp.float32)
        v = jax.eval_shape(layer.init, jax.random.key(1), x)
        fns = {
            "grad": jax.grad(lambda v, x: loss_fn(*layer.apply(v, x))),
            "jacobians_dense": lambda v, x: bptt.step_jacobians(layer, v, x),
            "explicit_factored": lambda v, x: (
                bptt.explicit_bptt(
                    layer, v, x, loss_fn, jacobian_method="factored", per_step=False
                ).grads
            ),
            "lag_curve": lambda v, x: bptt.lag_curve(
                bptt.state_gradients(layer, v, x, loss_fn).state_grads
            ),
        }
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.jit(f).lower(v, x).compile()
            out.setdefault(name, {})[f"T{T}"] = time.perf_counter() - t0
    return out


def measure(quick: bool = False, rounds: int | None = None) -> dict:
    """All timings: ``{"shape", "load_before", "load_after", "rnn": {...}, "lstm": {...},
    "compile": {...}}``; per cell, each candidate's median/min/max seconds and its ratio to
    ``grad`` (with the min-max of the per-round ratios)."""
    shape = QUICK if quick else Shape()
    rounds = rounds or (2 if quick else 5)
    out: dict = {
        "shape": dataclasses.asdict(shape),
        "rounds": rounds,
        "load_before": os.getloadavg()[0],
        "device": str(jax.devices()[0]),
    }
    for cell in CELLS:
        times = timing.interleaved(candidates(cell, shape), rounds=rounds)
        out[cell] = timing.summary(times, base="grad")
    lengths = (10, 40) if quick else (10, 1000)
    out["compile"] = {cell: compile_times(cell, shape, lengths) for cell in CELLS}
    out["load_after"] = os.getloadavg()[0]
    return out


def markdown(res: dict) -> str:
    s = res["shape"]
    lines = [
        f"B={s['batch']}, T={s['time']}, I={s['features']}, H={s['hidden']}, float32, "
        f"{res['device']}; {res['rounds']} interleaved rounds; 1-min load average "
        f"{res['load_before']:.1f} before, {res['load_after']:.1f} after.",
        "",
        "| cell | computation | median s | min-max s | x grad (per-round range) |",
        "|---|---|---|---|---|",
    ]
    for cell in CELLS:
        for name, r in res[cell].items():
            ratio = (
                "1"
                if name == "grad"
                else (f"{r['ratio']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})")
            )
            lines.append(
                f"| {cell} | {name} | {r['median']:.4f} | {r['min']:.4f}-{r['max']:.4f} | {ratio} |"
            )
    lines += [
        "",
        "Compile time (s):",
        "",
        "| cell | computation | "
        + " | ".join(next(iter(next(iter(res["compile"].values())).values())))
        + " |",
        "|---|---|" + "---|" * len(next(iter(next(iter(res["compile"].values())).values()))),
    ]
    for cell, per in res["compile"].items():
        for name, ts in per.items():
            lines.append(
                f"| {cell} | {name} | " + " | ".join(f"{t:.2f}" for t in ts.values()) + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench.jacobians", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args(argv)
    print(markdown(measure(quick=a.quick, rounds=a.rounds)))


if __name__ == "__main__":
    main()
