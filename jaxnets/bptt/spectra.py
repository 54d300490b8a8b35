"""Spectra of the per-step Jacobians and of their products: singular values, the
Pascanu bound, Lyapunov exponents (QR and brute force), and matrix-free versions that
use JVPs / VJPs instead of dense J.

The product dS_T/dS_{T-lag} = J_{T-1} ... J_{T-lag} is what carries the gradient back
``lag`` steps (`jaxnets.bptt.explicit`); its singular values say how fast it vanishes or
explodes, and the Lyapunov exponents are their per-step growth rates.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets.bptt.chains import _batch_first, _chain_step, _compiled, _forward, _run, _setup


@jax.jit
def singular_values(jacobians: Float[Array, "*lead N N"]) -> Float[Array, "*lead N"]:
    """Singular values of each J_k, largest first: (..., N, N) -> (..., N)."""
    return jnp.linalg.svd(jacobians, compute_uv=False)


@jax.jit
def product_log_singular_values(
    jacobians: Float[Array, "*lead time N N"],
) -> Float[Array, "*lead time_plus_1 N"]:
    """log singular values of the products dS_T/dS_{T-lag} = J_{T-1} ... J_{T-lag}, lag
    0..T (lag 0: the identity), largest first.

    The products are accumulated from the end and renormalised at every step (the scale
    kept as a log), so long products neither underflow nor overflow.
    """
    *lead, T, N, _ = jacobians.shape
    Jt = jnp.moveaxis(jacobians, -3, 0)  # (T, *lead, N, N)
    eye = jnp.broadcast_to(jnp.eye(N, dtype=jacobians.dtype), (*lead, N, N))

    def body(carry, Jk):
        Q, logscale = carry
        P = Q @ Jk
        f = jnp.linalg.norm(P, axis=(-2, -1))
        f = jnp.where(f > 0, f, 1.0)
        Q = P / f[..., None, None]
        logscale = logscale + jnp.log(f)
        return (Q, logscale), (Q, logscale)

    zero = jnp.zeros(tuple(lead), jacobians.dtype)
    _, (Qs, logs) = jax.lax.scan(body, (eye, zero), Jt, reverse=True)
    # Qs[k] is the normalised dS_T/dS_k; reorder to lag = T - k and prepend lag 0
    Qs = jnp.concatenate([eye[None], Qs[::-1]], axis=0)
    logs = jnp.concatenate([zero[None], logs[::-1]], axis=0)
    out = jnp.log(jnp.linalg.svd(Qs, compute_uv=False)) + logs[..., None]
    return jnp.moveaxis(out, 0, -2)


def product_log_norms(
    jacobians: Float[Array, "*lead time N N"],
) -> Float[Array, "*lead time_plus_1"]:
    """log ||dS_T/dS_{T-lag}||_2 for lag 0..T (see `product_log_singular_values`)."""
    return product_log_singular_values(jacobians)[..., 0]


def pascanu_bound(
    weight_hh: Float[Array, "H H"], lags: Int[Array, " n"] | np.ndarray, gamma: float = 1.0
) -> Float[Array, " n"]:
    """Pascanu, Mikolov & Bengio (2013): for h_t = f(W_hh h_{t-1} + ...),
    ||dh_t/dh_k||_2 <= (sigma_max(W_hh) * gamma)^(t-k) with gamma = max|f'| (1 for tanh).

    Returns the bound at each lag t - k.
    """
    shape = np.shape(weight_hh)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"weight_hh: expected a square (H, H) matrix (an RNN's recurrent weight), "
            f"got shape {shape}"
        )
    return _pascanu(jnp.asarray(weight_hh), jnp.asarray(lags), gamma)


@jax.jit
def _pascanu(w, lags, gamma):
    return (jnp.linalg.norm(w, ord=2) * gamma) ** lags.astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("num", "burn_in"))
def lyapunov_spectrum(
    jacobians: Float[Array, "*lead time N N"], num: int | None = None, *, burn_in: int = 0
) -> Float[Array, "*lead num"]:
    """Lyapunov exponents (per step, natural log) of the Jacobian products, largest first.

    Repeated QR (Benettin et al. 1980; Shimada & Nagashima 1979): Q_0 = the first ``num``
    columns of I, then Z = J_k Q_k, Z = Q_{k+1} R_k and lambda_i = mean_k log|R_k[i, i]|
    over steps k >= ``burn_in``. ``num`` defaults to N (the full spectrum, whose sum is the
    mean of log|det J_k|).
    """
    *lead, T, N, _ = jacobians.shape
    num = N if num is None else int(num)
    if not 1 <= num <= N:
        raise ValueError(f"num: expected 1..{N} (the state size), got {num}")
    if not 0 <= burn_in < T:
        raise ValueError(f"burn_in: expected 0..{T - 1} (fewer than the {T} steps), got {burn_in}")
    Jt = jnp.moveaxis(jacobians, -3, 0)
    Q0 = jnp.broadcast_to(jnp.eye(N, num, dtype=jacobians.dtype), (*lead, N, num))

    def body(Q, Jk):
        Q, R = jnp.linalg.qr(Jk @ Q)
        return Q, jnp.log(jnp.abs(jnp.diagonal(R, axis1=-2, axis2=-1)))

    _, logs = jax.lax.scan(body, Q0, Jt)
    return logs[burn_in:].mean(axis=0)


@_compiled("eps", "burn_in")
def largest_lyapunov_bruteforce(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    eps: float = 1e-7,
    direction: Array | None = None,
    burn_in: int = 0,
) -> Float[Array, "chains batch"]:
    """Largest Lyapunov exponent from a perturbed trajectory, no Jacobians (Benettin):
    run S'_k = S_k + eps v_k beside the trajectory, grow it one step with the nonlinear
    step, log(||S'_{k+1} - S_{k+1}|| / eps) is the growth, renormalise, average.

    ``direction``: the first perturbation (N,) or (B, N); default e_1. An independent check
    of `lyapunov_spectrum` (use float64: the differences are of size eps).
    """
    st = _setup(layer, variables, x, lengths, initial_state)
    fw = _forward(st)
    out = []
    for P, S, us, ms in zip(fw.params, fw.states, fw.inputs, fw.masks, strict=True):
        B, N = S.shape[1], S.shape[2]
        v = (
            jnp.zeros((B, N), st.dtype).at[:, 0].set(1.0)
            if direction is None
            else (jnp.broadcast_to(jnp.asarray(direction, st.dtype), (B, N)))
        )
        logs = _perturbed_growth(st.cell, P, S, us, ms, v, eps)
        out.append(logs[burn_in:].mean(axis=0))
    return jnp.stack(out)


def _perturbed_growth(cell, P, S, us, ms, v, eps: float) -> Array:
    """log(||F(S_k + eps v_k) - S_{k+1}|| / eps) for every step, v renormalised each step."""
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    def body(v, inp):
        s, s_next, u, m = inp
        delta = _chain_step(cell, P, s + eps * v, u, m) - s_next
        r = jnp.linalg.norm(delta, axis=-1, keepdims=True)
        return delta / r, jnp.log(r[..., 0] / eps)

    return jax.lax.scan(body, v, (S[:-1], S[1:], us, ms))[1]


@_compiled("k", "iters", "oversample")
def matrix_free_singular_values(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    k: int = 1,
    iters: int = 30,
    oversample: int = 4,
    key: jax.Array | None = None,
) -> Float[Array, "chains batch time k"]:
    """Top-``k`` singular values of every J_k without forming it.

    Subspace iteration on J^T J (r = k + ``oversample`` vectors, QR each iteration), J v by
    ``jax.linearize`` (a JVP) and J^T u by its transpose (a VJP), then Rayleigh-Ritz: the
    singular values of J V. Memory O(N r) per step instead of O(N^2).
    """
    st = _setup(layer, variables, x, lengths, initial_state)
    fw = _forward(st)
    key = jax.random.key(0) if key is None else key
    out = []
    for P, S, us, ms in zip(fw.params, fw.states, fw.inputs, fw.masks, strict=True):
        N = S.shape[-1]
        if not 1 <= k <= N:
            raise ValueError(f"k: expected 1..{N} (the state size), got {k}")
        r = min(N, k + oversample)
        V0 = jnp.linalg.qr(jax.random.normal(key, (N, r), st.dtype))[0]

        def one(s, u, m, V0=V0, P=P):
            _, jvp = jax.linearize(lambda s_: _chain_step(st.cell, P, s_, u, m), s)
            vjp = jax.linear_transpose(jvp, s)
            mv = jax.vmap(jvp, in_axes=1, out_axes=1)
            rmv = jax.vmap(lambda c: vjp(c)[0], in_axes=1, out_axes=1)
            V = jax.lax.fori_loop(0, iters, lambda _, V: jnp.linalg.qr(rmv(mv(V)))[0], V0)
            return jnp.linalg.svd(mv(V), compute_uv=False)[:k]

        out.append(_batch_first(jax.vmap(jax.vmap(one))(S[:-1], us, ms)))
    return jnp.stack(out)


@_compiled("lags", "iters")
def matrix_free_product_norms(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    lags: Sequence[int],
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    iters: int = 30,
    key: jax.Array | None = None,
) -> Float[Array, "chains batch lags"]:
    """||dS_T/dS_{T-lag}||_2 for each lag in ``lags``, by power iteration on P^T P where
    P v is a JVP through the last ``lag`` steps and P^T u its transpose (a VJP): no
    Jacobian is formed. Cost per lag: ``iters`` forward and backward passes over ``lag``
    steps.
    """
    st = _setup(layer, variables, x, lengths, initial_state)
    fw = _forward(st)
    key = jax.random.key(0) if key is None else key
    T = st.x.shape[0]
    lags = [int(lag) for lag in lags]
    bad = [lag for lag in lags if not 0 <= lag <= T]
    if bad:
        raise ValueError(f"lags: expected values in 0..{T} (the number of steps), got {bad}")
    out = []
    for P, S, us, ms in zip(fw.params, fw.states, fw.inputs, fw.masks, strict=True):
        per_lag = [
            _product_norm(st.cell, P, S, us, ms, lag, jax.random.fold_in(key, lag), iters)
            for lag in lags
        ]
        out.append(jnp.stack(per_lag, axis=-1))
    return jnp.stack(out)


def _product_norm(cell, P, S, us, ms, lag: int, key, iters: int) -> Array:
    """||dS_T/dS_{T-lag}||_2 per example by power iteration through JVP/VJP of the window."""
    T, B, N = S.shape[0] - 1, S.shape[1], S.shape[2]
    if lag == 0:
        return jnp.ones((B,), S.dtype)
    k0 = T - lag

    def window(S0):
        return _run(cell, P, S0, us[k0:], None if ms is None else ms[k0:])[0][-1]

    _, jvp = jax.linearize(window, S[k0])
    vjp = jax.linear_transpose(jvp, S[k0])

    def it(_, v):
        w = vjp(jvp(v))[0]
        return w / jnp.linalg.norm(w, axis=-1, keepdims=True)

    v = jax.random.normal(key, (B, N), S.dtype)
    v = jax.lax.fori_loop(0, iters, it, v / jnp.linalg.norm(v, axis=-1, keepdims=True))
    return jnp.linalg.norm(jvp(v), axis=-1)
