"""Chains and the forward pass: what every BPTT function is computed on.

A recurrent layer moves its state s (h, or for the LSTM the pair (h, c) flattened to one
vector [h; c]) one step at a time, s_{k+1} = F(s_k, x_k; psi). Everything in
`jaxnets.bptt` works on *chains*: a recurrence with a state vector and its inputs.

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

The public functions taking ``(layer, variables, x, ...)`` are wrapped by `_compiled`:
they validate their arguments eagerly (clear errors) and then run as one ``jax.jit``
executable with the layer and the options static.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets import rnn

LossFn = Callable[..., Array]  # loss_fn(outputs, final_state, *loss_args) -> scalar


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
        return rnn.GATES[self.mode]

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
    rnn.check_lengths(lengths, np.shape(x)[0], np.shape(x)[1])
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
    masks = rnn.step_mask(lengths, n_time)
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


def _chain_start(st: _Setup, i: int) -> tuple[tuple, Array]:
    """Chain ``i``'s cell params (in stacking order) and initial state S_0 (B, N)."""
    P = tuple(st.params[g] for g in st.chains[i].groups)
    carries = [st.carries0[i]] if st.cell.bidirectional else st.carries0
    return P, carries[0] if len(carries) == 1 else jnp.concatenate(carries, axis=-1)


def _layer_by_layer(st: _Setup, run_chain: Callable, inp=None, *, top_down: bool = False):
    """Visit the layer's chains in the order its layers connect them; written once for the
    forward pass and for its adjoint.

    ``run_chain(i, us, ms) -> (result, ys)`` runs chain ``i`` on ``us`` (T, B, ...) with
    masks ``ms`` (T, B) or None, both in the chain's processing order, and returns ``ys``
    (T, B, ...) in processing order. A unidirectional layer is its one chain.

    Bottom-up (the forward pass, ``inp`` = x time-major): both chains of layer k read
    layer k-1's outputs, both directions concatenated in time order. Top-down
    (``top_down=True``, the adjoint: ``inp`` = None, i.e. nothing from above the top layer):
    ``inp`` is dL/d(layer k's outputs), each chain gets its direction's half, and layer
    k-1's output gradient is the sum of both chains' ``ys`` (their input gradients).

    Returns the results in chain order and the last ``inp`` in time order (the top layer's
    outputs bottom-up, dL/dx top-down).
    """
    cell = st.cell
    if not cell.bidirectional:
        result, ys = run_chain(0, inp, st.masks)
        return [result], ys
    results = [None] * len(st.chains)
    layers = range(cell.num_layers)
    for k in reversed(layers) if top_down else layers:
        ys_time = []
        for d in (0, 1):
            us = inp
            if top_down and inp is not None:
                us = inp[..., d * cell.out : (d + 1) * cell.out]
            results[2 * k + d], ys = run_chain(
                2 * k + d, _flip(us) if d else us, _flip(st.masks) if d else st.masks
            )
            ys_time.append(_flip(ys) if d else ys)
        inp = sum(ys_time) if top_down else jnp.concatenate(ys_time, axis=-1)
    return results, inp


class _Forward(NamedTuple):
    states: list  # per chain (T+1, B, N), processing order
    inputs: list  # per chain (T, B, I), processing order
    masks: list  # per chain (T, B) or None, processing order
    params: list  # per chain: tuple of cell params


def _forward(st: _Setup, eps=None) -> _Forward:
    """Run every chain of the layer (bidirectional: layer by layer, the next layer reading
    both directions' outputs)."""

    def run_chain(i, us, ms):
        P, S0 = _chain_start(st, i)
        states, ys = _run(st.cell, P, S0, us, ms, None if eps is None else eps[i])
        return (states, us, ms, P), ys

    results, _ = _layer_by_layer(st, run_chain, st.x)
    return _Forward(*(list(field) for field in zip(*results, strict=True)))


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


def _stack(arrs: list) -> Array:
    # one chain: a free reshape instead of a copy (these arrays can be gigabytes)
    return arrs[0][None] if len(arrs) == 1 else jnp.stack(arrs)
