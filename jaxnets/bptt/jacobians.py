"""Per-step Jacobians J_k = dS_{k+1}/dS_k of a chain, dense or factored.

The step is pure, so J_k needs only (S_k, x_k): every J_k is computed from the stored
trajectory, vmapped over batch and time. ``jacfwd`` / ``jacrev`` differentiate the step
(N tangents each); ``structured`` uses the cells' affine-then-unit-wise form (a few JVPs
per step, `_cell_factors`); `FactoredJacobians` keeps those factors instead of J, the same
numbers in O(T G n) memory instead of O(T n^2).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxnets.bptt.chains import (
    _Cell,
    _chain_step,
    _compiled,
    _Forward,
    _forward,
    _Setup,
    _setup,
    _stack,
)

JACOBIAN_METHODS = ("auto", "structured", "jacfwd", "jacrev")


def _cell_factors(cell: _Cell, p: Mapping, s: Array, u: Array):
    """Exact factors of one unmasked cell step's Jacobians, one example.

    s (n,), u (I,) -> ``a_h`` (G, n), ``direct`` (nb, n), ``a_i`` (G, n), with

        d s'[(o, j)] / d h[i]     = sum_g a_h[g, (o, j)] * W_hh[g*H + j, i]
        d s'[(o, j)] / d s[(q, j)] += direct[q, (o, j)]             (unit-wise part)
        d s'[(o, j)] / d u[i]     = sum_g a_i[g, (o, j)] * W_ih[g*H + j, i]

    (o, q index the state blocks h, c; j the unit). Needs ``out == hidden``.

    Why: ``jacfwd`` pushes n identity tangents through ``W_hh h``, n matrix-vector
    products per step (n^3). These cells are affine-then-unit-wise: with
    gi = W_ih u + b_ih and gh = W_hh h + b_hh, unit j of h' (and of c') reads only unit j
    of every gate of gi and gh and unit j of the old state. So one tangent per gate on the
    biases (the same as on gi / gh) gives every d s'/d gate as a vector, and one tangent
    per state block gives the unit-wise direct part (e.g. z for the GRU); on the h block
    the opposite tangent on b_hh cancels what would reach W_hh h. A few JVPs per step
    instead of n; the tests compare with ``jacfwd`` and finite differences for every cell.
    """
    H, G = cell.hidden, cell.gates
    dtype = s.dtype
    if "bias_ih" not in p:  # zero biases change no value and give us the handles
        zero = jnp.zeros((G * H,), dtype)
        p = {**p, "bias_ih": zero, "bias_hh": zero}
    carry = cell.unflatten(s)

    def of_biases(b_ih, b_hh):
        return cell.flatten(cell.step({**p, "bias_ih": b_ih, "bias_hh": b_hh}, carry, u)[0])

    gate_t = jnp.repeat(jnp.eye(G, dtype=dtype), H, axis=1)  # (G, G*H): ones on gate g
    zeros_t = jnp.zeros_like(gate_t)
    tangents = (jnp.concatenate([gate_t, zeros_t]), jnp.concatenate([zeros_t, gate_t]))
    resp = jax.vmap(lambda ti, th: jax.jvp(of_biases, (p["bias_ih"], p["bias_hh"]), (ti, th))[1])(
        *tangents
    )
    a_i, a_h = resp[:G], resp[G:]

    def of_h(h_, b_hh):
        c = h_ if cell.mode != "LSTM" else (h_, carry[1])
        return cell.flatten(cell.step({**p, "bias_hh": b_hh}, c, u)[0])

    ones = jnp.ones((H,), dtype)
    h = carry[0] if cell.mode == "LSTM" else carry
    direct = [jax.jvp(of_h, (h, p["bias_hh"]), (ones, -(ones @ p["weight_hh"].T)))[1]]
    if cell.mode == "LSTM":  # c never meets a matmul: a plain tangent on c
        direct.append(
            jax.jvp(lambda c_: cell.flatten(cell.step(p, (h, c_), u)[0]), (carry[1],), (ones,))[1]
        )
    return a_h, jnp.stack(direct), a_i


def _dense_from_factors(a_h: Array, direct: Array, weight_hh: Array, m) -> Array:
    """Assemble dense J from `_cell_factors` output with any leading axes.

    a_h (*lead, G, n), direct (*lead, nb, n), weight_hh (G*H, H), m (*lead) or None ->
    (*lead, n, n). Written as broadcasts unrolled over the gates so XLA emits one fused
    loop: this is memory-bound (n^2 per step), and an einsum under vmap becomes a batched
    dot with tiny contractions.
    """
    *lead, G, n = a_h.shape
    H = weight_hh.shape[-1]
    nb = n // H
    one = (1,) * len(lead)  # explicit broadcasts (rank promotion is an error here)
    a = a_h.reshape(*lead, G, nb, H)
    W = weight_hh.reshape(G, *one, 1, H, H)
    D_h = sum(a[..., g, :, :, None] * W[g] for g in range(G))  # (*lead, o, j, i)
    full = jnp.stack([D_h] + [jnp.zeros_like(D_h)] * (nb - 1), axis=-2)  # (*lead, o, j, q, i)
    diag = jnp.moveaxis(direct.reshape(*lead, nb, nb, H), -3, -1)  # (*lead, o, j, q)
    eye = jnp.eye(H, dtype=full.dtype).reshape(*one, 1, H, 1, H)
    J = (full + diag[..., None] * eye).reshape(*lead, n, n)
    if m is None:
        return J
    return jnp.where(m[..., None, None], J, jnp.eye(n, dtype=J.dtype).reshape(*one, n, n))


def _factored_rmatvec(a_h, direct, weight_hh, m, u):
    """J^T u from the factors without forming J: one (G*H, H) matvec per step."""
    *lead, G, n = a_h.shape
    H = weight_hh.shape[-1]
    nb = n // H
    uo = u.reshape(*lead, 1, nb, H)
    c = (a_h.reshape(*lead, G, nb, H) * uo).sum(-2).reshape(*lead, G * H)
    r = (direct.reshape(*lead, nb, nb, H) * uo).sum(-2)  # (*lead, q, H)
    r = r.at[..., 0, :].add(c @ weight_hh).reshape(*lead, n)
    return r if m is None else jnp.where(m[..., None], r, u)


def _factored_matvec(a_h, direct, weight_hh, m, v):
    """J v from the factors without forming J."""
    *lead, G, n = a_h.shape
    H = weight_hh.shape[-1]
    nb = n // H
    vq = v.reshape(*lead, nb, H)
    Wv = (vq[..., 0, :] @ weight_hh.T).reshape(*lead, G, 1, H)
    r = (a_h.reshape(*lead, G, nb, H) * Wv).sum(-3)  # (*lead, o, H)
    r = r + (direct.reshape(*lead, nb, nb, H) * vq[..., :, None, :]).sum(-3)
    r = r.reshape(*lead, n)
    return r if m is None else jnp.where(m[..., None], r, v)


class FactoredJacobians(NamedTuple):
    """Every per-step Jacobian J_k of single-cell chains, exactly, in O(T G n) memory.

    With H units, G gates, n = nb * H (nb = 2 state blocks [h; c] for the LSTM, else 1)::

        J_k[(o, j), (0, i)]  = sum_g gates[k, g, (o, j)] * weight_hh[g*H + j, i]
        J_k[(o, j), (q, j)] += direct[k, q, (o, j)]

    and J_k = I where ``masks`` is False (padded steps).

    gates: (C, B, T, G, n); direct: (C, B, T, nb, n); weight_hh: (C, G*H, H);
    masks: (C, B, T) bool or None. ``dense()`` -> (C, B, T, n, n) (what `step_jacobians`
    returns); ``matvec(v)`` / ``rmatvec(u)``: J_k v_k / J_k^T u_k for v, u of shape
    (C, B, T, n), at the cost of one matrix-vector product with W_hh each.
    """

    gates: Array
    direct: Array
    weight_hh: Array
    masks: Array | None

    def _each(self, fn, *args):
        m = [None] * self.gates.shape[0] if self.masks is None else list(self.masks)
        return jnp.stack(
            [
                fn(self.gates[c], self.direct[c], self.weight_hh[c], m[c], *(a[c] for a in args))
                for c in range(self.gates.shape[0])
            ]
        )

    def dense(self) -> Array:
        return _fj_dense(self)

    def matvec(self, v: Array) -> Array:
        return _fj_matvec(self, v)

    def rmatvec(self, u: Array) -> Array:
        return _fj_rmatvec(self, u)


@jax.jit
def _fj_dense(fj: FactoredJacobians) -> Array:
    return fj._each(_dense_from_factors)


@jax.jit
def _fj_matvec(fj: FactoredJacobians, v: Array) -> Array:
    return fj._each(_factored_matvec, v)


@jax.jit
def _fj_rmatvec(fj: FactoredJacobians, u: Array) -> Array:
    return fj._each(_factored_rmatvec, u)


def _structured_jacobian(cell: _Cell, params: tuple, S: Array, u: Array, m) -> Array:
    """dS'/dS (N, N) of a stacked chain step for one example, from `_cell_factors`.

    Block row l: D_l at column block l plus, through layer l's input u^l = h part of
    s^{l-1}', C_l @ (h rows of block row l-1), with C_l = d s^l'/d u^l.
    """
    n, N = cell.n, S.shape[-1]
    rows, prev, inp = [], None, u
    for k, p in enumerate(params):
        s = S[k * n : (k + 1) * n]
        a_h, direct, a_i = _cell_factors(cell, p, s, inp)
        D = _dense_from_factors(a_h, direct, p["weight_hh"], None)
        blk = jnp.zeros((n, N), D.dtype).at[:, k * n : (k + 1) * n].set(D)
        if prev is not None:
            W_ih = p["weight_ih"].reshape(cell.gates, 1, cell.hidden, -1)
            C = (a_i.reshape(cell.gates, -1, cell.hidden, 1) * W_ih).sum(0).reshape(n, -1)
            blk = blk + C @ prev[: cell.out]
        rows.append(blk)
        prev = blk
        inp = cell.step(p, cell.unflatten(s), inp)[1]
    J = jnp.concatenate(rows, axis=0)
    return J if m is None else jnp.where(m, J, jnp.eye(N, dtype=J.dtype))


def _resolve_method(cell: _Cell, method: str, allow_factored: bool = False) -> str:
    allowed = JACOBIAN_METHODS + (("factored",) if allow_factored else ())
    if method not in allowed:
        raise ValueError(f"jacobian method: expected one of {allowed}, got {method!r}")
    structured_ok = cell.out == cell.hidden
    if method == "auto":
        return "structured" if structured_ok else "jacfwd"
    if method in ("structured", "factored") and not structured_ok:
        raise ValueError(
            f"jacobian method: {method!r} needs an LSTM without projection (proj_size=0); "
            "use 'jacfwd' or 'jacrev'"
        )
    if method == "factored" and not cell.bidirectional and cell.num_layers > 1:
        raise ValueError(
            "jacobian method: 'factored' is for single-cell chains; a unidirectional "
            f"{cell.num_layers}-layer stack has dense off-diagonal blocks: use 'structured'"
        )
    return method


def _batched(fn, *time_major):
    """vmap ``fn`` over batch (axis 1 of the time-major inputs) and time, giving
    batch-first outputs (B, T, ...) without transposing them afterwards."""
    return jax.vmap(jax.vmap(fn), in_axes=1)(*time_major)


def _chain_factors(cell, P, states, us):
    """Factors (B, T, G, n), (B, T, nb, n) of a single-cell chain."""
    a_h, direct, _ = _batched(lambda s, u: _cell_factors(cell, P[0], s, u), states[:-1], us)
    return a_h, direct


def _chain_jacobians(cell, params, states, us, ms, method: str) -> Array:
    """J_k = dS_{k+1}/dS_k for every step and example, (B, T, N, N): vmapped over batch
    and time from the stored trajectory (the step is pure: J_k needs only (S_k, x_k))."""
    if method == "structured" and len(params) == 1:
        a_h, direct = _chain_factors(cell, params, states, us)
        return _dense_from_factors(
            a_h, direct, params[0]["weight_hh"], None if ms is None else ms.T
        )
    if method == "structured":
        one = functools.partial(_structured_jacobian, cell, params)
    else:
        jac = jax.jacfwd if method == "jacfwd" else jax.jacrev

        def one(s, u, m):
            return jac(lambda s_: _chain_step(cell, params, s_, u, m))(s)

    return _batched(one, states[:-1], us, ms)


@_compiled("method")
def step_jacobians(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
    method: str = "auto",
) -> Float[Array, "chains batch time N N"]:
    """Per-step state Jacobians J_k = dS_{k+1}/dS_k along the trajectory of ``x``.

    Returns (C, B, T, N, N) in processing order (chains: `chain_names`). For the LSTM the
    state is [h; c] (N = P + H per cell); a unidirectional multi-layer layer gives the
    block lower-triangular Jacobian of the stacked state; padded steps give I.

    ``method``: ``"jacfwd"`` / ``"jacrev"`` differentiate the pure step function per step
    and example (N tangents each); ``"structured"`` uses the cells' affine-then-unit-wise
    form (a few JVPs per step, see `_cell_factors`); ``"auto"`` picks structured where it
    applies (not for a projected LSTM). Memory: C B T N^2 numbers; for large N see
    `factored_jacobians` and the matrix-free functions.
    """
    st = _setup(layer, variables, x, lengths, initial_state)
    method = _resolve_method(st.cell, method)
    fw = _forward(st)
    return _stack(
        [
            _chain_jacobians(st.cell, P, S, us, ms, method)
            for P, S, us, ms in zip(fw.params, fw.states, fw.inputs, fw.masks, strict=True)
        ]
    )


def _factored(st: _Setup, fw: _Forward) -> FactoredJacobians:
    a_h, direct, W, masks = [], [], [], []
    for P, S, us, ms in zip(fw.params, fw.states, fw.inputs, fw.masks, strict=True):
        a, d = _chain_factors(st.cell, P, S, us)
        a_h.append(a)
        direct.append(d)
        W.append(P[0]["weight_hh"].astype(st.dtype))
        masks.append(None if ms is None else ms.T)
    return FactoredJacobians(
        _stack(a_h), _stack(direct), _stack(W), None if masks[0] is None else _stack(masks)
    )


@_compiled()
def factored_jacobians(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
) -> FactoredJacobians:
    """Every per-step Jacobian, exactly, in factored form (see `FactoredJacobians`).

    For single-cell chains (``num_layers=1``, or any bidirectional layer) of RNN, GRU and
    LSTM without projection. ``.dense()`` equals `step_jacobians`; the factored form costs
    O(T G n) memory instead of O(T n^2), so it is the one to use at large hidden sizes.
    """
    st = _setup(layer, variables, x, lengths, initial_state)
    _resolve_method(st.cell, "factored", allow_factored=True)
    return _factored(st, _forward(st))
