"""jaxnets.models.probes: receptive fields and per-layer gradient norms against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets.models import cifar_resnet
from jaxnets.models.common import conv
from jaxnets.models.probes import conv_kernels, layer_grad_norms, receptive_field


def _ones_stack(kernels, spatial_dims):
    """Linear stack of all-ones convs (1 channel, padding k // 2)."""

    def fn(x):
        for k in kernels:
            layer = conv(1, k, 1, k // 2, spatial_dims=spatial_dims)
            x = layer.apply({"params": {"kernel": jnp.ones((k,) * spatial_dims + (1, 1))}}, x)
        return x

    return fn


@pytest.mark.parametrize(
    "kernels, expected",
    [
        ((3,), [1, 1, 1]),
        ((3, 3), [1, 2, 3, 2, 1]),  # ones * ones: the number of paths to the output
        ((5,), [1, 1, 1, 1, 1]),
        ((3, 3, 3), [1, 3, 6, 7, 6, 3, 1]),
        ((7,), [1] * 7),
    ],
)
def test_receptive_field_of_ones_kernels_counts_paths(kernels, expected):
    x = jnp.zeros((1, 15, 1))
    g, extent = receptive_field(_ones_stack(kernels, 1), x)
    assert extent == (len(expected),)
    lo = 7 - len(expected) // 2
    np.testing.assert_array_equal(g[lo : lo + len(expected)], expected)
    assert g.sum() == np.sum(expected)  # nothing outside the window


def test_receptive_field_2d_off_centre_and_border():
    x = jnp.zeros((1, 9, 9, 1))
    g, extent = receptive_field(_ones_stack((3, 3), 2), x, position=(4, 4))
    assert extent == (5, 5)
    np.testing.assert_array_equal(g[2:7, 2:7], np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]))
    # At the corner, zero padding cuts the window to 3x3.
    _, extent = receptive_field(_ones_stack((3, 3), 2), x, position=(0, 0))
    assert extent == (3, 3)
    with pytest.raises(ValueError, match=r"\(1, \*spatial, channels\)"):
        receptive_field(_ones_stack((3,), 2), jnp.zeros((2, 9, 9, 1)))


def test_conv_kernels_follow_the_forward_pass(key):
    x = jnp.zeros((1, 40, 1))
    params = jax.eval_shape(
        lambda: cifar_resnet(56, width=2, spatial_dims=1, shortcut="B").init(key, x)
    )["params"]
    paths = [p for p, _ in conv_kernels(params)]
    assert len(paths) == 55  # depth 56 = 55 convs + the Linear head; projections excluded
    assert paths[0] == "features/stem/conv"
    assert paths[1:3] == ["features/stage1/block0/conv1", "features/stage1/block0/conv2"]
    assert paths[19] == "features/stage2/block0/conv1"  # after stage1's 9 blocks
    assert paths[-1] == "features/stage3/block8/conv2"


def test_layer_grad_norms_match_finite_differences(key):
    # d L / d W along a random direction U equals <grad, U> = (L(W + eU) - L(W - eU)) / 2e.
    model = cifar_resnet(8, width=2, spatial_dims=1)
    x = jax.random.normal(key, (8, 16, 1))
    y = jnp.arange(8) % 10
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        # Shapes from eval_shape, values from numpy: compiling model.init costs more than the test.
        shapes = jax.eval_shape(model.init, key, x64)
        rng = np.random.default_rng(0)
        variables = jax.tree.map(
            lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape) + (s.ndim == 1), jnp.float64),
            shapes,
        )
        variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])
        norms = dict(layer_grad_norms(model, variables, x64, y))
        assert list(norms)[0] == "features/stem/conv" and len(norms) == 7

        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x64, train=True, mutable=["batch_stats"]
            )
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])

        grads = jax.grad(loss)(variables["params"])
        g = grads["features"]["stage2"]["block0"]["conv1"]["kernel"]
        np.testing.assert_allclose(
            norms["features/stage2/block0/conv1"], jnp.linalg.norm(g), rtol=1e-10
        )
        # the gradient itself against central differences
        u = jax.random.normal(key, g.shape, jnp.float64)
        eps = 1e-5

        def shifted(s):
            p = jax.tree.map(lambda a: a, variables["params"])
            block = dict(p["features"]["stage2"]["block0"])
            block["conv1"] = {"kernel": block["conv1"]["kernel"] + s * u}
            p["features"]["stage2"]["block0"] = block
            return loss(p)

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(g * u)), float(fd), rtol=1e-6)
