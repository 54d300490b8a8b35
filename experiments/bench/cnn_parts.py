"""What the CNN steps' fused pieces are worth: each one against what it replaced, in one process.

``python -m experiments.bench.cnn_parts [--rounds 30] [--quick]`` times, interleaved (every
candidate once per round, rotating order), the bench's training steps (``experiments.bench.cnn``:
batch 128 of 32x32x3, SGD) with:

- ResNet-20, BatchNorm in training mode as
  ``ops``: ``jaxnets.ops.norm.batch_norm_train`` (one-pass statistics within the bound,
  closed-form backward pass; what the models run),
  ``two_pass_vjp``: the closed-form backward pass with the two-pass variance always,
  ``autodiff``: ``jax.grad`` through the two-pass formula;
- the VGG-style net, each convolution's bias and ReLU as
  ``fused``: inside the oneDNN call (``jaxnets.ops.conv.conv_bias``; what the models run),
  ``separate``: ``relu(conv(x, w) + b)`` as three operations.

The variants are swapped in where the models look the function up at trace time
(``jaxnets.models.common.batch_norm_train``, ``jaxnets.ops.conv.conv_bias``), so each
candidate is the same model, parameters and data. Prints median ms per step (min-max) and
each variant's time over the models' default.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

import jaxnets.models.common as models_common
import jaxnets.ops.conv as ops_conv
import jaxnets.ops.norm as ops_norm
from experiments.bench import cnn, timing


def _bshape(x):
    return (1,) * (x.ndim - 1) + (x.shape[-1],)


def bn_autodiff(x, scale, bias, epsilon=1e-5):
    """The two-pass formula, differentiated by JAX."""
    axes, b = tuple(range(x.ndim - 1)), _bshape(x)
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean.reshape(b)), axis=axes)
    y = (x - mean.reshape(b)) * (jax.lax.rsqrt(var + epsilon) * scale).reshape(b) + bias.reshape(b)
    return y, mean, var


def bn_two_pass_vjp(x, scale, bias, epsilon=1e-5):
    """The closed-form backward pass with the two-pass variance always."""
    return ops_norm.batch_norm_train(x, scale, bias, epsilon, two_pass=True)


def conv_bias_separate(x, kernel, bias, strides=1, padding=0, impl="auto", relu=False):
    y = ops_conv.conv(x, kernel, strides, padding, impl)
    y = y + bias.reshape(_bshape(y))
    return jax.nn.relu(y) if relu else y


@contextlib.contextmanager
def _swapped(module, name: str, value) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _traced(make: Callable[[], Callable[[], None]]) -> Callable[[], None]:
    """Builds a step and runs it once, so it is traced (and compiled) now."""
    step = make()
    step()
    return step


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (a smoke test)")
    args = ap.parse_args(argv)
    shape = cnn.QUICK if args.quick else cnn.Shape()
    rounds = 2 if args.quick else args.rounds
    groups: dict[str, dict[str, Callable[[], None]]] = {"resnet20": {}, "vgg": {}}
    groups["resnet20"]["ops"] = _traced(lambda: cnn.jaxnets_step("resnet20", shape))
    for name, fn in (("two_pass_vjp", bn_two_pass_vjp), ("autodiff", bn_autodiff)):
        with _swapped(models_common, "batch_norm_train", fn):
            groups["resnet20"][name] = _traced(lambda: cnn.jaxnets_step("resnet20", shape))
    groups["vgg"]["fused"] = _traced(lambda: cnn.jaxnets_step("vgg", shape))
    with _swapped(ops_conv, "conv_bias", conv_bias_separate):
        groups["vgg"]["separate"] = _traced(lambda: cnn.jaxnets_step("vgg", shape))
    results = {}
    for workload, steps in groups.items():
        times = timing.interleaved(steps, rounds)
        base = statistics.median(times[next(iter(steps))])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(
                f"{workload} {name}: {med * 1e3:.1f} ms ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}),"
                f" {med / base:.3f}x the default"
            )
        results[workload] = times
    return results


if __name__ == "__main__":
    main()
