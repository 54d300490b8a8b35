"""Layers shared by the CNN families: dimension-generic conv, PyTorch-style BatchNorm, pooling.

Every helper works on channels-last arrays with any number of spatial axes,
``(batch, *spatial, channels)``, so the same VGG/ResNet code runs on images
(``spatial_dims=2``) and on sequences such as MNIST-1D (``spatial_dims=1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxnets.ops.conv import Conv
from jaxnets.ops.norm import batch_norm_train
from jaxnets.ops.pool import max_pool as ops_max_pool

SPATIAL_DIMS = (1, 2)

# torchvision initialises every conv with kaiming_normal_(mode="fan_out", nonlinearity="relu"):
# an untruncated normal with variance 2 / (out_channels * kernel_volume).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be one of {SPATIAL_DIMS}, got {spatial_dims!r}")


def check_input(x: Any, spatial_dims: int, min_size: int = 1, name: str = "x") -> None:
    """Raise a clear error unless ``x`` is a float array of shape ``(batch, *spatial, channels)``.

    ``min_size`` is the smallest spatial extent the network can reduce without an empty map.
    """
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    layout = (
        "(batch, length, channels)" if spatial_dims == 1 else "(batch, height, width, channels)"
    )
    if len(shape) != spatial_dims + 2:
        raise ValueError(
            f"{name} must have rank {spatial_dims + 2} {layout} for spatial_dims={spatial_dims}, "
            f"got shape {tuple(shape)}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating array (e.g. float32 images scaled to [0, 1]), got dtype "
            f"{dtype}; convert with x.astype(jnp.float32)"
        )
    spatial = tuple(shape[1:-1])
    if any(s < min_size for s in spatial):
        raise ValueError(
            f"{name} spatial size {spatial} is too small: this network halves the map "
            f"{int(math.log2(min_size))} times and needs every spatial axis >= {min_size}"
        )


def conv(
    features: int,
    kernel: int = 3,
    stride: int = 1,
    padding: int = 1,
    *,
    spatial_dims: int = 2,
    use_bias: bool = False,
    dtype: Any = None,
    activation: str | None = None,
    name: str | None = None,
) -> Conv:
    """A ``kernel^d`` convolution with PyTorch's symmetric zero padding (``torch.nn.ConvNd``).

    y[b, p, o] = sum_{k, i} x[b, stride * p + k - padding, i] * w[k, i, o] (+ bias[o]), so
    ``(batch, *spatial, in)`` -> ``(batch, *out, features)`` with
    ``out = floor((n + 2 * padding - kernel) / stride) + 1`` per axis. The kernel is stored as
    ``(*kernel, in, out)`` (HWIO in 2D); weights start from torchvision's Kaiming fan-out normal.
    ``jaxnets.ops.conv.Conv``: ``flax.linen.Conv``'s parameters, with the kernel gradient as
    chunked matrix products on CPU (faster there; same values). ``activation="relu"`` applies
    the ReLU inside the convolution call where oneDNN runs it.
    """
    d = spatial_dims
    return Conv(
        features,
        kernel_size=(kernel,) * d,
        strides=(stride,) * d,
        padding=((padding, padding),) * d,
        use_bias=use_bias,
        kernel_init=conv_init,
        dtype=dtype,
        activation=activation,
        name=name,
    )


class BatchNorm(nn.Module):
    """Batch normalisation with PyTorch's semantics (``torch.nn.BatchNormNd``, eps 1e-5, momentum 0.1).

    y = (x - mu) / sqrt(sigma^2 + eps) * scale + bias, per channel (the last axis).

    - ``train=True``: mu, sigma^2 are the batch mean and *biased* variance over every axis but
      the last, and the running statistics move as
      ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* batch
      variance (n / (n - 1) * sigma^2), exactly as PyTorch does. (Flax's ``nn.BatchNorm`` uses
      the biased variance for the running average; PyTorch-trained running statistics would
      then drift apart, so this layer exists.) ``momentum=0.1`` here is Flax's ``0.9``.
    - ``train=False``: mu, sigma^2 are the running statistics.

    Variables: params ``scale`` (init 1; ``zero_init`` makes it 0) and ``bias`` (init 0);
    batch_stats ``mean`` (init 0) and ``var`` (init 1). Shapes: ``(..., C)`` -> ``(..., C)``.
    Statistics are computed in float32 (float64 for float64 inputs). Under ``jax.jit`` with the
    batch sharded over devices, the means are global (synchronised BatchNorm for free).
    In training mode the batch's (mean, biased variance, count) are sown into the
    ``batch_moments`` collection when it is mutable (`jaxnets.train.recalibrate_batch_stats`).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    zero_init: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        channels = x.shape[-1]
        scale = self.param(
            "scale", nn.initializers.zeros if self.zero_init else nn.initializers.ones, (channels,)
        )
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        # Statistics in float32 at least (bfloat16 inputs), float64 when x is float64.
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        shape = (1,) * (x.ndim - 1) + (channels,)  # explicit broadcasting: rank promotion is off
        if train:
            # jaxnets.ops.norm: the statistics as one-pass sums while every channel has
            # |mean| <= 4 std, else the two-pass variance; a closed-form backward pass.
            y, mean, var = batch_norm_train(x32, scale, bias, self.epsilon)
            n = math.prod(x.shape[:-1])
            # For jaxnets.train.recalibrate_batch_stats (a no-op unless the collection is mutable).
            self.sow("batch_moments", "moments", (mean, var, jnp.asarray(n, jnp.float32)))
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                running_mean.value = (1.0 - m) * running_mean.value + m * mean
                running_var.value = (1.0 - m) * running_var.value + m * unbiased
            return y.astype(self.dtype or x.dtype)
        mean, var = running_mean.value, running_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (x32 - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)
        return y.astype(self.dtype or x.dtype)


def max_pool(x: Array, window: int, stride: int, padding: int = 0) -> Array:
    """Max pooling over every spatial axis, padding with -inf like ``torch.nn.MaxPoolNd``
    (``jaxnets.ops.pool.max_pool``: ``nn.max_pool``'s values and gradient, a cheaper
    gradient for non-overlapping windows)."""
    return ops_max_pool(x, window, stride, padding)


def adaptive_avg_pool(
    x: Float[Array, "batch *spatial channels"], output_size: Sequence[int]
) -> Float[Array, "batch *out channels"]:
    """``torch.nn.AdaptiveAvgPoolNd``: average over bins [floor(i n / m), ceil((i + 1) n / m)).

    Bin i of an axis of length n pooled to m covers those input positions; the bins of the
    d axes form a Cartesian product, so averaging one axis at a time is exact. Bins overlap or
    repeat when m > n (a 1x1 map pooled to 7x7 is copied 49 times, as in torchvision's VGG).
    """
    if len(output_size) != x.ndim - 2:
        raise ValueError(
            f"output_size must have one entry per spatial axis ({x.ndim - 2}), got {output_size}"
        )
    for axis, m in enumerate(output_size, start=1):
        n = x.shape[axis]
        if n == m:
            continue
        bins = []
        for i in range(m):
            start, end = (i * n) // m, -((-(i + 1) * n) // m)
            bins.append(jnp.mean(jax.lax.slice_in_dim(x, start, end, axis=axis), axis=axis))
        x = jnp.stack(bins, axis=axis)
    return x


def global_avg_pool(x: Float[Array, "batch *spatial channels"]) -> Float[Array, "batch channels"]:
    """Mean over every spatial axis: ``(batch, *spatial, C)`` -> ``(batch, C)``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
