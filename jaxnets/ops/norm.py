"""Training-mode batch normalisation with a closed-form backward pass.

``batch_norm_train(x, scale, bias, epsilon)`` returns ``(y, mean, var)``: the batch mean
and biased variance over every axis but the last (two passes, so no catastrophic
cancellation), and y = (x - mean) / sqrt(var + epsilon) * scale + bias. It equals
``jax.grad`` through that formula (the reference in the tests), but its backward pass is
the textbook one: with x_hat = (x - mean) * r, r = 1 / sqrt(var + epsilon), n the number of
reduced elements,

    d_bias  = sum(dy)
    d_scale = sum(dy * x_hat)
    dx      = r * scale * (dy - d_bias / n - x_hat * d_scale / n)
              + d_mean / n + d_var * 2 (x - mean) / n

two reductions that read (dy, x) once and one elementwise pass, where autodiff through the
two-pass variance builds more of both. The last line carries cotangents of the returned
statistics (zero in a training step, which only stores them). Statistics and arithmetic are
in float32 at least (float64 for float64 input); y has x's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["batch_norm_train"]


def _check(x, scale, bias):
    if x.ndim < 2:
        raise ValueError(
            f"batch_norm_train: x must have a batch and a channel axis, got shape {x.shape}"
        )
    c = x.shape[-1]
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (c,):
            raise ValueError(
                f"batch_norm_train: {name} must have shape ({c},) (x's last axis), got {v.shape}"
            )


def _stats(x32: Array) -> tuple[Array, Array, Array]:
    axes = tuple(range(x32.ndim - 1))
    bshape = (1,) * (x32.ndim - 1) + (x32.shape[-1],)
    mean = jnp.mean(x32, axis=axes)
    centred = x32 - mean.reshape(bshape)
    var = jnp.mean(jnp.square(centred), axis=axes)
    return mean, var, centred


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x, scale, bias, epsilon):
    return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_fwd(x, scale, bias, epsilon):
    ct = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(ct)
    mean, var, centred = _stats(x32)
    r = jax.lax.rsqrt(var + epsilon)
    bshape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    g = (r * scale.astype(ct)).reshape(bshape)
    y = (centred * g + bias.astype(ct).reshape(bshape)).astype(x.dtype)
    return (y, mean, var), (x, mean, r, scale, bias)


def _bn_bwd(epsilon, saved, cts):
    del epsilon
    x, mean, r, scale, bias = saved
    dy, dmean, dvar = cts
    ct = mean.dtype
    axes = tuple(range(x.ndim - 1))
    bshape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    n = x.size // x.shape[-1]
    centred = x.astype(ct) - mean.reshape(bshape)
    dy32 = dy.astype(ct)
    dbias = jnp.sum(dy32, axis=axes)
    # sum(dy * x_hat) = r * sum(dy * (x - mean))
    dscale = jnp.sum(dy32 * centred, axis=axes) * r
    s = r * scale.astype(ct)
    a = s.reshape(bshape)
    # x_hat * d_scale / n = centred * (r * d_scale / n)
    k = (r * dscale / n).reshape(bshape)
    c0 = (-s * dbias / n + dmean / n).reshape(bshape)
    c1 = (2.0 / n) * dvar.reshape(bshape)
    dx = a * (dy32 - centred * k) + c0 + c1 * centred
    return (
        dx.astype(x.dtype),
        dscale.astype(scale.dtype),
        dbias.astype(bias.dtype),
    )


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(
    x: Float[Array, "*batch channels"],
    scale: Float[Array, " channels"],
    bias: Float[Array, " channels"],
    epsilon: float = 1e-5,
) -> tuple[Float[Array, "*batch channels"], Float[Array, " channels"], Float[Array, " channels"]]:
    """``(y, batch mean, biased batch variance)`` of training-mode BatchNorm (module docstring)."""
    x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
    _check(x, scale, bias)
    return _bn(x, scale, bias, float(epsilon))
