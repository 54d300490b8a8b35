"""Recurrent training steps: jaxnets vs ``torch.nn.LSTM/GRU/RNN`` (CPU) vs Flax's built-in cells.

One training step = forward over a ``(batch, time, features)`` input, the loss
``mean((outputs - target)^2)`` over every output, backward, and a plain SGD update
(lr 0.01), identical in every framework. The jaxnets and Flax steps are the same jitted
function around a different model (state donated, like ``jaxnets.train``); the PyTorch step
is ``loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import rnn as jrnn

MODES = ("lstm", "gru", "rnn")
LR = 0.01


@dataclasses.dataclass(frozen=True)
class Shape:
    """The benchmark shapes: B = 64, T = 100, I = 32, H = 256."""

    batch: int = 64
    time: int = 100
    features: int = 32
    hidden: int = 256


QUICK = Shape(batch=4, time=5, features=3, hidden=8)


def data(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Input ``(B, T, I)`` and target ``(B, T, H)``, float32 standard normal."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.batch, shape.time, shape.features), dtype=np.float32)
    y = rng.standard_normal((shape.batch, shape.time, shape.hidden), dtype=np.float32)
    return x, y


def jax_step(apply: Callable, params, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """A blocking closure running one jitted SGD step of ``mean((apply(params, x) - y)^2)``."""
    tx = optax.sgd(LR)

    def loss_fn(p, xb, yb):
        return jnp.mean(jnp.square(apply(p, xb) - yb))

    @jax.jit
    def step(p, opt, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.array, params)  # a private copy: the step donates it
    state = {"p": params, "opt": tx.init(params)}
    xb, yb = jnp.asarray(x), jnp.asarray(y)

    def run() -> None:
        p, opt, loss = step(state["p"], state["opt"], xb, yb)
        loss.block_until_ready()
        state["p"], state["opt"] = p, opt

    return run


_JAXNETS = {"lstm": jrnn.LSTM, "gru": jrnn.GRU, "rnn": jrnn.RNN}


def jaxnets_step(mode: str, shape: Shape, **layer_kwargs) -> Callable[[], None]:
    """Training step of a one-layer ``jaxnets.rnn`` layer (``layer_kwargs`` go to it)."""
    x, y = data(shape)
    layer = _JAXNETS[mode](shape.hidden, **layer_kwargs)
    params = layer.init(jax.random.key(0), jnp.asarray(x))["params"]
    return jax_step(lambda p, xb: layer.apply({"params": p}, xb)[0], params, x, y)


def flax_step(mode: str, shape: Shape) -> Callable[[], None]:
    """Training step of ``nn.RNN`` over Flax's built-in cell (OptimizedLSTMCell, GRUCell,
    SimpleCell)."""
    x, y = data(shape)
    cell = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[mode]
    model = nn.RNN(cell(shape.hidden))
    params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
    return jax_step(lambda p, xb: model.apply({"params": p}, xb), params, x, y)


def torch_device() -> str:
    """ "cuda" when JAX runs on a GPU and PyTorch sees one (the GPU script), else "cpu"."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_step(mode: str, shape: Shape) -> Callable[[], None]:
    """Training step of ``torch.nn.LSTM/GRU/RNN`` (batch_first, float32, on `torch_device`).

    Raises ImportError when PyTorch is not installed.
    """
    import torch

    dev = torch_device()
    x, y = data(shape)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[mode]
    torch.manual_seed(0)
    model = cls(shape.features, shape.hidden, batch_first=True).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

    def run() -> None:
        out, _ = model(xt)
        loss = torch.mean(torch.square(out - yt))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


def cudnn_step(mode: str, shape: Shape) -> Callable[[], None] | None:
    """``jax.experimental.rnn.lstm`` (cuDNN's fused LSTM) training step on a GPU; None for
    the other modes or off the GPU."""
    if mode != "lstm" or jax.default_backend() != "gpu":
        return None
    from jax.experimental import rnn as jrnn_gpu

    x, y = data(shape)
    b = shape.batch
    weights = jrnn_gpu.init_lstm_weight(jax.random.key(0), shape.features, shape.hidden, 1, False)
    zeros = jnp.zeros((1, b, shape.hidden), jnp.float32)
    lengths = jnp.full((b,), shape.time, jnp.int32)

    def apply(w, xb):
        out, _, _ = jrnn_gpu.lstm(
            xb, zeros, zeros, w, lengths, shape.features, shape.hidden, 1, 0.0, False
        )
        return out

    return jax_step(apply, weights, x, y)
