"""Max pooling with a cheap gradient for non-overlapping windows.

``max_pool(x, window, stride, padding)`` equals ``flax.linen.max_pool`` (XLA's
``reduce_window`` with -inf padding, PyTorch's ``MaxPoolNd``) in value and gradient. XLA
differentiates ``reduce_window`` with ``select_and_scatter``, which on the CPU backend cost
177 ms for one 2x2 pool of a (128, 32, 32, 64) map on one core of the benchmark machine
(70x its forward pass) and allocated 200 MB of temporaries.

When the windows tile the input (window == stride, no padding, every spatial size a
multiple of the window; VGG's 2x2 pools) the forward pass here is a reshape and a max, and
the backward pass one elementwise pass: the cotangent of each output goes to the *first*
maximal element of its window (row-major order), exactly where ``select_and_scatter``
(and PyTorch) put it, also when the window has ties (zeros after a ReLU). Other
configurations use ``flax.linen.max_pool``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["max_pool"]


def _split(x: Array, window: tuple[int, ...]) -> Array:
    """``(b, *spatial, c)`` -> ``(b, o1, k1, o2, k2, ..., c)`` with o_i = n_i / k_i."""
    shape = [x.shape[0]]
    for n, k in zip(x.shape[1:-1], window, strict=True):
        shape += [n // k, k]
    return x.reshape(shape + [x.shape[-1]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: Array, window: tuple[int, ...]) -> Array:
    return jnp.max(_split(x, window), axis=tuple(range(2, 2 * len(window) + 1, 2)))


def _tiled_max_fwd(x, window):
    y = _tiled_max(x, window)
    return y, (x, y)


def _tiled_max_bwd(window, saved, g):
    x, y = saved
    d = len(window)
    xs = _split(x, window)
    win_axes = tuple(range(2, 2 * d + 1, 2))
    y_b = jnp.expand_dims(y, win_axes)
    g_b = jnp.expand_dims(g, win_axes)
    taken = jnp.zeros(y_b.shape, bool)
    pieces = {}
    # walk the window in row-major order; an element wins if it is maximal and none before it was
    for off in itertools.product(*(range(k) for k in window)):
        idx = [slice(None)] * xs.ndim
        for axis, o in zip(win_axes, off, strict=True):
            idx[axis] = slice(o, o + 1)
        hit = (xs[tuple(idx)] == y_b) & ~taken
        taken = taken | hit
        pieces[off] = jnp.where(hit, g_b, jnp.zeros_like(g_b))

    def assemble(level: int, prefix: tuple[int, ...]) -> Array:
        if level == d:
            return pieces[prefix]
        parts = [assemble(level + 1, prefix + (o,)) for o in range(window[level])]
        return jnp.concatenate(parts, axis=win_axes[level])

    return (assemble(0, ()).reshape(x.shape),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def max_pool(
    x: Float[Array, "batch *spatial channels"],
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int = 0,
) -> Float[Array, "batch *out channels"]:
    """Max over ``window`` every ``stride`` steps on each spatial axis (``-inf`` padding).

    ``(batch, *spatial, C)`` -> ``(batch, *out, C)``, ``out = floor((n + 2 p - k) / s) + 1``.
    ``stride`` defaults to the window. Same values and gradient as ``flax.linen.max_pool``.
    """
    d = x.ndim - 2
    window = (window,) * d if isinstance(window, int) else tuple(window)
    stride = window if stride is None else stride
    stride = (stride,) * d if isinstance(stride, int) else tuple(stride)
    tiled = (
        padding == 0
        and window == stride
        and all(n % k == 0 for n, k in zip(x.shape[1:-1], window, strict=True))
    )
    if tiled:
        return _tiled_max(x, window)
    return nn.max_pool(x, window, strides=stride, padding=((padding, padding),) * d)
