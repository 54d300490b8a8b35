"""Backpropagation through time made explicit: per-step Jacobians, the product-of-Jacobians
gradient, gradient-norm-versus-lag curves, spectra, Lyapunov exponents, truncated BPTT.

The maths (the BPTT section of the notes). A recurrent layer moves its state s (h, or for
the LSTM the pair (h, c) flattened to one vector [h; c]) one step at a time,

    s_{k+1} = F(s_k, x_k; psi),             J_k = d s_{k+1} / d s_k   (per-step Jacobian),

and a loss L(outputs, final_state) reads the states directly: the outputs are the h part of
every state, the final state is s_T. Write d_k = partial L / partial s_k for that direct
dependence (zero for k < T in a many-to-one loss). The total derivative g_k = dL/ds_k obeys
g_T = d_T, g_k = d_k + J_k^T g_{k+1}, which unrolled is the product of Jacobians

    g_k = sum_{j >= k} (J_{j-1} J_{j-2} ... J_k)^T d_j,

and the parameter gradient is a sum over time of per-step parameter VJPs,

    dL/dpsi = sum_k (partial s_{k+1} / partial psi |_k)^T g_{k+1}.

With a many-to-one loss this is the notes' formula
dL/dpsi = sum_t dL/dh_T (prod_{i=t}^{T-1} dh_{i+1}/dh_i) dh_t/dpsi. Long products of
contracting Jacobians shrink: the gradient reaching early steps vanishes.

Chains. Everything here works on *chains*: a recurrence with a state vector and its inputs.

- A unidirectional layer (any ``num_layers``) is one chain whose state is the stacked state
  S_k = [s^0_k; s^1_k; ...; s^{L-1}_k] of all layers (size N = L * n). Within a step layer l
  reads the new h of layer l - 1, so J_k = dS_{k+1}/dS_k is block lower-triangular, block
  (l, m) = d s^l_{k+1} / d s^m_k (the notes' "gradients flow through time and through
  layers").
- A bidirectional layer is one chain per (layer, direction), named like its parameter group
  (``l0``, ``l0_reverse``, ``l1``, ...), whose input is held at its forward-pass value.

Chain arrays are in *processing order*: step k of a reverse chain reads ``x[:, T-1-k]``;
for forward chains processing order is time. Shapes use C chains, batch B, T steps, chain
state size N (n = H for RNN/GRU, P + H for the LSTM with h of size P = proj_size or H).
Lag means T - k: lag 0 is the final state, lag T the initial state. With ``lengths``
(packed sequences) the padded steps are identities (J_k = I), as in `jaxnets.rnn`.

Dropout between layers is not applied: the analysis is of the deterministic layer.

Main entry points: `step_jacobians` (dense J) and `factored_jacobians` (the same J
exactly, O(T n) memory), `explicit_bptt`, `state_gradients` (matrix-free dL/ds_k),
`lag_curve`, `product_log_singular_values`, `pascanu_bound`, `lyapunov_spectrum` /
`largest_lyapunov_bruteforce`, `truncated_apply` / `TruncatedBPTT` (truncated
BPTT(k1, k2) as a training option), `matrix_free_singular_values` /
`matrix_free_product_norms`; `RecurrentReadout` / `readout_parts` (the experiments' model).

The functions taking ``(layer, variables, x, ...)`` validate their arguments eagerly
(clear errors) and then run as one ``jax.jit`` executable with the layer and the options
static: pass the same (module-level) ``loss_fn`` to reuse the compilation, and the data it
needs (targets, a readout's weights) as ``loss_args``. They can also be called inside
your own ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets import rnn

__all__ = [
    "BPTTResult",
    "CELLS",
    "RecurrentReadout",
    "readout_parts",
    "StateGradients",
    "TruncatedBPTT",
    "chain_names",
    "explicit_bptt",
    "factored_jacobians",
    "FactoredJacobians",
    "largest_lyapunov_bruteforce",
    "lag_curve",
    "log_slope",
    "lyapunov_spectrum",
    "matrix_free_product_norms",
    "matrix_free_singular_values",
    "pascanu_bound",
    "product_log_norms",
    "product_log_singular_values",
    "singular_values",
    "state_gradients",
    "step_jacobians",
    "trajectory",
    "Trajectory",
    "truncated_apply",
    "truncated_grad",
]

LossFn = Callable[..., Array]  # loss_fn(outputs, final_state, *loss_args) -> scalar
JACOBIAN_METHODS = ("auto", "structured", "jacfwd", "jacrev")
_GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}

# ---------------------------------------------------------------------------------------
# Cells, chains and the forward pass
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cell:
    """Static description of the layer's cell: which step, sizes, how carries flatten."""

    mode: str
    step: Callable = dataclasses.field(compare=False)
    hidden: int
    out: int
    num_layers: int
    bidirectional: bool

    @property
    def n(self) -> int:
        """Size of one cell's flattened state: [h; c] for the LSTM, h otherwise."""
        return self.out + (self.hidden if self.mode == "LSTM" else 0)

    @property
    def gates(self) -> int:
        return _GATES[self.mode]

    def flatten(self, carry) -> Array:
        return jnp.concatenate(carry, axis=-1) if self.mode == "LSTM" else carry

    def unflatten(self, s: Array):
        return (s[..., : self.out], s[..., self.out :]) if self.mode == "LSTM" else s


class _Chain(NamedTuple):
    name: str
    groups: tuple[str, ...]  # parameter groups the chain owns, in stacking order
    layer: int  # bidirectional: its layer; unidirectional stack: -1
    reverse: bool


def _check_layer(layer) -> None:
    if not isinstance(layer, rnn.RNN | rnn.LSTM | rnn.GRU):
        raise TypeError(
            f"layer: expected a jaxnets.rnn.RNN, LSTM or GRU, got {type(layer).__name__}"
        )


def _cell(layer) -> _Cell:
    _check_layer(layer)
    return _Cell(
        mode=layer.mode,
        step=rnn.step_function(layer),
        hidden=int(layer.hidden_size),
        out=int(layer.output_size),
        num_layers=int(layer.num_layers),
        bidirectional=bool(layer.bidirectional),
    )


def _chains(cell: _Cell) -> tuple[_Chain, ...]:
    if not cell.bidirectional:
        groups = tuple(f"l{k}" for k in range(cell.num_layers))
        name = "l0" if cell.num_layers == 1 else "+".join(groups)
        return (_Chain(name, groups, -1, False),)
    return tuple(
        _Chain(f"l{k}{sfx}", (f"l{k}{sfx}",), k, d == 1)
        for k in range(cell.num_layers)
        for d, sfx in enumerate(("", "_reverse"))
    )


def chain_names(layer) -> tuple[str, ...]:
    """Names of the layer's chains, in the order of the leading axis of every chain array:
    ``("l0",)`` or ``("l0+l1+...",)`` (the stacked state) for a unidirectional layer,
    ``("l0", "l0_reverse", "l1", ...)`` for a bidirectional one."""
    return tuple(c.name for c in _chains(_cell(layer)))


class _Setup(NamedTuple):
    cell: _Cell
    chains: tuple[_Chain, ...]
    params: dict  # group name -> cell params
    x: Array  # (T, B, I) time-major, cast to the compute dtype
    masks: Array | None  # (T, B) bool, None when every sequence is full length
    carries0: list  # per (layer, direction) flattened initial carry (B, n)
    dtype: Any


def _shape_sig(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), jnp.result_type(a)) for a in leaves)


@functools.lru_cache(maxsize=256)
def _check_shapes(layer, params_sig, x_sig, lengths_sig, init_sig) -> None:
    """The layer's own validation (shapes of x, lengths, initial_state and the params, with
    its messages), run once per shape signature on abstract values."""

    def abstract(sig):
        treedef, leaves = sig
        return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])

    def apply(params, x, lengths, init):
        return layer.apply({"params": params}, x, initial_state=init, lengths=lengths)

    jax.eval_shape(apply, *(abstract(s) for s in (params_sig, x_sig, lengths_sig, init_sig)))


def _validate(layer, variables, x, lengths, initial_state) -> _Cell:
    """Clear errors for bad arguments, before any tracing."""
    cell = _cell(layer)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            "variables: expected the dict returned by layer.init, with a 'params' entry; "
            f"got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    params = variables["params"]
    names = rnn.layer_names(layer)
    missing = [g for g in names if g not in params]
    if missing:
        raise ValueError(
            f"variables['params']: expected groups {names} for this layer, missing {missing} "
            f"(got {sorted(params)})"
        )
    if np.ndim(x) != 3:  # before _shape_sig: the layer's message, without tracing
        raise ValueError(
            f"x: expected a 3-D array (batch, time, features), got shape {tuple(np.shape(x))}"
        )
    _check_shapes(
        layer, _shape_sig(params), _shape_sig(x), _shape_sig(lengths), _shape_sig(initial_state)
    )
    if lengths is not None and not isinstance(lengths, jax.core.Tracer):
        lv = np.asarray(lengths)
        n_time = np.shape(x)[1]
        if lv.size and (lv.min() < 1 or lv.max() > n_time):
            raise ValueError(
                f"lengths: expected values in 1..{n_time} (the time axis of x), "
                f"got min {lv.min()} and max {lv.max()}"
            )
    return cell


@functools.lru_cache(maxsize=64)
def _jit(fn, static: tuple[str, ...]):
    return jax.jit(fn, static_argnames=static)


def _compiled(*static: str):
    """Decorator for the public functions ``fn(layer, variables, x, ...)``: validate
    eagerly (clear errors), then run ``fn`` as one ``jax.jit`` executable with ``layer`` and
    the named options static, so eager calls do not dispatch hundreds of small ops. Falls
    back to running ``fn`` directly when an option is not hashable."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            a = sig.bind(*args, **kwargs)
            a.apply_defaults()
            a = dict(a.arguments)
            _validate(a["layer"], a["variables"], a["x"], a.get("lengths"), a.get("initial_state"))
            a["variables"] = {"params": a["variables"]["params"]}
            names = ("layer",) + tuple(k for k in static if k in a)
            for k in names:
                if isinstance(a[k], list):
                    a[k] = tuple(a[k])
            try:
                hash(tuple(a[k] for k in names))
            except TypeError:
                return fn(**a)
            return _jit(fn, names)(**a)

        return wrapper

    return deco


def _setup(layer, variables, x, lengths, initial_state) -> _Setup:
    """Collect what the chains need (arguments already validated by `_validate`)."""
    cell = _cell(layer)
    params = variables["params"]
    names = rnn.layer_names(layer)
    dtype = jnp.result_type(x, *jax.tree.leaves(params))
    batch, n_time = np.shape(x)[:2]
    xs = jnp.swapaxes(jnp.asarray(x, dtype), 0, 1)
    masks = None
    if lengths is not None:
        masks = jnp.arange(n_time)[:, None] < jnp.asarray(lengths)[None, :]
    n_cells = cell.num_layers * (2 if cell.bidirectional else 1)
    carries0 = []
    for i in range(n_cells):
        if initial_state is None:
            carry = rnn.initial_carry(layer, batch, dtype)
        elif cell.mode == "LSTM":
            carry = (initial_state[0][i].astype(dtype), initial_state[1][i].astype(dtype))
        else:
            carry = initial_state[i].astype(dtype)
        carries0.append(cell.flatten(carry))
    return _Setup(cell, _chains(cell), {g: params[g] for g in names}, xs, masks, carries0, dtype)


def _chain_step(cell: _Cell, params: tuple, S: Array, u: Array, m: Array | None) -> Array:
    """One step of a chain: S' = F(S, u) for the stacked cells in ``params``.

    ``S``: (..., L*n) stacked state, ``u``: (..., I) input, ``m``: (...) bool or None.
    Layer l's input is layer l-1's new h. Where ``m`` is False the state is held (J = I).
    """
    n = cell.n
    new, inp = [], u
    for k, p in enumerate(params):
        carry, inp = cell.step(p, cell.unflatten(S[..., k * n : (k + 1) * n]), inp)
        new.append(cell.flatten(carry))
    S1 = new[0] if len(new) == 1 else jnp.concatenate(new, axis=-1)
    if m is None:
        return S1
    return jnp.where(m[..., None], S1, S)


def _top_h(cell: _Cell, num_cells: int, S: Array) -> Array:
    """The chain's output: the h part of its last (top) cell's state."""
    start = (num_cells - 1) * cell.n
    return S[..., start : start + cell.out]


def _run(cell, params: tuple, S0, us, ms, eps=None) -> tuple[Array, Array]:
    """Unroll a chain with ``jax.lax.scan``.

    Returns ``states`` (T+1, B, N) = S_0..S_T and ``ys`` (T, B, out), the outputs (zero at
    padded steps). ``eps`` (T+1, B, N), when given, is added to every state as it is formed
    (S_k <- S_k + eps_k): d loss / d eps_k is then dL/dS_k (used by `state_gradients`).
    """
    if eps is not None:
        S0 = S0 + eps[0]

    def body(S, inp):
        u, m, e = inp
        S1 = _chain_step(cell, params, S, u, m)
        if e is not None:
            S1 = S1 + e
        y = _top_h(cell, len(params), S1)
        if m is not None:
            y = jnp.where(m[..., None], y, jnp.zeros_like(y))
        return S1, (S1, y)

    _, (Ss, ys) = jax.lax.scan(body, S0, (us, ms, None if eps is None else eps[1:]))
    return jnp.concatenate([S0[None], Ss], axis=0), ys


def _flip(a):
    return None if a is None else a[::-1]


class _Forward(NamedTuple):
    states: list  # per chain (T+1, B, N), processing order
    inputs: list  # per chain (T, B, I), processing order
    masks: list  # per chain (T, B) or None, processing order
    params: list  # per chain: tuple of cell params


def _forward(st: _Setup, eps=None) -> _Forward:
    """Run every chain of the layer (bidirectional: layer by layer, the next layer reading
    both directions' outputs)."""
    cell = st.cell
    params = st.params
    if not cell.bidirectional:
        (ch,) = st.chains
        P = tuple(params[g] for g in ch.groups)
        S0 = jnp.concatenate(st.carries0, axis=-1) if len(P) > 1 else st.carries0[0]
        states, _ = _run(cell, P, S0, st.x, st.masks, None if eps is None else eps[0])
        return _Forward([states], [st.x], [st.masks], [P])
    out = _Forward([], [], [], [])
    inp = st.x
    for k in range(cell.num_layers):
        ys_time = []
        for d in (0, 1):
            i = 2 * k + d
            ch = st.chains[i]
            us = _flip(inp) if d else inp
            ms = _flip(st.masks) if d else st.masks
            P = (params[ch.name],)
            states, ys = _run(cell, P, st.carries0[i], us, ms, None if eps is None else eps[i])
            out.states.append(states)
            out.inputs.append(us)
            out.masks.append(ms)
            out.params.append(P)
            ys_time.append(_flip(ys) if d else ys)
        inp = jnp.concatenate(ys_time, axis=-1)
    return out


def _readout(st: _Setup, states: list, masks: list):
    """``(outputs, final_state)`` in PyTorch's shapes, as functions of the chain states."""
    cell = st.cell
    L = cell.num_layers

    def ys(i, S, n_cells):
        y = _top_h(cell, n_cells, S[1:])
        m = masks[i]
        return y if m is None else jnp.where(m[..., None], y, jnp.zeros_like(y))

    if not cell.bidirectional:
        S = states[0]
        outputs = jnp.swapaxes(ys(0, S, L), 0, 1)
        n = cell.n
        finals = [cell.unflatten(S[-1][:, k * n : (k + 1) * n]) for k in range(L)]
    else:
        top = 2 * (L - 1)
        y_f = ys(top, states[top], 1)
        y_r = ys(top + 1, states[top + 1], 1)[::-1]
        outputs = jnp.swapaxes(jnp.concatenate([y_f, y_r], axis=-1), 0, 1)
        finals = [cell.unflatten(S[-1]) for S in states]
    if cell.mode == "LSTM":
        final_state = (jnp.stack([f[0] for f in finals]), jnp.stack([f[1] for f in finals]))
    else:
        final_state = jnp.stack(finals)
    return outputs, final_state


def _scalar_loss(loss_fn: LossFn, outputs, final_state, loss_args=()) -> Array:
    loss = loss_fn(outputs, final_state, *loss_args)
    if not hasattr(loss, "shape") or jnp.shape(loss) != ():
        raise ValueError(
            "loss_fn: expected loss_fn(outputs, final_state) to return a scalar, "
            f"got {type(loss).__name__} with shape {jnp.shape(loss)}"
        )
    return loss


def _batch_first(a: Array) -> Array:
    return jnp.swapaxes(a, 0, 1)


class Trajectory(NamedTuple):
    """The states of every chain along a real trajectory.

    states: (C, B, T+1, N), S_0..S_T in processing order (chains: `chain_names`);
    outputs/final_state: what ``layer.apply`` returns.
    """

    states: Array
    outputs: Array
    final_state: Any


@_compiled()
def trajectory(
    layer: nn.Module,
    variables: Mapping,
    x: Float[Array, "batch time features"],
    lengths: Int[Array, " batch"] | None = None,
    *,
    initial_state: Any = None,
) -> Trajectory:
    """Every chain's state at every step (see the module docstring for chains)."""
    st = _setup(layer, variables, x, lengths, initial_state)
    fw = _forward(st)
    outputs, final_state = _readout(st, fw.states, fw.masks)
    states = _stack([_batch_first(s) for s in fw.states])
    return Trajectory(states, outputs, final_state)


# ---------------------------------------------------------------------------------------
# Per-step Jacobians
# ---------------------------------------------------------------------------------------


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


def _stack(arrs: list) -> Array:
    # one chain: a free reshape instead of a copy (these arrays can be gigabytes)
    return arrs[0][None] if len(arrs) == 1 else jnp.stack(arrs)


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


# ---------------------------------------------------------------------------------------
# Explicit BPTT
# ---------------------------------------------------------------------------------------


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
    fw = _forward(st)
    T = st.x.shape[0]

    def loss_of_states(states):
        return _scalar_loss(loss_fn, *_readout(st, states, fw.masks), loss_args)

    loss, direct = jax.value_and_grad(loss_of_states)(fw.states)
    C = len(st.chains)
    Js, gs, ds = [None] * C, [None] * C, [None] * C
    grads, contributions = {}, {}

    def do_chain(i, d):
        P, S, us, ms = fw.params[i], fw.states[i], fw.inputs[i], fw.masks[i]
        if jmethod == "factored":
            a_h, dr = _chain_factors(cell, P, S, us)
            W = P[0]["weight_hh"].astype(st.dtype)
            mT = None if ms is None else ms.T
            J = (a_h, dr, W, mT)

            def jt(k, u):
                take = lambda a: jax.lax.dynamic_index_in_dim(a, k, 1, keepdims=False)  # noqa: E731
                return _factored_rmatvec(
                    take(a_h), take(dr), W, None if mT is None else take(mT), u
                )
        else:
            J = _chain_jacobians(cell, P, S, us, ms, jmethod)
            jt = _dense_rmatvec(J)
        if method == "recursion":
            g = _backward_recursion(jt, T, d)
        else:
            g = _backward_products(J if jmethod != "factored" else _dense_from_factors(*J), d)
        total, per, du = _step_vjps(cell, P, S[:-1], us, ms, g[1:], per_step)
        Js[i], gs[i], ds[i] = J, g, d
        for k, group in enumerate(st.chains[i].groups):
            grads[group] = total[k]
            contributions[group] = None if per is None else per[k]
        return du

    if not cell.bidirectional:
        input_grads = do_chain(0, direct[0])
    else:
        delta = None  # dL / d(outputs of the current layer), (T, B, 2*out), time order
        for k in reversed(range(cell.num_layers)):
            e_sum = 0.0
            for dirn in (0, 1):
                i = 2 * k + dirn
                d = direct[i]
                if delta is not None:
                    part = delta[..., dirn * cell.out : (dirn + 1) * cell.out]
                    part = _flip(part) if dirn else part
                    if fw.masks[i] is not None:  # outputs are zero (constant) at padded steps
                        part = jnp.where(fw.masks[i][..., None], part, jnp.zeros_like(part))
                    d = d.at[1:, :, : cell.out].add(part)
                du = do_chain(i, d)
                e_sum = e_sum + (_flip(du) if dirn else du)
            delta = e_sum
        input_grads = delta

    if jmethod == "factored":
        parts = list(zip(*Js, strict=True))
        jacobians = FactoredJacobians(
            _stack(list(parts[0])),
            _stack(list(parts[1])),
            _stack(list(parts[2])),
            None if parts[3][0] is None else _stack(list(parts[3])),
        )
    else:
        jacobians = _stack(Js)
    grads = {g: grads[g] for g in rnn.layer_names(layer)}
    contributions = None if not per_step else {g: contributions[g] for g in grads}
    return BPTTResult(
        loss=loss,
        grads=grads,
        jacobians=jacobians,
        states=_stack([_batch_first(s) for s in fw.states]),
        state_grads=_stack([_batch_first(g) for g in gs]),
        direct_grads=_stack([_batch_first(d) for d in ds]),
        contributions=contributions,
        input_grads=_batch_first(input_grads),
    )


# ---------------------------------------------------------------------------------------
# Matrix-free state gradients and lag curves
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Spectra, products, bounds
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Matrix-free spectra (JVP / VJP, no dense J)
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Truncated BPTT
# ---------------------------------------------------------------------------------------


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
    cell = st.cell
    if not cell.bidirectional:
        (ch,) = st.chains
        P = tuple(st.params[g] for g in ch.groups)
        S0 = jnp.concatenate(st.carries0, axis=-1) if len(P) > 1 else st.carries0[0]
        states, _ = _truncated_run(cell, P, S0, st.x, st.masks, k1, k2)
        return _readout(st, [states], [st.masks])
    all_states, all_masks = [], []
    inp = st.x
    for k in range(cell.num_layers):
        ys_time = []
        for d in (0, 1):
            i = 2 * k + d
            us = _flip(inp) if d else inp
            ms = _flip(st.masks) if d else st.masks
            states, ys = _truncated_run(
                cell, (st.params[st.chains[i].name],), st.carries0[i], us, ms, k1, k2
            )
            all_states.append(states)
            all_masks.append(ms)
            ys_time.append(_flip(ys) if d else ys)
        inp = jnp.concatenate(ys_time, axis=-1)
    return _readout(st, all_states, all_masks)


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


# ---------------------------------------------------------------------------------------
# A recurrent layer with a linear readout (the long-memory experiments' model)
# ---------------------------------------------------------------------------------------

CELLS = {"rnn": rnn.RNN, "lstm": rnn.LSTM, "gru": rnn.GRU}


class RecurrentReadout(nn.Module):
    """``cell`` layer (``hidden`` units, parameters under ``"rnn"``) -> Dense readout
    (under ``"head"``) of the last step's output (``every_step=False``, many-to-one) or of
    every step's output (many-to-many).

    ``out=0`` reads one number per sequence (or step) and drops the unit axis. Shapes:
    (B, T, I) -> (B,) / (B, out) many-to-one, (B, T) / (B, T, out) many-to-many.
    ``tbptt=(k1, k2)`` trains the recurrent layer by truncated BPTT (`TruncatedBPTT`);
    the parameters and the outputs are the same either way.
    """

    cell: str = "lstm"
    hidden: int = 64
    out: int = 0
    every_step: bool = False
    tbptt: tuple[int, int] | None = None

    def recurrent_layer(self) -> nn.Module:
        """The recurrent layer, unbound (for `readout_parts` and the analysis functions)."""
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {self.cell!r}")
        return CELLS[self.cell](self.hidden, parent=None)

    @nn.compact
    def __call__(self, x: Float[Array, "batch time features"]):
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {self.cell!r}")
        layer = CELLS[self.cell](self.hidden, name="rnn")
        if self.tbptt is None:
            outputs, _ = layer(x)
        else:
            outputs, _ = TruncatedBPTT(layer, *self.tbptt)(x)
        head = nn.Dense(max(self.out, 1), name="head")
        y = head(outputs if self.every_step else outputs[:, -1])
        return y[..., 0] if self.out == 0 else y


def readout_parts(model: RecurrentReadout, params: Mapping) -> tuple[nn.Module, dict, Callable]:
    """``(layer, layer_variables, head)`` of a `RecurrentReadout`: the recurrent layer and
    its variables as the functions of this module take them, and ``head(outputs)`` the
    readout, so that ``head(layer.apply(layer_variables, x)[0]) == model.apply(...)``.

    A loss for `explicit_bptt` / `state_gradients` is then
    ``lambda outputs, final: loss(head(outputs), targets)``.
    """
    layer = model.recurrent_layer()
    kernel, bias = params["head"]["kernel"], params["head"]["bias"]

    def head(outputs):
        z = outputs if model.every_step else outputs[:, -1]
        y = z @ kernel + bias.reshape((1,) * (z.ndim - 1) + bias.shape)
        return y[..., 0] if model.out == 0 else y

    return layer, {"params": params["rnn"]}, head
