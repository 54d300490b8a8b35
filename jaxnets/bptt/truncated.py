"""Truncated BPTT(k1, k2) (Williams & Peng) as a training option: `truncated_apply` has
the values of ``layer.apply`` and the gradient of TBPTT(k1, k2); `TruncatedBPTT` is the
drop-in layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets.bptt.chains import (
    LossFn,
    _chain_start,
    _check_layer,
    _compiled,
    _layer_by_layer,
    _readout,
    _run,
    _scalar_loss,
    _setup,
)


def _check_truncation(k1, k2) -> None:
    for name, v in (("k1", k1), ("k2", k2)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if k1 > k2:
        raise ValueError(
            f"k1, k2: expected k1 <= k2 (every k1 steps, backpropagate k2 steps), got "
            f"k1={k1}, k2={k2}"
        )


def _truncated_run(cell, P, S0, us, ms, k1: int, k2: int):
    """A chain unrolled so that gradients follow TBPTT(k1, k2); values as `_run`.

    The steps are cut into chunks of k1; chunk j (ending at e_j) is recomputed from
    stop_gradient(S_{e_j - k2}) (or from S_0 when e_j <= k2), and its states and outputs are
    taken from that recomputation. Costs ceil(T/k1) * min(k2, T) steps.
    """
    T = us.shape[0]
    W = min(k2, T)
    ends = np.minimum(np.arange(1, math.ceil(T / k1) + 1) * k1, T)  # chunk ends e_j
    idx = ends[:, None] - W + np.arange(W)[None, :]  # (chunks, W) step indices
    valid = jnp.asarray(idx >= 0)
    idx_c = np.maximum(idx, 0)
    states, _ = _run(
        cell, jax.lax.stop_gradient(P), jax.lax.stop_gradient(S0), jax.lax.stop_gradient(us), ms
    )
    starts = ends - W
    S_start = jnp.where(
        jnp.asarray(starts > 0)[:, None, None],
        jax.lax.stop_gradient(states[np.maximum(starts, 0)]),
        S0[None],
    )  # (chunks, B, N)
    us_w = us[idx_c]  # (chunks, W, B, I)
    m_w = jnp.broadcast_to(valid[:, :, None], idx.shape + (us.shape[1],))
    if ms is not None:
        m_w = m_w & ms[idx_c]
    S_w, y_w = jax.vmap(lambda s0, u, m: _run(cell, P, s0, u, m))(S_start, us_w, m_w)
    # step k lives in chunk k // k1 at window position W - (e_j - k)
    k = np.arange(T)
    j = k // k1
    pos = W - (ends[j] - k)
    new_states = S_w[j, pos + 1]  # (T, B, N): S_{k+1}
    ys = y_w[j, pos]
    return jnp.concatenate([S0[None], new_states], axis=0), ys


@_compiled("k1", "k2")
def truncated_apply(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    k1: int,
    k2: int,
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
):
    """``layer.apply(variables, x, ...)`` whose gradient is truncated BPTT(k1, k2).

    Same values as ``layer.apply`` (up to rounding). Gradients follow Williams & Peng's
    TBPTT(k1, k2): the steps are cut into chunks of k1; the losses read in a chunk
    (outputs at its steps, the final state in the last chunk) backpropagate through the k2
    steps that end with the chunk, and no further. So every loss term reaches back at most
    k2 and at least k2 - k1 + 1 steps; k2 >= T is full BPTT. Used as one update per batch
    with the sum of the chunks' gradients at the same parameters. Truncation is in time
    only: through layers (at the same step) the gradient flows as usual.

    Returns ``(outputs, final_state)`` as ``layer.apply``. Requires 1 <= k1 <= k2.
    """
    _check_truncation(k1, k2)
    st = _setup(layer, variables, x, lengths, initial_state)

    def run_chain(i, us, ms):
        P, S0 = _chain_start(st, i)
        states, ys = _truncated_run(st.cell, P, S0, us, ms, k1, k2)
        return (states, ms), ys

    results, _ = _layer_by_layer(st, run_chain, st.x)
    states, masks = zip(*results, strict=True)
    return _readout(st, list(states), list(masks))


@_compiled("loss_fn", "k1", "k2")
def truncated_grad(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    loss_fn: LossFn,
    k1: int,
    k2: int,
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    loss_args: tuple = (),
):
    """``(loss, grads)``: the TBPTT(k1, k2) gradient of
    ``loss_fn(outputs, final_state, *loss_args)`` w.r.t. ``variables["params"]`` (see
    `truncated_apply`)."""

    def loss_of(params):
        out = truncated_apply(
            layer, {"params": params}, x, k1, k2, lengths, initial_state=initial_state
        )
        return _scalar_loss(loss_fn, *out, loss_args)

    return jax.value_and_grad(loss_of)(variables["params"])


class TruncatedBPTT(nn.Module):
    """A recurrent layer trained by truncated BPTT(k1, k2): drop-in for ``layer``.

    Same parameters (under the wrapped layer's name), same outputs; gradients as
    `truncated_apply`. Use it inside any model trained with `jaxnets.train`::

        outputs, _ = TruncatedBPTT(LSTM(64), k1=10, k2=20)(x)

    Dropout between layers is not supported (``layer.dropout`` must be 0).
    """

    layer: nn.Module
    k1: int
    k2: int

    @nn.compact
    def __call__(self, x, initial_state=None, lengths=None, deterministic: bool = True):
        _check_layer(self.layer)
        _check_truncation(self.k1, self.k2)
        if self.layer.dropout:
            raise ValueError(
                f"layer: TruncatedBPTT does not apply dropout; got dropout={self.layer.dropout}"
            )
        if self.is_initializing():
            return self.layer(x, initial_state=initial_state, lengths=lengths)
        variables = {"params": self.layer.variables["params"]}
        return truncated_apply(
            self.layer.clone(parent=None),
            variables,
            x,
            self.k1,
            self.k2,
            lengths,
            initial_state=initial_state,
        )
