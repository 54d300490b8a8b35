"""oneDNN convolutions inside jitted JAX programs (x86-64 CPUs), as XLA FFI calls.

The compiled extension ``jaxnets/ops/_onednn_conv*.so`` (built from ``csrc/onednn_conv.cc``
by ``pip install``, see ``setup.py``) holds three XLA FFI handlers for a 2-D convolution,
channels-last float32:

    forward          y  = conv(x, w)                     (n, h, w, c), (kh, kw, c, o) -> (n, oh, ow, o)
    backward data    dx = conv^T(dy, w)                  the input gradient, <dx, a> = <dy, conv(a, w)>
    backward weights dw = sum_{b, p} x_pad[b, s p + k] dy[b, p]   the kernel gradient

Each is linear in each argument, so each one's VJP is made of the other two:

    conv(x, w):      dx = conv^T(g, w),    dw = kgrad(x, g)
    conv^T(dy, w):   ddy = conv(g, w),     dw = kgrad(g, dy)
    kgrad(x, dy):    dx = conv^T(dy, g),   ddy = conv(x, g)

which makes :func:`conv2d` differentiable to any order (``grad`` of ``grad`` included).

:func:`conv2d_bias` adds a bias, and optionally a ReLU, inside the forward call (oneDNN's
bias and post-op: no separate pass over the output), and its backward pass gets the bias
gradient sum(dy) from the kernel-gradient call (oneDNN sums dy while it reads it):

    y = relu(conv(x, w) + b):   g' = g * (y > 0),  dx = conv^T(g', w),  (dw, db) = kgrad_b(x, g')
    kgrad_b(x, dy) = (kgrad(x, dy), sum dy):  dx = conv^T(dy, gw),  ddy = conv(x, gw) + gb

Forward-mode (``jvp``, ``jacfwd``) is not defined for ``custom_vjp`` functions; JAX says so.
``vmap`` runs one call per batch element (``vmap_method="sequential"``).

``available()`` says whether the extension loaded; ``unavailable_reason()`` says why not.
Nothing here runs on import: the library is loaded on first use.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.metadata
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["available", "unavailable_reason", "conv2d", "conv2d_bias"]

_HANDLERS = {
    "forward": "JaxnetsOnednnConvForward",
    "backward_data": "JaxnetsOnednnConvBackwardData",
    "backward_weights": "JaxnetsOnednnConvBackwardWeights",
    "forward_bias": "JaxnetsOnednnConvForwardBias",
    "backward_weights_bias": "JaxnetsOnednnConvBackwardWeightsBias",
}
_ABI = 2
_TARGET = "jaxnets_onednn_conv_{}"


def _extension_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_onednn_conv{suffix}"
        if p.exists():
            return p
    return None


def _libdnnl() -> str | None:
    """``libdnnl.so.3`` of the installed ``onednn-cpu-gomp`` distribution, if any."""
    try:
        files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith("libdnnl.so.3"):
            return str(f.locate())
    return None


@functools.cache
def _load() -> str | None:
    """Loads and registers the handlers once; returns None on success, else the reason."""
    if not _supported_platform():
        return f"the oneDNN convolution is built for x86-64 Linux only (this is {sys.platform}/{platform.machine()})"
    ext = _extension_path()
    if ext is None:
        return (
            "the oneDNN extension jaxnets/ops/_onednn_conv*.so is not built "
            "(reinstall with `make install`; setup.py prints why a build failed)"
        )
    lib = _libdnnl()
    try:
        if lib is not None:  # the extension links libdnnl.so.3 by name: load it first
            ctypes.CDLL(lib, mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
        so = ctypes.CDLL(str(ext))
        so.jaxnets_onednn_conv_abi.restype = ctypes.c_int
        if so.jaxnets_onednn_conv_abi() != _ABI:
            return f"{ext.name}: unexpected ABI version; rebuild with `make install`"
        for name, symbol in _HANDLERS.items():
            jax.ffi.register_ffi_target(
                _TARGET.format(name), jax.ffi.pycapsule(getattr(so, symbol)), platform="cpu"
            )
    except (OSError, AttributeError) as e:
        return f"could not load the oneDNN extension {ext}: {e}"
    return None


def _supported_platform() -> bool:
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def available() -> bool:
    """True when the oneDNN convolution extension is built, loadable and registered.

    On x86-64 Linux, where it should be, a False is said once as a warning (the reason and
    that XLA's convolutions are used instead); elsewhere it is expected and silent."""
    reason = _load()
    if reason is not None and _supported_platform():
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"jaxnets: oneDNN convolutions are not available ({reason}); "
        "convolutions run on XLA (impl='gemm'/'xla')",
        RuntimeWarning,
        stacklevel=3,
    )


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()


def _attrs(strides, padding) -> dict:
    (pt, pb), (pl, pr) = padding
    return {k: np.int64(v) for k, v in zip(("sh", "sw", "pt", "pb", "pl", "pr"),
                                           (*strides, pt, pb, pl, pr), strict=True)}  # fmt: skip


def _call(name: str, out_shapes, args, strides, padding, **extra):
    """The handler ``name`` on ``args``; ``out_shapes``: one float32 result's shape, or a
    list of them for several results."""
    if isinstance(out_shapes, list):
        out = tuple(jax.ShapeDtypeStruct(o, np.float32) for o in out_shapes)
    else:
        out = jax.ShapeDtypeStruct(out_shapes, np.float32)
    return jax.ffi.ffi_call(_TARGET.format(name), out, vmap_method="sequential")(
        *args, **_attrs(strides, padding), **extra
    )


def _out_shape(x_shape, k_shape, strides, padding):
    n, h, w, _ = x_shape
    kh, kw, _, o = k_shape
    (pt, pb), (pl, pr) = padding
    return (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, o)


# The three linear maps, each a custom_vjp whose backward pass is made of the other two.
# Shapes the outputs cannot be inferred from are passed as static arguments.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fwd(x, w, strides, padding):
    out = _out_shape(x.shape, w.shape, strides, padding)
    return _call("forward", out, (x, w), strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bwd_data(dy, w, x_shape, strides, padding):
    return _call("backward_data", x_shape, (dy, w), strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bwd_weights(x, dy, w_shape, strides, padding):
    return _call("backward_weights", w_shape, (x, dy), strides, padding)


def _fwd_fwd(x, w, strides, padding):
    return _fwd(x, w, strides, padding), (x, w)


def _fwd_bwd(strides, padding, res, g):
    x, w = res
    return (_bwd_data(g, w, x.shape, strides, padding),
            _bwd_weights(x, g, w.shape, strides, padding))  # fmt: skip


def _bwd_data_fwd(dy, w, x_shape, strides, padding):
    return _bwd_data(dy, w, x_shape, strides, padding), (dy, w)


def _bwd_data_bwd(x_shape, strides, padding, res, g):
    dy, w = res
    return _fwd(g, w, strides, padding), _bwd_weights(g, dy, w.shape, strides, padding)


def _bwd_weights_fwd(x, dy, w_shape, strides, padding):
    return _bwd_weights(x, dy, w_shape, strides, padding), (x, dy)


def _bwd_weights_bwd(w_shape, strides, padding, res, g):
    x, dy = res
    return _bwd_data(dy, g, x.shape, strides, padding), _fwd(x, g, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fwd_bias(x, w, b, strides, padding, relu):
    out = _out_shape(x.shape, w.shape, strides, padding)
    return _call("forward_bias", out, (x, w, b), strides, padding, relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bwd_weights_bias(x, dy, w_shape, strides, padding):
    return _call("backward_weights_bias", [w_shape, w_shape[-1:]], (x, dy), strides, padding)


def _fwd_bias_fwd(x, w, b, strides, padding, relu):
    y = _fwd_bias(x, w, b, strides, padding, relu)
    return y, (x, w, y)


def _fwd_bias_bwd(strides, padding, relu, res, g):
    x, w, y = res
    if relu:  # relu'(0) = 0, as jax.nn.relu
        g = jnp.where(y > 0, g, jnp.zeros_like(g))
    dw, db = _bwd_weights_bias(x, g, w.shape, strides, padding)
    return _bwd_data(g, w, x.shape, strides, padding), dw, db


def _bwd_weights_bias_fwd(x, dy, w_shape, strides, padding):
    return _bwd_weights_bias(x, dy, w_shape, strides, padding), (x, dy)


def _bwd_weights_bias_bwd(w_shape, strides, padding, res, g):
    x, dy = res
    gw, gb = g
    ddy = _fwd(x, gw, strides, padding) + gb.reshape(1, 1, 1, -1)
    return _bwd_data(dy, gw, x.shape, strides, padding), ddy


_fwd.defvjp(_fwd_fwd, _fwd_bwd)
_fwd_bias.defvjp(_fwd_bias_fwd, _fwd_bias_bwd)
_bwd_weights_bias.defvjp(_bwd_weights_bias_fwd, _bwd_weights_bias_bwd)
_bwd_data.defvjp(_bwd_data_fwd, _bwd_data_bwd)
_bwd_weights.defvjp(_bwd_weights_fwd, _bwd_weights_bwd)


def conv2d(
    x: Float[Array, "batch h w cin"],
    kernel: Float[Array, "kh kw cin cout"],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> Float[Array, "batch oh ow cout"]:
    """``jax.lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))``
    computed by oneDNN, float32, non-negative padding; differentiable (module docstring).

    Raises ``RuntimeError`` naming the reason when the extension is not available.
    """
    strides, padding = _check(x, kernel, strides, padding)
    return _fwd(x, kernel, strides, padding)


def conv2d_bias(
    x: Float[Array, "batch h w cin"],
    kernel: Float[Array, "kh kw cin cout"],
    bias: Float[Array, " cout"],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    relu: bool = False,
) -> Float[Array, "batch oh ow cout"]:
    """``conv2d(x, kernel, strides, padding) + bias``, then ``jax.nn.relu`` if ``relu``: one
    oneDNN call forward, the bias gradient from the kernel-gradient call (module docstring).
    """
    strides, padding = _check(x, kernel, strides, padding)
    if bias.shape != (kernel.shape[-1],) or bias.dtype != np.float32:
        raise ValueError(
            f"bias: expected float32 of shape ({kernel.shape[-1]},), got {bias.dtype} {bias.shape}"
        )
    return _fwd_bias(x, kernel, bias, strides, padding, bool(relu))


def _check(x, kernel, strides, padding):
    """Validated (strides, padding) as tuples; raises naming the argument."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"impl='onednn': {reason}")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"x, kernel: expected (batch, h, w, c) and (kh, kw, c, o), got {x.shape} and {kernel.shape}"
        )
    if x.dtype != np.float32 or kernel.dtype != np.float32:
        raise TypeError(f"x, kernel: expected float32, got {x.dtype} and {kernel.dtype}")
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if min(strides) < 1 or min(min(p) for p in padding) < 0:
        raise ValueError(
            f"strides/padding: expected positive strides and non-negative padding, got {strides}, {padding}"
        )
    out = _out_shape(x.shape, kernel.shape, strides, padding)
    if min(out[1:3]) < 1 or x.shape[0] == 0:
        raise ValueError(
            f"x: shape {x.shape} with kernel {kernel.shape} gives an empty output {out}"
        )
    return strides, padding
