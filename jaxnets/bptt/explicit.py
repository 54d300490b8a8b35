"""Explicit BPTT: the gradient computed the way the notes write it, from the per-step
Jacobians; matrix-free state gradients and gradient-norm-versus-lag curves.

The maths (the BPTT section of the notes). With J_k = d S_{k+1} / d S_k the per-step
Jacobian of a chain (`jaxnets.bptt.chains`), a loss L(outputs, final_state) reads the
states directly: the outputs are the h part of every state, the final state is S_T. Write
d_k = partial L / partial S_k for that direct dependence (zero for k < T in a many-to-one
loss). The total derivative g_k = dL/dS_k obeys g_T = d_T, g_k = d_k + J_k^T g_{k+1},
which unrolled is the product of Jacobians

    g_k = sum_{j >= k} (J_{j-1} J_{j-2} ... J_k)^T d_j,

and the parameter gradient is a sum over time of per-step parameter VJPs,

    dL/dpsi = sum_k (partial S_{k+1} / partial psi |_k)^T g_{k+1}.

With a many-to-one loss this is the notes' formula
dL/dpsi = sum_t dL/dh_T (prod_{i=t}^{T-1} dh_{i+1}/dh_i) dh_t/dpsi. Long products of
contracting Jacobians shrink: the gradient reaching early steps vanishes (`lag_curve`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets import rnn
from jaxnets.bptt.chains import (
    LossFn,
    _batch_first,
    _chain_step,
    _compiled,
    _forward,
    _layer_by_layer,
    _readout,
    _scalar_loss,
    _setup,
    _stack,
)
from jaxnets.bptt.jacobians import (
    FactoredJacobians,
    _chain_factors,
    _chain_jacobians,
    _dense_from_factors,
    _factored_rmatvec,
    _resolve_method,
)


def _backward_recursion(Jt_apply, T: int, d: Array) -> Array:
    """g_k = d_k + J_k^T g_{k+1}, g_T = d_T.

    ``Jt_apply(k, u)`` = J_k^T u for u (B, N); d (T+1, B, N) -> g (T+1, B, N).
    """

    def body(g_next, k):
        g = d[k] + Jt_apply(k, g_next)
        return g, g

    _, gs = jax.lax.scan(body, d[-1], jnp.arange(T), reverse=True)
    return jnp.concatenate([gs, d[-1:]], axis=0)


def _dense_rmatvec(J: Array):
    """J (B, T, N, N) -> ``(k, u) -> J_k^T u`` (indexing step k, no transposed copy of J)."""

    def apply(k, u):
        Jk = jax.lax.dynamic_index_in_dim(J, k, axis=1, keepdims=False)
        return jnp.einsum("bij,bi->bj", Jk, u)

    return apply


def _backward_products(J: Array, d: Array) -> Array:
    """g_k = sum_{j >= k} (J_{j-1} ... J_k)^T d_j with every product materialised.

    J (B, T, N, N), d (T+1, B, N). O(T^2 N^3) per example: small sizes (tests, teaching);
    the recursion is the same sum in Horner form.
    """
    B, T, N = J.shape[0], J.shape[1], J.shape[-1]
    Jt = jnp.swapaxes(J, 0, 1)
    eye = jnp.broadcast_to(jnp.eye(N, dtype=J.dtype), (B, N, N))
    ks = jnp.arange(T)

    def from_source(j):  # d_j's share of every g_k, k = 0..T
        dj = d[j]

        def body(Q, inp):  # Q = dS_j/dS_{k+1} (I when k+1 >= j)
            Jk, k = inp
            Qk = jnp.where(k < j, jnp.einsum("bij,bjl->bil", Q, Jk), Q)
            c = jnp.where(k <= j, jnp.einsum("bij,bi->bj", Qk, dj), jnp.zeros_like(dj))
            return Qk, c

        _, cs = jax.lax.scan(body, eye, (Jt, ks), reverse=True)
        last = jnp.where(j == T, dj, jnp.zeros_like(dj))
        return jnp.concatenate([cs, last[None]], axis=0)

    return jax.vmap(from_source)(jnp.arange(T + 1)).sum(axis=0)


def _step_vjps(cell, params, S, us, ms, g_next, per_step: bool):
    """Per-step VJPs of the chain step w.r.t. (params, input), cotangent g_{k+1}.

    Returns (total param grads, per-step param grads (leading T) or None, input grads
    (T, B, I)).
    """

    def step_k(P, s, u, m):
        return _chain_step(cell, P, s, u, m)

    if per_step:

        def one(s, u, m, gk):
            _, vjp = jax.vjp(lambda P, u_: step_k(P, s, u_, m), params, u)
            return vjp(gk)

        per, du = jax.vmap(one)(S, us, ms, g_next)
        return jax.tree.map(lambda a: a.sum(0), per), per, du

    def all_steps(P, u_all):
        return jax.vmap(lambda s, u, m: step_k(P, s, u, m))(S, u_all, ms)

    _, vjp = jax.vjp(all_steps, params, us)
    total, du = vjp(g_next)
    return total, None, du


class BPTTResult(NamedTuple):
    """What `explicit_bptt` computed. Chain arrays have a leading chain axis (C, in the
    order of `chain_names`) and are in processing order.

    loss: the scalar loss.
    grads: dL/dparams, the same pytree as ``variables["params"]``.
    jacobians: (C, B, T, N, N), J_k = dS_{k+1}/dS_k (a `FactoredJacobians` with
      ``jacobian_method="factored"``).
    states: (C, B, T+1, N), S_0..S_T.
    state_grads: (C, B, T+1, N), g_k = dL/dS_k (index 0: the initial state).
    direct_grads: (C, B, T+1, N), d_k = the loss's direct dependence on S_k (for the lower
      layers of a bidirectional layer: through the layer above's input at that step).
    contributions: per-step share of ``grads``, the params pytree with a leading time axis
      (processing order of the chain owning each group); summed over time it is ``grads``.
      None with ``per_step=False``.
    input_grads: (B, T, I), dL/dx.
    """

    loss: Array
    grads: Any
    jacobians: Any
    states: Array
    state_grads: Array
    direct_grads: Array
    contributions: Any
    input_grads: Array


METHODS = ("recursion", "products")


@_compiled("loss_fn", "method", "jacobian_method", "per_step")
def explicit_bptt(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    loss_fn: LossFn,
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    method: str = "recursion",
    jacobian_method: str = "auto",
    per_step: bool = True,
    loss_args: tuple = (),
) -> BPTTResult:
    """The parameter gradient of ``loss_fn(*layer.apply(variables, x, ...))`` computed the
    way the notes write it, from the per-step Jacobians.

    1. Forward: every chain's states S_0..S_T (`trajectory`).
    2. Direct dependence d_k = partial L/partial S_k: autodiff of the *readout* only
       (outputs = h part of the states, final state = S_T), no recurrence inside.
    3. State gradients: ``method="recursion"`` g_k = d_k + J_k^T g_{k+1};
       ``method="products"`` g_k = sum_{j>=k} (J_{j-1}...J_k)^T d_j with every product of
       Jacobians materialised (O(T^2 N^3): small sizes only).
    4. dL/dpsi = sum_k (partial S_{k+1}/partial psi|_k)^T g_{k+1}: per-step parameter VJPs
       (``per_step=True`` keeps each step's share in ``contributions``; False sums them in
       one VJP, with less memory).

    A bidirectional layer is done top-down: each direction's chain as above, then the
    gradient w.r.t. its input (per-step input VJPs) is the lower layer's output gradient.

    Args:
      layer, variables, x, lengths, initial_state: as for ``layer.apply``.
      loss_fn: ``loss_fn(outputs, final_state) -> scalar`` (many-to-one: read
        ``outputs[:, -1]`` or ``final_state``; many-to-many: every step).
      jacobian_method: as `step_jacobians` (dense J), or ``"factored"``: J kept as
        `FactoredJacobians` and J_k^T g applied from the factors (same numbers, no N^2
        memory per step; single-cell chains).
      loss_args: extra arrays passed on, ``loss_fn(outputs, final_state, *loss_args)``
        (targets, a readout's weights): traced, not baked in, so one module-level
        ``loss_fn`` is compiled once for every value of them.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    st = _setup(layer, variables, x, lengths, initial_state)
    jmethod = _resolve_method(st.cell, jacobian_method, allow_factored=True)
    cell = st.cell
    fw = _forward(st)  # step 1

    def loss_of_states(states):
        return _scalar_loss(loss_fn, *_readout(st, states, fw.masks), loss_args)

    loss, direct = jax.value_and_grad(loss_of_states)(fw.states)  # step 2

    def run_chain(i, delta, ms):  # steps 3 and 4 for chain i; top-down through the layers
        d = direct[i]
        if delta is not None:  # dL/d(this chain's outputs) from the layer above
            if ms is not None:  # outputs are zero (constant) at padded steps
                delta = jnp.where(ms[..., None], delta, jnp.zeros_like(delta))
            d = d.at[1:, :, : cell.out].add(delta)
        r = _chain_bptt(
            cell, fw.params[i], fw.states[i], fw.inputs[i], ms, d, method, jmethod, per_step
        )
        return r, r.input_grads

    chains, input_grads = _layer_by_layer(st, run_chain, top_down=True)
    grads, contributions = {}, {}
    for ch, r in zip(st.chains, chains, strict=True):
        for k, group in enumerate(ch.groups):
            grads[group] = r.grads[k]
            contributions[group] = None if r.contributions is None else r.contributions[k]
    if jmethod == "factored":
        parts = [[r.jacobians[f] for r in chains] for f in range(4)]
        jacobians = FactoredJacobians(
            *(_stack(p) for p in parts[:3]), None if parts[3][0] is None else _stack(parts[3])
        )
    else:
        jacobians = _stack([r.jacobians for r in chains])
    grads = {g: grads[g] for g in rnn.layer_names(layer)}
    contributions = None if not per_step else {g: contributions[g] for g in grads}
    return BPTTResult(
        loss=loss,
        grads=grads,
        jacobians=jacobians,
        states=_stack([_batch_first(s) for s in fw.states]),
        state_grads=_stack([_batch_first(r.state_grads) for r in chains]),
        direct_grads=_stack([_batch_first(r.direct_grads) for r in chains]),
        contributions=contributions,
        input_grads=_batch_first(input_grads),
    )


class _ChainBPTT(NamedTuple):
    """One chain's share of `explicit_bptt` (processing order, time-major)."""

    jacobians: Any  # (B, T, N, N), or the factors (a_h, direct, weight_hh, masks (B, T))
    state_grads: Array  # (T+1, B, N) g_k
    direct_grads: Array  # (T+1, B, N) d_k
    grads: tuple  # per cell of the chain: its parameter gradient
    contributions: tuple | None  # per cell: per-step shares (leading T), or None
    input_grads: Array  # (T, B, I) dL/du_k


def _chain_bptt(cell, P, S, us, ms, d, method: str, jmethod: str, per_step: bool) -> _ChainBPTT:
    """Steps 3 and 4 of `explicit_bptt` for one chain with direct dependence ``d``."""
    T = us.shape[0]
    if jmethod == "factored":
        a_h, dr = _chain_factors(cell, P, S, us)
        W = P[0]["weight_hh"].astype(S.dtype)
        mT = None if ms is None else ms.T
        J = (a_h, dr, W, mT)

        def jt(k, u):
            take = lambda a: jax.lax.dynamic_index_in_dim(a, k, 1, keepdims=False)  # noqa: E731
            return _factored_rmatvec(take(a_h), take(dr), W, None if mT is None else take(mT), u)
    else:
        J = _chain_jacobians(cell, P, S, us, ms, jmethod)
        jt = _dense_rmatvec(J)
    if method == "recursion":
        g = _backward_recursion(jt, T, d)
    else:
        g = _backward_products(J if jmethod != "factored" else _dense_from_factors(*J), d)
    total, per, du = _step_vjps(cell, P, S[:-1], us, ms, g[1:], per_step)
    return _ChainBPTT(J, g, d, total, per, du)


class StateGradients(NamedTuple):
    """loss; state_grads (C, B, T+1, N) = dL/dS_k in processing order (`chain_names`)."""

    loss: Array
    state_grads: Array


@_compiled("loss_fn")
def state_gradients(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    loss_fn: LossFn,
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    loss_args: tuple = (),
) -> StateGradients:
    """dL/dS_k for every step, matrix-free: one ``jax.grad``.

    A zero perturbation eps_k is added to every state as it is formed; dL/d eps_k is then
    the total derivative dL/dS_k (the ``state_grads`` of `explicit_bptt`, without any
    Jacobian). Costs about one gradient; use it for lag curves at large hidden sizes.
    ``loss_args``: as in `explicit_bptt`.
    """
    st = _setup(layer, variables, x, lengths, initial_state)
    T, B = st.x.shape[:2]
    N = st.cell.n * (1 if st.cell.bidirectional else st.cell.num_layers)
    eps = [jnp.zeros((T + 1, B, N), st.dtype) for _ in st.chains]

    def loss_of(eps):
        fw = _forward(st, eps=eps)
        return _scalar_loss(loss_fn, *_readout(st, fw.states, fw.masks), loss_args)

    loss, g = jax.value_and_grad(loss_of)(eps)
    return StateGradients(loss, _stack([_batch_first(a) for a in g]))


def lag_curve(
    state_grads: Float[Array, "*lead time_plus_1 N"], *, reduce: str = "mean"
) -> Float[Array, "*out time_plus_1"]:
    """||dL/dS_{T-lag}|| indexed by lag = 0..T.

    ``state_grads``: (..., B, T+1, N) (e.g. ``result.state_grads`` of shape (C, B, T+1, N)).
    ``reduce``: ``"mean"`` over the batch axis (-3) -> (..., T+1); ``"geomean"``
    (exp of the mean log-norm, the average slope on a log plot); ``"none"`` keeps the batch.
    """
    norms = jnp.linalg.norm(state_grads, axis=-1)[..., ::-1]
    if reduce == "none":
        return norms
    if reduce == "mean":
        return norms.mean(axis=-2)
    if reduce == "geomean":
        return jnp.exp(jnp.log(norms).mean(axis=-2))
    raise ValueError(f"reduce: expected 'mean', 'geomean' or 'none', got {reduce!r}")


def log_slope(
    curve: Float[Array, " lags"] | np.ndarray, start: int = 1, stop: int | None = None
) -> float:
    """Least-squares slope of log(curve[lag]) against lag over ``start <= lag < stop``.

    Zero or non-finite entries (underflow) are left out. A curve that decays like
    sigma^lag has slope log(sigma).
    """
    c = np.asarray(curve, dtype=np.float64)
    lags = np.arange(c.shape[-1])
    sel = slice(start, stop)
    lags, c = lags[sel], c[sel]
    ok = np.isfinite(c) & (c > 0)
    if ok.sum() < 2:
        raise ValueError(
            f"curve: need at least two positive finite values in lags {start}..{stop}, "
            f"got {int(ok.sum())}"
        )
    return float(np.polyfit(lags[ok], np.log(c[ok]), 1)[0])
