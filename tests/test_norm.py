"""jaxnets.ops.norm.batch_norm_train against autodiff through the formula, finite differences
and float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxnets.ops.norm import batch_norm_train


def reference(x, scale, bias, eps=1e-5):
    """The textbook formula, differentiated by JAX (two-pass biased variance)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=axes, keepdims=True)
    shape = mean.shape
    y = (x - mean) / jnp.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
    return y, mean.reshape(-1), var.reshape(-1)


def _inputs(rng, shape, dtype=np.float64):
    c = shape[-1]
    x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    scale = rng.normal(size=c).astype(dtype)
    bias = rng.normal(size=c).astype(dtype)
    return jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)


def _weighted(f, cts):
    """A scalar of all three outputs, so every cotangent (y, mean, var) is nonzero."""

    def loss(x, scale, bias):
        return sum(jnp.sum(o * w) for o, w in zip(f(x, scale, bias), cts, strict=True))

    return loss


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("shape", [(9, 3), (4, 5, 6, 3), (2, 3, 4, 3, 5)])
def test_values_and_gradients_equal_autodiff_in_float64(shape, two_pass):
    with jax.enable_x64():
        rng = np.random.default_rng(sum(shape))
        x, scale, bias = _inputs(rng, shape)
        cts = [jnp.asarray(rng.normal(size=s)) for s in (shape, shape[-1:], shape[-1:])]
        bn = functools.partial(batch_norm_train, two_pass=two_pass)
        for got, want in zip(bn(x, scale, bias), reference(x, scale, bias), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        g_got = jax.grad(_weighted(bn, cts), (0, 1, 2))(x, scale, bias)
        g_want = jax.grad(_weighted(reference, cts), (0, 1, 2))(x, scale, bias)
        for got, want in zip(g_got, g_want, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)


def test_gradients_match_finite_differences_to_second_order():
    with jax.enable_x64():
        rng = np.random.default_rng(1)
        x, scale, bias = _inputs(rng, (3, 4, 4, 2))
        cts = [jnp.asarray(rng.normal(size=s)) for s in ((3, 4, 4, 2), (2,), (2,))]
        # reverse over reverse: the backward pass is itself differentiable JAX
        check_grads(_weighted(batch_norm_train, cts), (x, scale, bias), order=2, modes=["rev"])


def test_float32_matches_float64_and_bfloat16_keeps_its_dtype():
    rng = np.random.default_rng(2)
    x64, s64, b64 = _inputs(rng, (8, 6, 6, 4))
    with jax.enable_x64():
        want = reference(x64, s64, b64)
        g_want = jax.grad(lambda x: jnp.sum(jnp.sin(reference(x, s64, b64)[0])))(x64)
    x32, s32, b32 = (a.astype(jnp.float32) for a in (x64, s64, b64))
    got = batch_norm_train(x32, s32, b32)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jnp.sin(batch_norm_train(x, s32, b32)[0])))(x32)
    np.testing.assert_allclose(g, g_want, rtol=1e-4, atol=1e-4)
    y16, mean16, var16 = batch_norm_train(x32.astype(jnp.bfloat16), s32, b32)
    assert y16.dtype == jnp.bfloat16 and mean16.dtype == var16.dtype == jnp.float32
    g16 = jax.grad(lambda x: jnp.sum(batch_norm_train(x, s32, b32)[0].astype(jnp.float32)))(
        x32.astype(jnp.bfloat16)
    )
    assert g16.dtype == jnp.bfloat16


def test_two_pass_variance_survives_a_large_mean():
    # mean 1e4, std 1e-1: E[x^2] - mean^2 in float32 would lose every digit
    rng = np.random.default_rng(3)
    x = (1e4 + 0.1 * rng.normal(size=(64, 8, 3))).astype(np.float32)
    _, _, var = batch_norm_train(jnp.asarray(x), jnp.ones(3), jnp.zeros(3))
    np.testing.assert_allclose(var, x.astype(np.float64).var(axis=(0, 1)), rtol=1e-3)


def test_jit_and_vmap_over_independent_batches():
    rng = np.random.default_rng(4)
    xs = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
    scale, bias = jnp.full((4,), 1.5), jnp.full((4,), -0.5)

    def loss(x):
        return jnp.sum(jnp.tanh(batch_norm_train(x, scale, bias)[0]))

    batched = jax.jit(jax.vmap(jax.grad(loss)))(xs)
    for i in range(3):
        np.testing.assert_allclose(batched[i], jax.grad(loss)(xs[i]), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused_by_name():
    x = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\).*\(4,\)"):
        batch_norm_train(x, jnp.ones(4), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        batch_norm_train(x, jnp.ones(3), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="batch and a channel axis"):
        batch_norm_train(jnp.zeros(3), jnp.ones(3), jnp.zeros(3))


@pytest.mark.parametrize("mean_over_std", [0.0, 3.0, 3.9, 4.5, 20.0])
def test_float32_statistics_and_gradients_on_both_sides_of_the_one_pass_bound(mean_over_std):
    # inside |mean| <= 4 std the one-pass sums are used, outside the two-pass ones: both
    # must stay at float32 accuracy against float64
    rng = np.random.default_rng(5)
    shape = (32, 6, 6, 3)
    x64 = rng.normal(size=shape) * np.array([0.5, 1.0, 2.0]) + mean_over_std * np.array(
        [0.5, 1.0, 2.0]
    )
    x64 = x64.astype(np.float32).astype(np.float64)  # the float32 input, exactly
    ct = rng.normal(size=shape)
    s64, b64 = np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.2, 0.3])
    with jax.enable_x64():
        want = reference(jnp.asarray(x64), jnp.asarray(s64), jnp.asarray(b64))
        g_want = jax.grad(lambda x, s: jnp.sum(reference(x, s, jnp.asarray(b64))[0] * ct), (0, 1))(
            jnp.asarray(x64), jnp.asarray(s64)
        )
    x32, s32, b32 = (jnp.asarray(a, jnp.float32) for a in (x64, s64, b64))
    y, mean, var = batch_norm_train(x32, s32, b32)
    np.testing.assert_allclose(var, want[2], rtol=1e-4)
    np.testing.assert_allclose(mean, want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, want[0], rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda x, s: jnp.sum(batch_norm_train(x, s, b32)[0] * ct), (0, 1))(x32, s32)
    scale_x = float(np.max(np.abs(g_want[0])))
    np.testing.assert_allclose(g[0], g_want[0], atol=1e-4 * scale_x)
    np.testing.assert_allclose(g[1], g_want[1], rtol=1e-4, atol=1e-3)
    _, _, var2 = batch_norm_train(x32, s32, b32, two_pass=True)  # two-pass on request
    np.testing.assert_allclose(var2, want[2], rtol=1e-4)
