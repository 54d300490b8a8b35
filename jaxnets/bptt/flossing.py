"""Gradient flossing (Engelken, NeurIPS 2023): a differentiable Lyapunov spectrum of a
recurrent layer's own trajectory, and training that pushes its top exponents to a target.

The maths. A recurrent layer moves its state s (h; for the LSTM the stacked [h; c], as in
`jaxnets.bptt.chains`; a unidirectional stack stacks every layer's state) by
s_{t+1} = F(s_t, x_t; psi), with per-step Jacobian J_t = dF/ds at (s_t, x_t). The top-k
Lyapunov exponents are the growth rates of k-dimensional volumes under the product
J_{T-1} ... J_0, computed by repeated QR (Benettin et al. 1980):

    Q_0 = first k columns of I (N x k),
    Z = J_{t+m-1} ... J_t Q_t  (m = ``qr_every`` JVPs, never a dense N x N Jacobian),
    Z = Q_{t+m} R_t,  lambda_i = (1 / #steps) * sum_t log |R_t[i, i]|

over the intervals that start at or after ``burn_in``. Because the product of upper
triangular R's has the product of their diagonals on its diagonal, any ``qr_every`` gives
the same exponents in exact arithmetic; re-orthonormalising often keeps Z well conditioned.
Each J_t Q_t is k Jacobian-vector products of the step (``jax.linearize``), so the cost is
O(k) steps' worth of work per step, not O(N).

Where the gradient flows: ``jax.grad`` of a function of the exponents goes back through
log|diag R|, through every QR (JAX's QR has a VJP), through the JVPs J_t Q_t (which depend
on psi directly and through the states s_t), and through the trajectory s_t itself. The
flossing loss is

    L_floss(psi) = mean over sequences of sum_{i <= k} (lambda_i(psi) - target)^2,

and gradient flossing is gradient descent on it: for some steps before task training
("preflossing") and for a few steps every M task steps ("interflossing"). With target 0
the long-time Jacobian products neither shrink nor grow in k directions, so the task's
BPTT gradient neither vanishes nor explodes along them.

Entry points: `lyapunov_exponents` (differentiable, per sequence), `flossing_loss`,
`Flossing` (the training option: k, target, QR interval, preflossing and interflossing
steps), `floss_step` / `floss` (Adam on the flossing loss), `leading_exponents` (what
``--track-lyapunov`` logs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from jaxnets import rnn

__all__ = [
    "Flossing",
    "floss",
    "floss_step",
    "flossing_loss",
    "leading_exponents",
    "lyapunov_hook",
    "lyapunov_exponents",
    "state_size",
]


# ---------------------------------------------------------------------------------------
# The chain: the layer's stacked state and its step
# ---------------------------------------------------------------------------------------


def _check_layer(layer) -> None:
    if not isinstance(layer, rnn.RNN | rnn.LSTM | rnn.GRU):
        raise TypeError(
            f"layer: expected a jaxnets.rnn.RNN, LSTM or GRU, got {type(layer).__name__}"
        )
    if layer.bidirectional:
        raise ValueError(
            "layer: flossing needs a unidirectional layer (one forward-in-time chain), "
            "got bidirectional=True"
        )


def _cell_size(layer) -> tuple[int, int]:
    """(out, n): the h size and one cell's flattened state size ([h; c] for the LSTM)."""
    out = int(layer.output_size)
    return out, out + (int(layer.hidden_size) if layer.mode == "LSTM" else 0)


def state_size(layer: nn.Module) -> int:
    """N, the size of the state whose exponents are computed: num_layers * (H, or P + H
    for the LSTM)."""
    _check_layer(layer)
    return int(layer.num_layers) * _cell_size(layer)[1]


def _chain_step(layer, params: tuple, S: Array, u: Array) -> Array:
    """S' = F(S, u) for the stacked state S (..., L*n); layer l reads layer l-1's new h."""
    step = rnn.step_function(layer)
    out, n = _cell_size(layer)
    lstm = layer.mode == "LSTM"
    new, inp = [], u
    for k, p in enumerate(params):
        s = S[..., k * n : (k + 1) * n]
        carry, inp = step(p, (s[..., :out], s[..., out:]) if lstm else s, inp)
        new.append(jnp.concatenate(carry, axis=-1) if lstm else carry)
    return new[0] if len(new) == 1 else jnp.concatenate(new, axis=-1)


def _initial(layer, initial_state, batch: int, dtype) -> Array:
    """(B, L*n) stacked initial state from PyTorch-shaped ``initial_state`` (or zeros)."""
    L = int(layer.num_layers)
    N = state_size(layer)
    if initial_state is None:
        return jnp.zeros((batch, N), dtype)
    parts = initial_state if layer.mode == "LSTM" else (initial_state,)
    out, n = _cell_size(layer)
    want = [(L, batch, out)] + ([(L, batch, n - out)] if layer.mode == "LSTM" else [])
    got = [tuple(np.shape(a)) for a in parts]
    if got != want:
        raise ValueError(
            f"initial_state: expected shape(s) {want} (num_layers, batch, size), got {got}"
        )
    per_layer = [jnp.concatenate([a[i] for a in parts], axis=-1) for i in range(L)]
    return jnp.concatenate(per_layer, axis=-1).astype(dtype)


def _check_args(layer, variables, x, k, qr_every, burn_in) -> tuple:
    _check_layer(layer)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "variables: expected the dict returned by layer.init, with a 'params' entry; "
            f"got {type(variables).__name__}"
        )
    names = rnn.layer_names(layer)
    missing = [g for g in names if g not in variables["params"]]
    if missing:
        raise ValueError(
            f"variables['params']: expected groups {names} for this layer, missing {missing}"
        )
    if np.ndim(x) != 3:
        raise ValueError(
            f"x: expected a 3-D array (batch, time, features), got shape {tuple(np.shape(x))}"
        )
    T = np.shape(x)[1]
    N = state_size(layer)
    for name, v in (("k", k), ("qr_every", qr_every)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if k > N:
        raise ValueError(f"k: expected 1..{N} (the state size), got {k}")
    if not isinstance(burn_in, int | np.integer) or not 0 <= burn_in < T:
        raise ValueError(f"burn_in: expected an int in 0..{T - 1} (x has {T} steps), got {burn_in}")
    p = variables["params"]
    w = p[names[0]]["weight_ih"]
    if np.shape(x)[-1] != np.shape(w)[-1]:
        raise ValueError(
            f"x: expected {np.shape(w)[-1]} features (the layer's input size), got "
            f"{np.shape(x)[-1]}"
        )
    return tuple(p[g] for g in names)


# ---------------------------------------------------------------------------------------
# Differentiable Lyapunov exponents
# ---------------------------------------------------------------------------------------


def _unit_upper_inverse(U: Array) -> Array:
    """(I + N)^{-1} for strictly upper triangular N = U - I (k x k): N^k = 0, so
    (I + N)^{-1} = (I - N)(I + N^2)(I + N^4)... with ceil(log2 k) factors, exactly. Matrix
    products only: XLA's CPU triangular solve is ~50x slower than this at k ~ 40."""
    k = U.shape[-1]
    eye = jnp.eye(k, dtype=U.dtype)
    M = eye - U  # -N
    P = eye + M
    span = 1
    while 2 * span < k:
        M = M @ M
        P = P @ (eye + M)
        span *= 2
    return P


def _r_inverse(R: Array) -> Array:
    """R^{-1} of an invertible upper triangular R = (I + N) D (columns scaled by the
    diagonal D): R^{-1} = D^{-1} (I + N)^{-1}."""
    d = jnp.diagonal(R)
    return _unit_upper_inverse(R / d[None, :]) / d[:, None]


@jax.custom_vjp
def _qr(A: Array) -> tuple[Array, Array]:
    """Reduced QR of a tall A (m x k, m >= k), differentiable. The VJP is the standard one
    (e.g. Walter & Lehmann 2018): with M = R dR^T - dQ^T Q and copyltu(M) = tril(M) +
    tril(M, -1)^T, dA = (dQ + Q copyltu(M)) R^{-T}; R^{-1} from `_r_inverse`."""
    Q, R = jnp.linalg.qr(A)
    return Q, R


def _qr_fwd(A):
    Q, R = jnp.linalg.qr(A)
    return (Q, R), (Q, R)


def _qr_bwd(res, ct):
    Q, R = res
    dQ, dR = ct
    M = R @ dR.T - dQ.T @ Q
    M = jnp.tril(M) + jnp.tril(M, -1).T
    return ((dQ + Q @ M) @ _r_inverse(R).T,)


_qr.defvjp(_qr_fwd, _qr_bwd)


def _intervals(T: int, m: int, burn_in: int) -> tuple[int, int, np.ndarray, int]:
    """(full intervals, remainder length, counted mask over all intervals, counted steps)."""
    n_full, rem = divmod(T, m)
    starts = np.arange(n_full + (1 if rem else 0)) * m
    lengths = np.full(starts.shape, m)
    if rem:
        lengths[-1] = rem
    counted = starts >= burn_in
    return n_full, rem, counted, int(lengths[counted].sum())


def _exponents_one(layer, params, S0, xs, Q0, qr_every: int, burn_in: int) -> Array:
    """Top-k exponents of one sequence: S0 (N,), xs (T, I), Q0 (N, k) -> (k,)."""
    T = xs.shape[0]
    n_full, rem, counted, steps = _intervals(T, qr_every, burn_in)

    def advance(carry, u):
        S, Q = carry
        S1, lin = jax.linearize(lambda s: _chain_step(layer, params, s, u), S)
        return (S1, jax.vmap(lin, in_axes=1, out_axes=1)(Q)), None

    def interval(carry, us):
        (S, Q), _ = jax.lax.scan(advance, carry, us)
        Q, R = _qr(Q)
        return (S, Q), jnp.log(jnp.abs(jnp.diagonal(R)))

    carry = (S0, Q0)
    logs = []
    if n_full:
        us = xs[: n_full * qr_every].reshape(n_full, qr_every, -1)
        carry, lg = jax.lax.scan(interval, carry, us)
        logs.append(lg)
    if rem:
        carry, lg = interval(carry, xs[n_full * qr_every :])
        logs.append(lg[None])
    logs = jnp.concatenate(logs, axis=0)  # (intervals, k)
    return logs[np.flatnonzero(counted)].sum(axis=0) / steps


@functools.partial(jax.jit, static_argnames=("layer", "k", "qr_every", "burn_in"))
def _exponents(layer, params, x, S0, Q0, k, qr_every, burn_in):
    xs = jnp.asarray(x, S0.dtype)
    return jax.vmap(lambda s0, x1: _exponents_one(layer, params, s0, x1, Q0, qr_every, burn_in))(
        S0, xs
    )


def lyapunov_exponents(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    k: int,
    *,
    qr_every: int = 1,
    burn_in: int = 0,
    initial_state: Any = None,
    key: jax.Array | None = None,
) -> Float[Array, "batch k"]:
    """The top-``k`` Lyapunov exponents (per step, natural log) of each sequence's
    trajectory, by JVPs and a QR every ``qr_every`` steps inside ``lax.scan``;
    differentiable with ``jax.grad`` (see the module docstring).

    ``layer``: a unidirectional `jaxnets.rnn.RNN`, `GRU` or `LSTM` (any ``num_layers``:
    the stacked state). ``initial_state`` in PyTorch's shapes (default zeros). ``Q_0`` is
    the first k columns of I (what `jaxnets.bptt.lyapunov_spectrum` uses), or with ``key``
    a random orthonormal frame. Intervals starting before ``burn_in`` are left out.
    Returns (B, k), in the order QR produces them (largest first once converged).
    """
    params = _check_args(layer, variables, x, k, qr_every, burn_in)
    dtype = jnp.result_type(x, *jax.tree.leaves(params))
    B = np.shape(x)[0]
    N = state_size(layer)
    S0 = _initial(layer, initial_state, B, dtype)
    if key is None:
        Q0 = jnp.eye(N, k, dtype=dtype)
    else:
        Q0 = jnp.linalg.qr(jax.random.normal(key, (N, k), dtype))[0]
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return _exponents(layer, params, x, S0, Q0, int(k), int(qr_every), int(burn_in))


def flossing_loss(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    k: int,
    *,
    target: float = 0.0,
    qr_every: int = 1,
    burn_in: int = 0,
    initial_state: Any = None,
) -> tuple[Array, Float[Array, "batch k"]]:
    """``(loss, exponents)``: loss = mean over sequences of sum_i (lambda_i - target)^2
    over the top ``k`` exponents of `lyapunov_exponents`."""
    lam = lyapunov_exponents(
        layer, variables, x, k, qr_every=qr_every, burn_in=burn_in, initial_state=initial_state
    )
    return jnp.sum((lam - target) ** 2, axis=-1).mean(), lam


def leading_exponents(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    k: int = 1,
    *,
    burn_in: int = 0,
    qr_every: int = 1,
) -> dict[str, float]:
    """``{"lyapunov_1": ..., ..., "lyapunov_k": ...}``: the top exponents averaged over the
    batch, as plain floats (what ``--track-lyapunov`` writes to metrics.jsonl)."""
    lam = np.asarray(
        jax.device_get(
            lyapunov_exponents(layer, variables, x, k, qr_every=qr_every, burn_in=burn_in)
        )
    ).mean(axis=0)
    return {f"lyapunov_{i + 1}": float(v) for i, v in enumerate(lam)}


def lyapunov_hook(
    layer: nn.Module,
    x: Float[Array, "batch time features"],
    k: int = 1,
    *,
    burn_in: int = 0,
    qr_every: int = 1,
    params_key: str | None = "rnn",
):
    """``hook(state) -> {"lyapunov_1": ..., ...}`` for ``Trainer.fit(eval_hook=...)``: the
    top ``k`` exponents of ``layer`` with ``state.params[params_key]`` (the whole params
    with ``params_key=None``) on the fixed inputs ``x``, logged at every eval."""
    _check_layer(layer)

    def hook(state) -> dict[str, float]:
        p = state.params if params_key is None else state.params[params_key]
        return leading_exponents(layer, {"params": p}, x, k, burn_in=burn_in, qr_every=qr_every)

    return hook


# ---------------------------------------------------------------------------------------
# The training option
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flossing:
    """Gradient-flossing settings.

    k, target: the top k exponents are pushed to ``target`` (per step, natural log).
    qr_every: QR interval (steps). burn_in: steps of each flossing trajectory left out of
    the exponents. lr: Adam learning rate of the flossing updates (its own optimiser
    state, kept across episodes). pre_steps: flossing updates before task training.
    inter_every, inter_steps, inter_times: every ``inter_every`` task steps, run
    ``inter_steps`` flossing updates, at most ``inter_times`` times (0: no limit);
    ``inter_every=0`` turns interflossing off.
    """

    k: int = 32
    target: float = 0.0
    qr_every: int = 1
    burn_in: int = 10
    lr: float = 1e-3
    pre_steps: int = 500
    inter_every: int = 0
    inter_steps: int = 0
    inter_times: int = 0

    def __post_init__(self):
        for name in ("k", "qr_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Flossing.{name}: expected a positive int, got {v!r}")
        for name in ("burn_in", "pre_steps", "inter_every", "inter_steps", "inter_times"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Flossing.{name}: expected an int >= 0, got {v!r}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Flossing.lr: expected a positive learning rate, got {self.lr!r}")
        if not np.isfinite(self.target):
            raise ValueError(f"Flossing.target: expected a finite number, got {self.target!r}")
        if self.inter_every and not self.inter_steps:
            raise ValueError(
                f"Flossing.inter_steps: expected > 0 with inter_every={self.inter_every}, got 0"
            )

    def tx(self) -> optax.GradientTransformation:
        return optax.adam(self.lr)

    def episodes(self, num_steps: int) -> list[tuple[int, int]]:
        """``[(task_step, flossing_updates), ...]``: before task step ``task_step`` run that
        many flossing updates (preflossing at 0, then interflossing)."""
        out = [(0, self.pre_steps)] if self.pre_steps else []
        if self.inter_every:
            at = list(range(self.inter_every, num_steps, self.inter_every))
            if self.inter_times:
                at = at[: self.inter_times]
            out += [(s, self.inter_steps) for s in at]
        return out


def floss_step(layer: nn.Module, cfg: Flossing):
    """``step(params, opt_state, x) -> (params, opt_state, loss, exponents)``: one Adam
    update of the layer's params (``variables["params"]``) on `flossing_loss` of batch x
    (B, T, I). Pure and jit/vmap/scan-able; ``cfg.tx().init(params)`` starts the state."""
    tx = cfg.tx()

    def step(params, opt_state, x):
        def loss_of(p):
            lam = _exponents(
                layer,
                tuple(p[g] for g in rnn.layer_names(layer)),
                x,
                jnp.zeros((x.shape[0], state_size(layer)), x.dtype),
                jnp.eye(state_size(layer), cfg.k, dtype=x.dtype),
                cfg.k,
                cfg.qr_every,
                cfg.burn_in,
            )
            return jnp.sum((lam - cfg.target) ** 2, axis=-1).mean(), lam

        (loss, lam), g = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, lam

    return step


def floss(
    layer: nn.Module,
    variables: Mapping,
    xs: Float[Array, "steps batch time features"],
    cfg: Flossing,
    opt_state: Any = None,
) -> tuple[dict, Any, Array, Array]:
    """Run ``len(xs)`` flossing updates, one per batch ``xs[i]`` (B, T, I), as one
    compiled ``lax.scan``. Returns ``(variables, opt_state, losses (steps,),
    exponents (steps, B, k))``; pass ``opt_state`` back in to continue."""
    if np.ndim(xs) != 4:
        raise ValueError(
            f"xs: expected (steps, batch, time, features) batches, got shape {np.shape(xs)}"
        )
    params = variables["params"]
    _check_args(layer, variables, xs[0], cfg.k, cfg.qr_every, cfg.burn_in)
    if opt_state is None:
        opt_state = cfg.tx().init(params)
    params, opt_state, losses, lams = _floss_scan(layer, cfg, params, opt_state, xs)
    return {**variables, "params": params}, opt_state, losses, lams


@functools.partial(jax.jit, static_argnames=("layer", "cfg"))
def _floss_scan(layer, cfg, params, opt_state, xs):
    step = floss_step(layer, cfg)

    def body(carry, x):
        p, o, loss, lam = step(*carry, x)
        return (p, o), (loss, lam)

    (params, opt_state), (losses, lams) = jax.lax.scan(body, (params, opt_state), xs)
    return params, opt_state, losses, lams
