"""Convolution whose weight gradient is a matrix product: fast on CPU, same values.

``conv(x, kernel, strides, padding)`` is ``jax.lax.conv_general_dilated`` with channels-last
input ``(batch, *spatial, in)``, kernel ``(*window, in, out)`` (Flax's layout) and explicit
``(low, high)`` padding per spatial axis, for 1 or 2 spatial axes. Forward pass and input
gradient are XLA's own convolutions. The kernel gradient,

    dW[k, i, o] = sum_{b, p} x_pad[b, stride * p + k, i] * dy[b, p, o],

is where XLA's CPU backend is slow: it runs it as one convolution whose "window" is the
whole feature map, at ~45 GFLOP/s on one core of the benchmark machine against ~120 for the
forward. ``impl="gemm"`` computes it instead as matrix products over chunks of the batch::

    dW (K*in x out) += P^T (K*in x rows) @ dy_chunk (rows x out)

where P^T holds the chunk's K = prod(window) shifted views of x with the channel axis
first (an in-cache transpose and K strided slices), and rows = chunk * prod(output spatial)
is chosen so P^T has about 1.2M elements (2048 rows for 64 channels, measured fastest). That is the im2col
formulation of the kernel gradient, but chunked, so the (batch * positions, K * in) patch
matrix (302 MB for a 64-channel 32x32 layer at batch 128) never exists.

``impl="onednn"`` runs all three (forward, input gradient, kernel gradient) in oneDNN, the
library PyTorch's CPU convolutions use, through XLA FFI calls (``jaxnets.ops.onednn``):
float32, non-negative padding, x86-64 Linux, when the extension was built at install time.
On the benchmark machine it made the VGG-style training step 1.5x and ResNet-20's 1.9x
faster than ``"gemm"`` (README, "What makes it fast").

``impl="auto"`` picks, per call: ``"onednn"`` on a CPU default backend when it is available
and applies (float32, non-negative padding); else ``"gemm"`` on the CPU for layers with at
least 32 output channels (narrower layers measured no faster); else ``"xla"``
(``conv_general_dilated`` with its own gradient: cuDNN on GPU). ``default_impl(name)``
changes what ``"auto"`` means inside a ``with`` block, e.g. to run a whole model on XLA's
convolutions, and ``onednn_disabled()`` keeps ``"auto"``'s choice but without oneDNN; both
act when a function is traced. The tests check values and both gradients
against ``conv_general_dilated`` (float64 for ``"gemm"``, float32 against a float64
reference for ``"onednn"``).

`Conv` is a Flax module with the parameters of ``flax.linen.Conv`` (``kernel`` of shape
``(*window, in, out)``, ``bias`` of shape ``(out,)``), so checkpoints, PyTorch imports and
parameter counts do not change when a model switches between them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxnets.ops import onednn

__all__ = [
    "conv",
    "conv_bias",
    "kernel_grad_gemm",
    "Conv",
    "IMPLS",
    "resolve_impl",
    "default_impl",
    "onednn_disabled",
]

IMPLS = ("auto", "onednn", "gemm", "xla")
# Each chunk's P^T holds about this many elements (~4.7 MB in float32): 2048 rows for a
# 64-channel 3x3 layer, 512 for 256 channels (the fastest per layer, measured).
TARGET_ELEMS = 1_200_000
MIN_GEMM_OUT = 32  # "auto" keeps XLA's kernel gradient below 32 output channels (measured)

_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


_AUTO: list[str] = []  # the innermost default_impl(...) override of "auto", if any
_NO_ONEDNN = "auto without onednn"


@contextlib.contextmanager
def default_impl(impl: str) -> Iterator[None]:
    """Inside the block, ``impl="auto"`` means ``impl`` (one of ``IMPLS``), for every
    convolution traced there, models included. ``"auto"`` restores the automatic choice."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _AUTO.append(impl)
    try:
        yield
    finally:
        _AUTO.pop()


@contextlib.contextmanager
def onednn_disabled() -> Iterator[None]:
    """Inside the block, ``impl="auto"`` never picks oneDNN: the choice between ``"gemm"``
    and ``"xla"`` that jaxnets makes without it (the benchmark's "jaxnets-xla" column)."""
    _AUTO.append(_NO_ONEDNN)
    try:
        yield
    finally:
        _AUTO.pop()


def _onednn_applies(dtype, padding) -> bool:
    return (
        jax.default_backend() == "cpu"
        and np.dtype(dtype) == np.float32
        and min(min(p) for p in padding) >= 0
        and onednn.available()
    )


def resolve_impl(impl: str, out_channels: int | None = None, *, dtype=None, padding=None) -> str:
    """The implementation ``conv`` runs: ``impl`` itself unless it is ``"auto"``, which means
    ``"onednn"`` where it is available and applies (a CPU default backend, ``dtype``
    float32, ``padding`` non-negative; both must be given), else ``"gemm"`` on a CPU
    default backend (for layers with at least ``MIN_GEMM_OUT`` output channels, where it
    measured faster), else ``"xla"``. ``default_impl`` overrides what ``"auto"`` means."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    use_onednn = True
    if impl == "auto" and _AUTO:
        impl, use_onednn = ("auto", False) if _AUTO[-1] == _NO_ONEDNN else (_AUTO[-1], True)
    if impl == "auto":
        given = dtype is not None and padding is not None
        if use_onednn and given and _onednn_applies(dtype, padding):
            return "onednn"
        narrow = out_channels is not None and out_channels < MIN_GEMM_OUT
        return "gemm" if jax.default_backend() == "cpu" and not narrow else "xla"
    return impl


def _xla_conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_DIMS[x.ndim - 2]
    )


def _chunk_size(batch: int, positions: int, patch: int) -> int:
    """Images per chunk: P^T of about ``TARGET_ELEMS`` elements (256 to 8192 rows), at
    least one image."""
    rows = min(max(TARGET_ELEMS // patch, 256), 8192)
    return max(1, min(batch, rows // max(positions, 1)))


def kernel_grad_gemm(
    x: Float[Array, "batch *spatial cin"],
    dy: Float[Array, "batch *out cout"],
    window: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Float[Array, "*window cin cout"]:
    """The kernel gradient of ``conv`` as chunked matrix products (see the module docstring).

    ``x`` is the convolution's input, ``dy`` the cotangent of its output; returns
    ``dW`` with the kernel's shape ``(*window, cin, cout)``.
    """
    d = x.ndim - 2
    batch, cin, cout = x.shape[0], x.shape[-1], dy.shape[-1]
    out_sp = dy.shape[1:-1]
    offsets = list(itertools.product(*(range(k) for k in window)))
    nb = _chunk_size(batch, math.prod(out_sp), len(offsets) * cin)
    n_chunks, rem = divmod(batch, nb)
    perm = (d + 1, 0) + tuple(range(1, d + 1))  # (b, *sp, c) -> (c, b, *sp)

    def chunk_grad(xc, dyc):
        rows = xc.shape[0] * math.prod(out_sp)
        xt = jnp.pad(jnp.transpose(xc, perm), [(0, 0), (0, 0)] + [tuple(p) for p in padding])
        views = []
        for off in offsets:
            start = (0, 0) + off
            limit = (cin, xc.shape[0]) + tuple(
                o + s * (n - 1) + 1 for o, s, n in zip(off, strides, out_sp, strict=True)
            )
            v = jax.lax.slice(xt, start, limit, (1, 1) + tuple(strides))
            views.append(v.reshape(cin, rows))
        pt = jnp.concatenate(views, axis=0)  # (K * cin, rows), offset-major like the kernel
        return pt @ dyc.reshape(rows, cout)

    acc = jnp.zeros((len(offsets) * cin, cout), jnp.result_type(x, dy))
    if n_chunks:
        main = n_chunks * nb
        xs = x[:main].reshape((n_chunks, nb) + x.shape[1:])
        dys = dy[:main].reshape((n_chunks, nb) + dy.shape[1:])
        acc, _ = jax.lax.scan(lambda a, c: (a + chunk_grad(*c), None), acc, (xs, dys))
    if rem:
        acc = acc + chunk_grad(x[batch - rem :], dy[batch - rem :])
    return acc.reshape(tuple(window) + (cin, cout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding)


def _conv_gemm_fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_gemm_bwd(strides, padding, saved, dy):
    x, kernel = saved
    _, x_vjp = jax.vjp(lambda a: _xla_conv(a, kernel, strides, padding), x)
    (dx,) = x_vjp(dy)
    dk = kernel_grad_gemm(x, dy, kernel.shape[:-2], strides, padding)
    return dx, dk.astype(kernel.dtype)


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def conv(
    x: Float[Array, "batch *spatial cin"],
    kernel: Float[Array, "*window cin cout"],
    strides: Sequence[int] | int = 1,
    padding: Sequence[tuple[int, int]] | int = 0,
    impl: str = "auto",
) -> Float[Array, "batch *out cout"]:
    """Channels-last convolution, ``y[b, p, o] = sum_{k, i} x_pad[b, s * p + k, i] w[k, i, o]``.

    ``(batch, *spatial, cin)`` with kernel ``(*window, cin, cout)`` -> ``(batch, *out, cout)``,
    ``out = floor((n + lo + hi - k) / s) + 1`` per axis; 1 or 2 spatial axes. ``strides`` and
    ``padding`` are per axis (an int means the same on every axis; padding ``p`` means
    ``(p, p)``). Values equal ``jax.lax.conv_general_dilated``; ``impl`` picks the library
    and how the kernel gradient is computed (module docstring). ``impl="onednn"`` raises
    a ``RuntimeError`` naming the reason where the oneDNN extension is not available.
    """
    return _run(x, kernel, *_prepare(x, kernel, strides, padding, impl))


def _run(x, kernel, d, strides, padding, chosen):
    """The convolution by the implementation ``_prepare`` chose."""
    if chosen == "onednn":
        if d == 1:  # (batch, w, c) as an image of height 1
            y = onednn.conv2d(x[:, None], kernel[None], (1,) + strides, ((0, 0),) + padding)
            return y[:, 0]
        return onednn.conv2d(x, kernel, strides, padding)
    if chosen == "xla":
        return _xla_conv(x, kernel, strides, padding)
    return _conv_gemm(x, kernel, strides, padding)


def conv_bias(
    x: Float[Array, "batch *spatial cin"],
    kernel: Float[Array, "*window cin cout"],
    bias: Float[Array, " cout"],
    strides: Sequence[int] | int = 1,
    padding: Sequence[tuple[int, int]] | int = 0,
    impl: str = "auto",
    relu: bool = False,
) -> Float[Array, "batch *out cout"]:
    """``conv(x, kernel, strides, padding, impl) + bias``, then ``jax.nn.relu`` if ``relu``.

    On the oneDNN path that is one call: the bias and the ReLU are applied as the output is
    written, and the bias gradient comes out of the kernel-gradient call
    (``jaxnets.ops.onednn.conv2d_bias``); elsewhere it is the three operations in turn.
    """
    d, strides, padding, chosen = _prepare(x, kernel, strides, padding, impl)
    if np.shape(bias) != (np.shape(kernel)[-1],):
        raise ValueError(
            f"bias: expected shape ({np.shape(kernel)[-1]},) (the kernel's output channels), "
            f"got {tuple(np.shape(bias))}"
        )
    if chosen == "onednn" and jnp.result_type(bias) == np.float32:
        if d == 1:
            y = onednn.conv2d_bias(
                x[:, None], kernel[None], bias, (1,) + strides, ((0, 0),) + padding, relu
            )
            return y[:, 0]
        return onednn.conv2d_bias(x, kernel, bias, strides, padding, relu)
    y = _run(x, kernel, d, strides, padding, chosen) + jnp.reshape(bias, (1,) * (d + 1) + (-1,))
    return jax.nn.relu(y) if relu else y


def _prepare(x, kernel, strides, padding, impl):
    """Validated (spatial axes, strides, padding) and the implementation ``conv`` runs."""
    d = np.ndim(x) - 2
    if d not in _DIMS:
        raise ValueError(
            f"x: expected (batch, *spatial, channels) with 1 or 2 spatial axes, "
            f"got shape {tuple(np.shape(x))}"
        )
    if np.ndim(kernel) != d + 2:
        raise ValueError(
            f"kernel: expected rank {d + 2} (*window, in, out) for x of rank {d + 2}, "
            f"got shape {tuple(np.shape(kernel))}"
        )
    if np.shape(kernel)[-2] != np.shape(x)[-1]:
        raise ValueError(
            f"kernel: expected {np.shape(x)[-1]} input channels (x's last axis), "
            f"got kernel shape {tuple(np.shape(kernel))}"
        )
    strides = (strides,) * d if isinstance(strides, int) else tuple(int(s) for s in strides)
    if isinstance(padding, int):
        padding = ((padding, padding),) * d
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(strides) != d or len(padding) != d or min(strides) < 1:
        raise ValueError(
            f"strides/padding: expected {d} positive strides and {d} (low, high) pairs, "
            f"got {strides} and {padding}"
        )
    dtype = jnp.result_type(x, kernel)
    chosen = resolve_impl(impl, np.shape(kernel)[-1], dtype=dtype, padding=padding)
    out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in
           zip(np.shape(x)[1:-1], padding, np.shape(kernel)[:-2], strides, strict=True)]  # fmt: skip
    if chosen == "onednn" and impl != "onednn" and (np.shape(x)[0] == 0 or min(out) < 1):
        chosen = "xla"  # an empty result: nothing for oneDNN to do
    return d, strides, padding, chosen


class Conv(nn.Module):
    """``flax.linen.Conv`` with explicit padding, computed by :func:`conv`.

    Same parameters as ``nn.Conv(features, kernel_size, strides, padding, use_bias)``:
    ``kernel`` ``(*kernel_size, in, features)`` and ``bias`` ``(features,)``; input
    ``(batch, *spatial, in)`` -> ``(batch, *out, features)``. ``padding`` is a sequence of
    ``(low, high)`` pairs, one per spatial axis. ``activation="relu"`` returns
    ``relu(conv + bias)``, on the oneDNN path in the same call (:func:`conv_bias`).
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    impl: str = "auto"
    activation: str | None = None  # None or "relu"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.activation not in (None, "relu"):
            raise ValueError(f"activation: expected None or 'relu', got {self.activation!r}")
        shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            return conv_bias(
                x.astype(dtype), kernel.astype(dtype), bias.astype(dtype),
                tuple(self.strides), tuple(self.padding), self.impl,
                relu=self.activation == "relu",
            )  # fmt: skip
        y = conv(
            x.astype(dtype), kernel.astype(dtype), tuple(self.strides), tuple(self.padding),
            self.impl,
        )  # fmt: skip
        return nn.relu(y) if self.activation == "relu" else y
