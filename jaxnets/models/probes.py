"""Measurements on CNNs: receptive fields from gradients, per-layer gradient norms.

Both are read off ``jax.grad`` rather than derived from the architecture, so they check the
claims they are used for (stacked 3x3 = one 5x5; where a plain net's gradient shrinks).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int


def receptive_field(
    fn: Callable[[Array], Array],
    x: Float[Array, "1 *spatial c_in"],
    position: Sequence[int] | None = None,
    channel: int | None = None,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The input region one output unit sees, from the gradient.

    g[p] = sum_c |d u / d x[0, p, c]| with u = y[0, position, channel], or u = sum_k
    y[0, position, k] when ``channel`` is None (one unit behind a ReLU may be switched off at
    this input; all of them almost never are). The receptive field is the support of g (where
    it is non-zero); its extent is the bounding-box size per spatial axis.

    Args:
      fn: ``x -> y`` with ``x`` of shape ``(1, *spatial, c_in)`` and ``y`` of shape
        ``(1, *spatial_out, c_out)`` (e.g. a bound conv stack).
      x: the input at which to differentiate (random inputs avoid ReLU gates that happen to
        be closed everywhere on one path).
      position: output location; default the centre of the output map.
      channel: output channel, or None for the sum over channels.

    Returns:
      (g as a float64 array of shape ``spatial``, extent tuple, e.g. ``(5, 5)``).
    """
    if x.ndim < 3 or x.shape[0] != 1:
        raise ValueError(f"x must have shape (1, *spatial, channels), got {x.shape}")
    y_shape = jax.eval_shape(fn, x).shape
    if position is None:
        position = tuple(s // 2 for s in y_shape[1:-1])
    if len(position) != len(y_shape) - 2:
        raise ValueError(f"position must have {len(y_shape) - 2} entries, got {position}")
    index = (0, *position) if channel is None else (0, *position, channel)
    grad = jax.grad(lambda x: jnp.sum(fn(x)[index]))(x)
    g = np.abs(np.asarray(grad, dtype=np.float64))[0].sum(axis=-1)
    support = np.nonzero(g)
    extent = tuple(int(a.max() - a.min() + 1) if a.size else 0 for a in support)
    return g, extent


def _natural(path: str) -> tuple:
    """Sort key following the forward pass: stem first, stage2 before stage10, conv1 < conv2."""
    key = []
    for part in path.split("/"):
        key.append((0,) if part == "stem" else (1, *(
            int(t) if t.isdigit() else t for t in re.split(r"(\d+)", part)
        )))  # fmt: skip
    return tuple(key)


def conv_kernels(params: Any) -> list[tuple[str, Array]]:
    """``(path, kernel)`` of every conv (kernel rank >= 3) in forward order.

    Shortcut projections are left out: they are not on the plain path.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for keypath, leaf in flat:
        path = "/".join(str(getattr(k, "key", k)) for k in keypath)
        if path.endswith("kernel") and leaf.ndim >= 3 and "shortcut" not in path:
            out.append((path[: -len("/kernel")], leaf))
    return sorted(out, key=lambda item: _natural(item[0]))


def layer_grad_norms(
    model: Any,
    variables: dict,
    x: Float[Array, "batch *spatial c"],
    y: Int[Array, " batch"],
    *,
    train: bool = True,
) -> list[tuple[str, float]]:
    """``||d L / d W_l||_F`` for every conv kernel W_l, in forward order.

    L is the mean softmax cross-entropy of ``model`` on ``(x, y)``; with ``train=True``
    BatchNorm uses batch statistics, as in the first training step.
    """

    def loss(params):
        v = {**variables, "params": params}
        if train:
            logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(v, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.jit(jax.grad(loss))(variables["params"])
    return [(p, float(jnp.linalg.norm(g))) for p, g in conv_kernels(grads)]
