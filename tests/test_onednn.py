"""The oneDNN convolution (``jaxnets.ops.onednn``, ``conv(impl="onednn")``).

References: XLA's ``conv_general_dilated`` in float64 on the same float32 inputs (values,
input gradient, kernel gradient, second derivatives), over randomised shapes, strides,
paddings and channel counts; the models' outputs under XLA's convolutions; the same program
run with 1 and 2 oneDNN threads. On x86-64 Linux with a C++ compiler the extension must be
built (a broken build fails here rather than hiding behind skips).
"""

import functools
import os
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxnets.ops.conv as ops_conv
from jaxnets import models
from jaxnets.ops import onednn

SUPPORTED = sys.platform == "linux" and platform.machine() == "x86_64"
needs_onednn = pytest.mark.skipif(
    not onednn.available() if SUPPORTED else True,
    reason=f"oneDNN extension unavailable: {onednn.unavailable_reason()}",
)


@pytest.mark.skipif(not SUPPORTED or shutil.which("c++") is None, reason="x86-64 Linux only")
def test_extension_is_built_where_supported():
    assert onednn.available(), onednn.unavailable_reason()
    x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 3))
    assert ops_conv.resolve_impl("auto", 3, dtype=jnp.float32, padding=((1, 1), (1, 1))) == (
        "onednn" if jax.default_backend() == "cpu" else "xla"
    )
    assert ops_conv.conv(x, w, 1, 1).shape == (1, 4, 4, 3)


def _ref(x, w, strides, padding):
    d = x.ndim - 2
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=ops_conv._DIMS[d])


def _close(got, want, scale):
    """float32 results against a float64 reference, relative to the terms' magnitude."""
    err = np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want)))
    assert err <= 2e-5 * scale, (err, scale)


@needs_onednn
@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    cin=st.integers(1, 9),
    cout=st.integers(1, 9),
    window=st.sampled_from([1, 2, 3, 5, 7]),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    one_d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_and_both_gradients_equal_xla(
    n, size, cin, cout, window, strides, padding, one_d, seed
):
    pt, pb, pl, pr = padding
    if one_d:
        shape, kshape, s, pad = (n, size[1], cin), (window, cin, cout), strides[1:], ((pl, pr),)
    else:
        shape, kshape, s, pad = (
            (n, *size, cin),
            (window, window, cin, cout),
            strides,
            ((pt, pb), (pl, pr)),
        )
    if any(m + lo + hi < window for m, (lo, hi) in zip(shape[1:-1], pad, strict=True)):
        return  # an empty output: conv refuses it for impl="onednn"
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(kshape).astype(np.float32)
    conv = jax.jit(functools.partial(ops_conv.conv, strides=s, padding=pad, impl="onednn"))
    with jax.enable_x64(True):
        x64, w64 = jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)
        y = _ref(x64, w64, s, pad)
        ct = rng.standard_normal(y.shape)
        want = jax.grad(lambda a, b: jnp.sum(_ref(a, b, s, pad) * ct), (0, 1))(x64, w64)
    scale = np.sqrt(np.prod(kshape[:-1]))  # ~ the size of one output's sum of terms
    _close(conv(jnp.asarray(x), jnp.asarray(w)), y, scale)
    got = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b) * ct.astype(np.float32)), (0, 1)))(x, w)
    _close(got[0], want[0], scale * np.sqrt(cout))
    _close(got[1], want[1], np.sqrt(np.prod(y.shape[:-1])))


def _ref_bias(x, w, b, strides, padding, relu):
    y = _ref(x, w, strides, padding) + b.reshape((1,) * (x.ndim - 1) + (-1,))
    return jax.nn.relu(y) if relu else y


@needs_onednn
@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 3),
    size=st.tuples(st.integers(3, 10), st.integers(3, 10)),
    cin=st.integers(1, 7),
    cout=st.integers(1, 7),
    window=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    relu=st.booleans(),
    one_d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_bias_relu_and_its_gradients_equal_xla(
    n, size, cin, cout, window, stride, pad, relu, one_d, seed
):
    """conv_bias: bias (and ReLU) inside the oneDNN call, the bias gradient from the kernel
    gradient's call; against conv + bias (+ relu) in float64."""
    d = 1 if one_d else 2
    shape, kshape = (n, *size[:d], cin), (window,) * d + (cin, cout)
    s, padding = (stride,) * d, ((pad, pad),) * d
    if any(m + 2 * pad < window for m in shape[1:-1]):
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(kshape).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    f = functools.partial(ops_conv.conv_bias, strides=s, padding=padding, impl="onednn", relu=relu)
    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in (x, w, b)]
        y = _ref_bias(*args64, s, padding, relu)
        ct = rng.standard_normal(y.shape)
        want = jax.grad(lambda *a: jnp.sum(_ref_bias(*a, s, padding, relu) * ct), (0, 1, 2))(
            *args64
        )
    scale = np.sqrt(np.prod(kshape[:-1]))
    _close(jax.jit(f)(x, w, b), y, scale)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct.astype(np.float32)), (0, 1, 2)))(x, w, b)
    _close(got[0], want[0], scale * np.sqrt(cout))
    _close(got[1], want[1], np.sqrt(np.prod(y.shape[:-1])))
    _close(got[2], want[2], np.sqrt(np.prod(y.shape[:-1])))


@needs_onednn
def test_conv_bias_second_derivatives_vmap_and_errors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)

    def loss(fn):
        def inner(x, w, b):
            return jnp.sum(jnp.tanh(fn(x, w, b)) * jnp.cos(jnp.arange(4.0)).reshape(1, 1, 1, 4))

        # d/d(x, w) of |dL/dw|^2 + |dL/db|^2: through both VJPs of the bias variants
        return lambda x, w, b: (
            jnp.sum(jax.grad(inner, 1)(x, w, b) ** 2) + jnp.sum(jax.grad(inner, 2)(x, w, b) ** 2)
        )

    ours = loss(lambda x, w, b: ops_conv.conv_bias(x, w, b, 2, 1, "onednn", relu=True))
    with jax.enable_x64(True):
        ref = loss(lambda x, w, b: _ref_bias(x, w, b, (2, 2), ((1, 1),) * 2, True))
        want = jax.grad(ref, (0, 1))(*(jnp.asarray(a, jnp.float64) for a in (x, w, b)))
    got = jax.jit(jax.grad(ours, (0, 1)))(x, w, b)
    for a, e in zip(got, want, strict=True):
        np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4 * np.abs(e).max())
    xs = jnp.asarray(rng.standard_normal((3, 2, 5, 5, 3)), jnp.float32)
    f = functools.partial(ops_conv.conv_bias, strides=1, padding=1, impl="onednn", relu=True)
    np.testing.assert_allclose(
        jax.vmap(f, (0, None, None))(xs, w, b),
        jnp.stack([_ref_bias(xi, w, b, (1, 1), ((1, 1),) * 2, True) for xi in xs]),
        rtol=1e-5, atol=1e-4,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        ops_conv.conv_bias(x, w, b[:3], 1, 1, "onednn")
    with pytest.raises(ValueError, match="bias: expected float32"):
        onednn.conv2d_bias(x, w, b.astype(np.float16), (1, 1), ((1, 1),) * 2)
    with pytest.raises(ValueError, match="activation: expected None or 'relu'"):
        ops_conv.Conv(4, (3, 3), activation="gelu").init(jax.random.key(0), x)


@needs_onednn
def test_second_derivatives_equal_xla():
    """grad of grad runs through the custom VJPs (each made of the other two handlers)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)

    def loss(conv_fn):
        def inner(x, w):
            return jnp.sum(jnp.tanh(conv_fn(x, w)))

        # d/dx of |dL/dw|^2 and d/dw of |dL/dx|^2: both mix all three linear maps
        return lambda x, w: (
            jnp.sum(jax.grad(inner, 1)(x, w) ** 2) + jnp.sum(jax.grad(inner, 0)(x, w) ** 2)
        )

    ours = loss(functools.partial(ops_conv.conv, strides=2, padding=1, impl="onednn"))
    with jax.enable_x64(True):
        ref = loss(lambda x, w: _ref(x, w, (2, 2), ((1, 1), (1, 1))))
        want = jax.grad(ref, (0, 1))(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64))
    got = jax.jit(jax.grad(ours, (0, 1)))(x, w)
    for a, e in zip(got, want, strict=True):
        np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4 * np.abs(e).max())


@needs_onednn
def test_vmap_over_images_and_jit_trace_once():
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 5)), jnp.float32)
    f = functools.partial(ops_conv.conv, strides=1, padding=1, impl="onednn")
    got = jax.vmap(f, (0, None))(xs, w)
    np.testing.assert_allclose(got, jnp.stack([_ref(x, w, (1, 1), ((1, 1),) * 2) for x in xs]),
                               rtol=1e-5, atol=1e-4)  # fmt: skip
    gw = jax.vmap(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), 1), (0, None))(xs, w)
    gw_ref = jax.vmap(jax.grad(lambda x, w: jnp.sum(_ref(x, w, (1, 1), ((1, 1),) * 2) ** 2), 1),
                      (0, None))(xs, w)  # fmt: skip
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-3)


@needs_onednn
@pytest.mark.parametrize("name", [pytest.param("cifar_resnet8", marks=pytest.mark.slow), "vgg"])
def test_models_outputs_and_gradients_unchanged(name, key):
    """A whole model under impl="auto" (oneDNN) equals the same model on XLA's convs. (The
    torchvision-fixture tests in test_models.py also run on oneDNN where it is available.)"""
    model = (models.cifar_resnet(8) if name == "cifar_resnet8"
             else models.VGG(cfg=(8, "M", 16, "M"), head="small"))  # fmt: skip
    x = jax.random.normal(key, (2, 8, 8, 3))
    variables = model.init(key, x, train=False)

    def loss(v):
        logits, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return jnp.sum(logits**2), logits

    with ops_conv.default_impl("xla"):
        (l_x, logits_x), g_x = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    (l_o, logits_o), g_o = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    np.testing.assert_allclose(logits_o, logits_x, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(g_o), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(b).max()) + 1e-6)


CROSS_THREAD_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jaxnets import models
import jaxnets.ops.conv as ops_conv
model = models.VGG(cfg=(16, "M", 32, "M", 64), num_classes=5, batch_norm=True, head="small",
                   dropout=0.0)
x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8, 8, 1)), jnp.float32)
v = model.init(jax.random.key(0), x, train=False)
def loss(p):
    out, _ = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2)
step = jax.jit(jax.grad(loss))
for _ in range(3):
    got = step(v["params"])
with ops_conv.default_impl("xla"):
    want = jax.jit(jax.grad(loss))(v["params"])
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(b).max()) + 1e-6)
"""


@needs_onednn
def test_primitives_run_on_any_xla_thread():
    """XLA runs each custom call on whichever of its threads is free, so a primitive built on
    one thread runs on another. With oneDNN's thread-local ("library") scratchpad this
    training step of the README's transfer model segfaulted in the gemm-based kernel gradient
    of the 2x2x32->64 layer; the extension now passes its own scratchpad. In a subprocess,
    so that a crash fails this test rather than the test worker."""
    proc = subprocess.run([sys.executable, "-c", CROSS_THREAD_SCRIPT], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


THREADS_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jaxnets.ops import conv
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 12, 12, 16)), jnp.float32)
w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
f = lambda x, w: jnp.sum(conv.conv(x, w, 2, 1, impl="onednn") ** 2)
y = conv.conv(x, w, 2, 1, impl="onednn")
gx, gw = jax.jit(jax.grad(f, (0, 1)))(x, w)
b = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32)
fb = lambda x, w, b: jnp.sum(conv.conv_bias(x, w, b, 2, 1, "onednn", relu=True) ** 2)
gbx, gbw, gbb = jax.jit(jax.grad(fb, (0, 1, 2)))(x, w, b)
np.savez({path!r}, y=y, gx=gx, gw=gw, gbx=gbx, gbw=gbw, gbb=gbb)
"""


@needs_onednn
def test_results_identical_with_one_and_two_threads(tmp_path):
    out = {}
    for threads in (1, 2):
        path = tmp_path / f"t{threads}.npz"
        env = {"OMP_NUM_THREADS": str(threads), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", THREADS_SCRIPT.format(path=str(path))],
                       env=env, check=True, timeout=120)  # fmt: skip
        out[threads] = dict(np.load(path))
    for k in out[1]:
        np.testing.assert_array_equal(out[1][k], out[2][k], err_msg=k)


def test_errors_are_clear():
    x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 5))
    if not onednn.available():
        with pytest.raises(RuntimeError, match="impl='onednn'"):
            ops_conv.conv(x, w, impl="onednn")
        return
    with pytest.raises(TypeError, match="expected float32"):
        onednn.conv2d(x.astype(jnp.bfloat16), w, (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="non-negative padding"):
        onednn.conv2d(x, w, (1, 1), ((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="empty output"):
        onednn.conv2d(x, jnp.zeros((5, 5, 2, 1)), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="impl: expected one of"):
        with ops_conv.default_impl("cudnn"):
            pass
    # "auto" falls back where oneDNN does not apply: float64, negative padding, empty output
    assert ops_conv.resolve_impl("auto", 64, dtype=jnp.float64, padding=((1, 1),) * 2) == "gemm"
    assert ops_conv.resolve_impl("auto", 64, dtype=jnp.float32, padding=((-1, 1),) * 2) == "gemm"
    assert ops_conv.conv(x, jnp.zeros((5, 5, 2, 1))).shape == (1, 0, 0, 1)
    with ops_conv.default_impl("xla"):
        assert ops_conv.resolve_impl("auto", 64, dtype=jnp.float32, padding=((1, 1),) * 2) == "xla"
    with ops_conv.onednn_disabled():  # jaxnets' choice without oneDNN: gemm from 32 channels
        assert ops_conv.resolve_impl("auto", 64, dtype=jnp.float32, padding=((1, 1),) * 2) == "gemm"
        assert ops_conv.resolve_impl("auto", 16, dtype=jnp.float32, padding=((1, 1),) * 2) == "xla"
        assert ops_conv.resolve_impl("onednn", 16) == "onednn"  # an explicit impl still wins
