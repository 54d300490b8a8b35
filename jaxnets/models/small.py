"""Small baselines for 1-D signals such as MNIST-1D: logistic regression, MLP, 1-D CNN, GRU.

These are the four models of Greydanus (2020), "Scaling down deep learning with MNIST-1D"
(Table 1), written in Flax. Every model maps ``(batch, length)`` or ``(batch, length,
channels)`` floats to logits ``(batch, num_classes)``, and initialises like PyTorch's
``nn.Linear``/``nn.Conv1d`` (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))), as the
reference models do.

Parameter counts for length 40, one channel, 10 classes: logistic 410, MLP 15,210,
CNN 5,210, GRU 5,134.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxnets import rnn

__all__ = [
    "LogisticRegression",
    "MLP",
    "ConvNet1D",
    "GRUClassifier",
    "MNIST1D_MODELS",
    "mnist1d_model",
    "Ensemble",
]


def _torch_uniform(fan_in: int) -> Callable:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv weights and biases."""
    return rnn.torch_uniform(1.0 / float(fan_in) ** 0.5)


def _dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    init = _torch_uniform(fan_in)
    return nn.Dense(features, kernel_init=init, bias_init=init, name=name)


def _check_signal(x: Any, name: str, rank3: bool) -> Array:
    """(batch, length) or (batch, length, channels) floats; returns the 3-D view if rank3."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name}: x must be an array, got {type(x).__name__}")
    if len(shape) not in (2, 3):
        raise ValueError(
            f"{name}: x must be (batch, length) or (batch, length, channels), got shape {shape}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name}: x must be a floating array, got dtype {dtype}")
    if rank3 and len(shape) == 2:
        return x[..., None]
    return x


def _flatten(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = W vec(x) + b.

    (batch, length[, channels]) -> (batch, num_classes).
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Float[Array, "batch length *channels"]) -> Float[Array, "batch classes"]:
        x = _flatten(_check_signal(x, "LogisticRegression", rank3=False))
        return _dense(self.num_classes, x.shape[-1], name="linear")(x)


class MLP(nn.Module):
    """Two hidden ReLU layers of `hidden` units with a residual connection, as in the reference:

    h1 = relu(W1 x + b1);  h2 = h1 + relu(W2 h1 + b2);  logits = W3 h2 + b3.

    (batch, length[, channels]) -> (batch, num_classes).
    """

    hidden: int = 100
    num_classes: int = 10
    residual: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "batch length *channels"]) -> Float[Array, "batch classes"]:
        x = _flatten(_check_signal(x, "MLP", rank3=False))
        h = nn.relu(_dense(self.hidden, x.shape[-1], name="linear1")(x))
        h2 = nn.relu(_dense(self.hidden, self.hidden, name="linear2")(h))
        h = h + h2 if self.residual else h2
        return _dense(self.num_classes, self.hidden, name="linear3")(h)


class ConvNet1D(nn.Module):
    """Three strided 1-D convolutions with ReLU, then a linear classifier on the flat features.

    Layer i: y[p, o] = relu(b[o] + sum_{k, c} x[s p + k - 1, c] w[k, c, o]) with stride s = 2,
    zero padding 1 and kernels (5, 3, 3): length 40 -> 19 -> 10 -> 5, so the classifier sees
    5 * channels features. (batch, length[, channels]) -> (batch, num_classes).
    """

    channels: int = 25
    kernels: tuple[int, ...] = (5, 3, 3)
    stride: int = 2
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Float[Array, "batch length *channels"]) -> Float[Array, "batch classes"]:
        h = _check_signal(x, "ConvNet1D", rank3=True)
        for i, k in enumerate(self.kernels):
            if h.shape[1] + 2 - k < 0:
                raise ValueError(
                    f"ConvNet1D: input length {x.shape[1]} is too short for conv{i + 1} "
                    f"(kernel {k}, stride {self.stride})"
                )
            init = _torch_uniform(k * h.shape[-1])
            h = nn.Conv(
                self.channels, (k,), strides=(self.stride,), padding=[(1, 1)],
                kernel_init=init, bias_init=init, name=f"conv{i + 1}",
            )(h)  # fmt: skip
            h = nn.relu(h)
        h = _flatten(h)
        return _dense(self.num_classes, h.shape[-1], name="linear")(h)


class GRUClassifier(nn.Module):
    """A (bidirectional) GRU whose outputs at every step are flattened into a linear readout.

    outputs (batch, T, directions * hidden) = GRU(x); logits = W vec(outputs) + b. The
    readout sees every time step with its own weights (as in the reference model), so the
    model is position-aware. (batch, T[, features]) -> (batch, num_classes).
    """

    hidden: int = 6
    bidirectional: bool = True
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Float[Array, "batch time *features"]) -> Float[Array, "batch classes"]:
        x = _check_signal(x, "GRUClassifier", rank3=True)
        outputs, _ = rnn.GRU(hidden_size=self.hidden, bidirectional=self.bidirectional,
                             name="gru")(x)  # fmt: skip
        h = _flatten(outputs)
        return _dense(self.num_classes, h.shape[-1], name="linear")(h)


MNIST1D_MODELS: dict[str, type[nn.Module]] = {
    "logistic": LogisticRegression,
    "mlp": MLP,
    "cnn": ConvNet1D,
    "gru": GRUClassifier,
}
"""The four MNIST-1D baselines by name, with the reference sizes as defaults."""


def mnist1d_model(name: str, **kwargs: Any) -> nn.Module:
    """A baseline by name: "logistic", "mlp", "cnn" or "gru" (kwargs override the sizes)."""
    if name not in MNIST1D_MODELS:
        raise ValueError(
            f"mnist1d_model: name must be one of {sorted(MNIST1D_MODELS)}, got {name!r}"
        )
    return MNIST1D_MODELS[name](**kwargs)


class Ensemble(nn.Module):
    """`members` independent copies of a model, trained side by side as one model.

    The copies' parameters are stacked on a leading axis (each initialised from its own split
    of the init key) and the model is `nn.vmap`ped over axis 1 of the input:
    x (batch, members, ...) -> (batch, members, ...outputs), member m seeing x[:, m]. Their
    parameters never interact, so with an elementwise optimizer (Adam, SGD) and a loss that
    sums the members' losses, each copy follows exactly its own training run: several seeds
    for the price of one compiled step. The batch stays on axis 0, so data parallelism
    (which shards axis 0) still applies.
    """

    module: type[nn.Module]
    members: int
    kwargs: dict[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "batch members *rest"]) -> Array:
        if x.ndim < 2 or x.shape[1] != self.members:
            raise ValueError(
                f"Ensemble: x must be (batch, members={self.members}, ...), got shape {x.shape}"
            )
        stacked = nn.vmap(
            self.module,
            in_axes=1,
            out_axes=1,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            axis_size=self.members,
        )
        return stacked(**dict(self.kwargs or {}), name="member")(x)
