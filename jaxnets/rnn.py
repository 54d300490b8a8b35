"""Recurrent core: pure step functions and Flax layers with PyTorch's semantics.

The maths and the parameter layout are PyTorch's (``torch.nn.RNN``/``LSTM``/``GRU``), so
weights move between the two exactly (``from_torch_state_dict``/``to_torch_state_dict``).

A cell is a pure function ``step(params, carry, x) -> (carry, y)`` on one time step, with
``params`` a dict ``{"weight_ih": (G*H, I), "weight_hh": (G*H, H), "bias_ih": (G*H,),
"bias_hh": (G*H,)}`` (G = 1 for RNN, 4 for LSTM, 3 for GRU; LSTM with ``proj_size`` adds
``"weight_hr": (P, H)``). Time is ``jax.lax.scan`` over that step (``scan_layer``); batch is
the leading axis of ``x`` and ``carry``.

The layers ``RNN``, ``LSTM`` and ``GRU`` take batch-first input ``(batch, time, features)``
and return ``(outputs, final_state)`` in PyTorch's shapes: ``outputs`` is
``(batch, time, directions * H_out)`` and ``final_state`` is ``h_n`` of shape
``(directions * num_layers, batch, H_out)`` (``(h_n, c_n)`` for the LSTM, ``c_n`` with the
unprojected hidden size), ordered ``index = layer * directions + direction``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets.ops.recurrent import DEFAULT_CHUNK, fused_scan, step_mask

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "CELLS",
    "GATES",
    "cell_params",
    "check_lengths",
    "step_mask",
    "torch_uniform",
    "rnn_step",
    "lstm_step",
    "gru_step",
    "step_function",
    "scan_layer",
    "ScanResult",
    "layer_names",
    "initial_carry",
    "from_torch_state_dict",
    "to_torch_state_dict",
]

Params = Mapping[str, Array]

# ---------------------------------------------------------------------------------------
# Pure step functions
# ---------------------------------------------------------------------------------------


def _affine(params: Params, x: Array, h: Array) -> tuple[Array, Array]:
    """Input and hidden pre-activations ``(x W_ih^T + b_ih, h W_hh^T + b_hh)``."""
    gi = x @ params["weight_ih"].T
    gh = h @ params["weight_hh"].T
    if "bias_ih" in params:
        # explicit leading axes: the step works for any batch shape, rank promotion stays off
        lead = (1,) * (gi.ndim - 1)
        gi = gi + params["bias_ih"].reshape(lead + params["bias_ih"].shape)
        gh = gh + params["bias_hh"].reshape(lead + params["bias_hh"].shape)
    return gi, gh


def rnn_step(
    params: Params,
    carry: Float[Array, "*batch hidden"],
    x: Float[Array, "*batch features"],
    nonlinearity: str = "tanh",
) -> tuple[Float[Array, "*batch hidden"], Float[Array, "*batch hidden"]]:
    """Elman RNN step: ``h' = f(W_ih x + b_ih + W_hh h + b_hh)``, f = tanh or relu.

    Returns ``(h', h')``: the new carry and the step's output.
    """
    gi, gh = _affine(params, x, carry)
    act = jnp.tanh if nonlinearity == "tanh" else jax.nn.relu
    h = act(gi + gh)
    return h, h


def lstm_step(
    params: Params,
    carry: tuple[Float[Array, "*batch out"], Float[Array, "*batch hidden"]],
    x: Float[Array, "*batch features"],
) -> tuple[tuple[Array, Array], Float[Array, "*batch out"]]:
    """LSTM step, PyTorch gate order (i, f, g, o), one fused matmul for the four gates::

        i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh, 4)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')          (then h' <- W_hr h' when proj_size > 0)

    ``carry = (h, c)``: h is ``(*batch, P or H)``, c is ``(*batch, H)``. Returns
    ``((h', c'), h')``.
    """
    h, c = carry
    gi, gh = _affine(params, x, h)
    i, f, g, o = jnp.split(gi + gh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    if "weight_hr" in params:
        h = h @ params["weight_hr"].T
    return (h, c), h


def gru_step(
    params: Params,
    carry: Float[Array, "*batch hidden"],
    x: Float[Array, "*batch features"],
) -> tuple[Float[Array, "*batch hidden"], Float[Array, "*batch hidden"]]:
    """GRU step, PyTorch gate order (r, z, n), reset applied after the hidden matmul::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    Returns ``(h', h')``.
    """
    gi, gh = _affine(params, x, carry)
    i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
    r = jax.nn.sigmoid(i_r + h_r)
    z = jax.nn.sigmoid(i_z + h_z)
    n = jnp.tanh(i_n + r * h_n)
    h = (1.0 - z) * n + z * carry
    return h, h


GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}  # G: the gates stacked in weight_ih / weight_hh

# "fused": jaxnets.ops.recurrent.fused_scan, a custom VJP (the default: faster on CPU);
# "scan": jax.grad straight through lax.scan of the step function (the reference).
IMPLS = ("fused", "scan")


def step_function(layer: _Recurrent) -> Callable:
    """The pure ``step(params, carry, x) -> (carry, y)`` of ``layer``'s cell."""
    if layer.mode == "LSTM":
        return lstm_step
    if layer.mode == "GRU":
        return gru_step
    return functools.partial(rnn_step, nonlinearity=layer.nonlinearity)


# ---------------------------------------------------------------------------------------
# Time unrolling
# ---------------------------------------------------------------------------------------


class ScanResult(NamedTuple):
    """What one direction of one layer produced over time (time-major inside)."""

    outputs: Array  # (batch, time, H_out); zero past each sequence's length
    final_carry: Any  # carry at each sequence's own end
    carries: Any  # carry after every step, (batch, time, ...) per leaf; None unless asked


def scan_layer(
    step: Callable,
    params: Params,
    x: Float[Array, "batch time features"],
    carry0: Any,
    lengths: Int[Array, " batch"] | None = None,
    reverse: bool = False,
    return_carries: bool = False,
    remat_chunk: int = 0,
) -> ScanResult:
    """Unroll ``step`` over time with ``jax.lax.scan`` (batch-first in and out).

    With ``lengths`` this is PyTorch's packed-sequence semantics: at ``t >= lengths[b]``
    the carry of sequence b stops changing and its output is exactly zero, so the forward
    direction ends at each sequence's own last step and the reverse direction
    (``reverse=True``) starts there.

    ``remat_chunk = k > 0`` rematerialises: time is scanned in chunks of k steps, each
    under ``jax.checkpoint``, so the backward pass keeps the carries at chunk boundaries
    and recomputes a chunk's steps when it reaches them (memory O(T/k + k) steps instead
    of O(T), for one more forward pass). Values and gradients are unchanged.
    """
    xs = jnp.swapaxes(x, 0, 1)  # (time, batch, features)
    n_time = xs.shape[0]
    if lengths is None:

        def body(carry, x_t):
            carry, y = step(params, carry, x_t)
            return carry, (y, carry if return_carries else None)

        final, (ys, cs) = _scan(body, carry0, xs, reverse, remat_chunk)
    else:
        mask = step_mask(lengths, n_time)  # (time, batch)

        def body(carry, inp):
            x_t, m_t = inp
            new, y = step(params, carry, x_t)
            keep = m_t[:, None]
            new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry)
            y = jnp.where(keep, y, jnp.zeros_like(y))
            return new, (y, new if return_carries else None)

        final, (ys, cs) = _scan(body, carry0, (xs, mask), reverse, remat_chunk)
    outputs = jnp.swapaxes(ys, 0, 1)
    carries = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), cs) if return_carries else None
    return ScanResult(outputs, final, carries)


def _scan(body: Callable, carry0: Any, xs: Any, reverse: bool, remat_chunk: int):
    """``jax.lax.scan(body, carry0, xs, reverse=reverse)``, in checkpointed chunks of
    ``remat_chunk`` steps when it is positive (the ``T mod k`` leftover steps form one more
    chunk, where the recurrence starts)."""
    n_time = jax.tree.leaves(xs)[0].shape[0]
    if remat_chunk <= 0 or remat_chunk >= n_time:
        return jax.lax.scan(body, carry0, xs, reverse=reverse)
    k = remat_chunk
    n, r = divmod(n_time, k)
    inner = jax.checkpoint(lambda c, x: jax.lax.scan(body, c, x, reverse=reverse))
    if not reverse:
        rem, chunks = slice(0, r), slice(r, n_time)
    else:
        rem, chunks = slice(n * k, n_time), slice(0, n * k)
    carry, ys_rem = carry0, None
    if r:
        carry, ys_rem = inner(carry, jax.tree.map(lambda a: a[rem], xs))
    xs_ch = jax.tree.map(lambda a: a[chunks].reshape((n, k) + a.shape[1:]), xs)
    carry, ys = jax.lax.scan(inner, carry, xs_ch, reverse=reverse)
    ys = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), ys)
    if r:
        order = (lambda a, b: (b, a)) if not reverse else (lambda a, b: (a, b))
        ys = jax.tree.map(lambda a, b: jnp.concatenate(order(a, b), axis=0), ys, ys_rem)
    return carry, ys


# ---------------------------------------------------------------------------------------
# Flax layers
# ---------------------------------------------------------------------------------------


def torch_uniform(bound: float) -> Callable:
    """Initialiser U(-bound, bound): PyTorch's default for recurrent weights and biases
    (bound = 1/sqrt(H)) and for Linear / Conv layers (bound = 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def cell_params(
    module: nn.Module,
    *,
    gates: int,
    hidden_size: int,
    input_size: int,
    recurrent_size: int,
    proj_size: int = 0,
    bias: bool = True,
    param_dtype: Any = jnp.float32,
    prefix: str = "",
) -> dict[str, Array]:
    """Create one cell's parameters on ``module`` with PyTorch's names (after ``prefix``),
    shapes and initialisation (every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H))): the
    ``params`` dict the step functions take. Call it from a compact method or ``setup``."""
    init = torch_uniform(1.0 / np.sqrt(hidden_size))
    gh = gates * hidden_size

    def param(name, shape):
        return module.param(prefix + name, init, shape, param_dtype)

    p = {
        "weight_ih": param("weight_ih", (gh, input_size)),
        "weight_hh": param("weight_hh", (gh, recurrent_size)),
    }
    if bias:
        p["bias_ih"] = param("bias_ih", (gh,))
        p["bias_hh"] = param("bias_hh", (gh,))
    if proj_size > 0:
        p["weight_hr"] = param("weight_hr", (proj_size, hidden_size))
    return p


class _CellParams(nn.Module):
    """One cell's parameters as a submodule (``l0``, ``l0_reverse``, ...): `cell_params`."""

    gates: int
    hidden_size: int
    input_size: int
    recurrent_size: int
    proj_size: int
    bias: bool
    param_dtype: Any

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        return cell_params(
            self,
            gates=self.gates,
            hidden_size=self.hidden_size,
            input_size=self.input_size,
            recurrent_size=self.recurrent_size,
            proj_size=self.proj_size,
            bias=self.bias,
            param_dtype=self.param_dtype,
        )


def layer_names(layer: _Recurrent) -> list[str]:
    """Parameter-group names in PyTorch order: ``l0``, ``l0_reverse``, ``l1``, ..."""
    dirs = ["", "_reverse"] if layer.bidirectional else [""]
    return [f"l{k}{d}" for k in range(layer.num_layers) for d in dirs]


def initial_carry(layer: _Recurrent, batch: int, dtype=jnp.float32) -> Any:
    """Zero carry for one direction of one layer: ``h`` or ``(h, c)``."""
    out = layer.proj_size if layer.mode == "LSTM" and layer.proj_size > 0 else layer.hidden_size
    h = jnp.zeros((batch, out), dtype)
    if layer.mode == "LSTM":
        return h, jnp.zeros((batch, layer.hidden_size), dtype)
    return h


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def _check_float(name: str, a) -> None:
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {jnp.result_type(a)}")


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def check_lengths(lengths, batch: int, n_time: int, name: str = "x") -> None:
    """Clear errors for packed-sequence ``lengths`` of the input ``name`` of shape
    ``(batch, n_time, ...)``: shape ``(batch,)``, integer dtype, values in 1..n_time (the
    values only when concrete: under ``jit`` they cannot be read). None passes."""
    if lengths is None:
        return
    if _shape(lengths) != (batch,):
        raise ValueError(
            f"lengths: expected shape ({batch},) (one length per sequence of {name}), "
            f"got shape {_shape(lengths)}"
        )
    if not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise TypeError(f"lengths: expected an integer array, got dtype {jnp.result_type(lengths)}")
    if _is_concrete(lengths):
        lv = np.asarray(lengths)
        if lv.size and (lv.min() < 1 or lv.max() > n_time):
            raise ValueError(
                f"lengths: expected values in 1..{n_time} (the time axis of {name}), "
                f"got min {lv.min()} and max {lv.max()}"
            )


def time_dropout(
    rate: float, variational: bool, x: Float[Array, "batch time features"], deterministic: bool
) -> Float[Array, "batch time features"]:
    """Dropout on a batch-first sequence: a fresh mask per element, or with ``variational``
    one mask per (sequence, feature) shared by every time step (call inside a module)."""
    return nn.Dropout(rate, broadcast_dims=(1,) if variational else ())(
        x, deterministic=deterministic
    )


class _Recurrent(nn.Module):
    """Shared implementation of ``RNN``, ``LSTM`` and ``GRU`` (see the module docstring).

    Beyond PyTorch's arguments:

    - ``impl``: how time is unrolled and differentiated. ``"fused"`` (default) is
      ``jaxnets.ops.recurrent.fused_scan``: the same ``lax.scan`` forward with a hand-written
      backward that batches the weight gradients of every few steps into one matrix product
      (faster on CPU; a custom VJP, so reverse-mode only: use ``"scan"`` for
      ``jax.jvp``/``jacfwd`` through the layer). ``"scan"`` is ``jax.grad`` straight through
      ``scan_layer``, the reference the fused gradient is tested against. ``return_states``
      and ``proj_size`` always use ``"scan"``.
    - ``remat_chunk``: k > 0 keeps only every k-th carry for the backward pass and
      recomputes the steps in between (memory O(T/k + k) steps instead of O(T)); same values
      and gradients.
    - ``variational_dropout``: the dropout between layers draws one mask per sequence and
      feature and applies it at every time step (Gal & Ghahramani, 2016; what Keras's RNN
      ``dropout`` does) instead of PyTorch's fresh mask per step.
    """

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    bias: bool = True
    param_dtype: Any = jnp.float32
    impl: str = "fused"
    remat_chunk: int = 0
    variational_dropout: bool = False

    mode = "RNN"  # class-level: which cell
    nonlinearity = "tanh"
    proj_size = 0

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Size of one direction's h (``proj_size`` for a projected LSTM)."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _validate_config(self) -> None:
        if not isinstance(self.hidden_size, int | np.integer) or self.hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {self.hidden_size!r}")
        if not isinstance(self.num_layers, int | np.integer) or self.num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {self.num_layers!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        if self.proj_size < 0 or (self.proj_size and self.proj_size >= self.hidden_size):
            raise ValueError(
                f"proj_size: expected 0 <= proj_size < hidden_size={self.hidden_size}, "
                f"got {self.proj_size!r}"
            )
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {self.nonlinearity!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")
        if not isinstance(self.remat_chunk, int | np.integer) or self.remat_chunk < 0:
            raise ValueError(
                f"remat_chunk: expected an int >= 0 (0: no rematerialisation), "
                f"got {self.remat_chunk!r}"
            )

    def _validate_inputs(self, x, initial_state, lengths):
        if np.ndim(x) != 3:
            raise ValueError(
                f"x: expected a 3-D array (batch, time, features), got shape {_shape(x)}"
            )
        _check_float("x", x)
        batch, n_time, _ = _shape(x)
        if n_time < 1:
            raise ValueError(f"x: expected at least one time step, got shape {_shape(x)}")
        check_lengths(lengths, batch, n_time)
        if initial_state is not None:
            n = self.num_layers * self.num_directions
            want_h = (n, batch, self.output_size)
            if self.mode == "LSTM":
                if not (isinstance(initial_state, tuple | list) and len(initial_state) == 2):
                    raise ValueError(
                        "initial_state: expected a pair (h_0, c_0) for an LSTM, "
                        f"got {type(initial_state).__name__}"
                    )
                h0, c0 = initial_state
                want_c = (n, batch, self.hidden_size)
                if _shape(h0) != want_h:
                    raise ValueError(
                        f"initial_state: expected h_0 of shape {want_h}, got {_shape(h0)}"
                    )
                if _shape(c0) != want_c:
                    raise ValueError(
                        f"initial_state: expected c_0 of shape {want_c}, got {_shape(c0)}"
                    )
                _check_float("initial_state h_0", h0)
                _check_float("initial_state c_0", c0)
            else:
                if _shape(initial_state) != want_h:
                    raise ValueError(
                        f"initial_state: expected h_0 of shape {want_h}, "
                        f"got {_shape(initial_state)}"
                    )
                _check_float("initial_state", initial_state)

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "batch time features"],
        initial_state: Any = None,
        lengths: Int[Array, " batch"] | None = None,
        deterministic: bool = True,
        return_states: bool = False,
    ):
        """Run the stacked (bi)directional recurrence over ``x`` (batch-first).

        Args:
          x: ``(batch, time, features)`` float input.
          initial_state: ``h_0`` of shape ``(directions * num_layers, batch, H_out)``, or
            ``(h_0, c_0)`` for the LSTM; zeros when None.
          lengths: ``(batch,)`` ints in 1..time, packed-sequence semantics (see
            ``scan_layer``); None means every sequence is full length.
          deterministic: when False and ``dropout > 0``, dropout is applied to the outputs
            of every layer but the last (needs ``rngs={"dropout": key}``).
          return_states: also return every state over time.

        Returns:
          ``(outputs, final_state)``, or ``(outputs, final_state, states)`` with
          ``return_states``: ``states`` is h of shape ``(directions * num_layers, batch,
          time, H_out)`` (for the LSTM the pair ``(h, c)``, c with size H).
        """
        self._validate_config()
        self._validate_inputs(x, initial_state, lengths)
        existing = self.variables.get("params", {}).get("l0")
        if existing is not None and existing["weight_ih"].shape[1] != x.shape[-1]:
            raise ValueError(
                f"x: expected {existing['weight_ih'].shape[1]} features (the layer's input "
                f"size), got {x.shape[-1]} (x has shape {_shape(x)})"
            )
        batch = x.shape[0]
        step = step_function(self)
        dtype = jnp.result_type(x, self.param_dtype)
        names = layer_names(self)
        dirs = self.num_directions
        finals, all_states = [], []
        layer_in = x
        for k in range(self.num_layers):
            outs = []
            for d in range(dirs):
                idx = k * dirs + d
                p = _CellParams(
                    gates=GATES[self.mode],
                    hidden_size=self.hidden_size,
                    input_size=x.shape[-1] if k == 0 else dirs * self.output_size,
                    recurrent_size=self.output_size,
                    proj_size=self.proj_size,
                    bias=self.bias,
                    param_dtype=self.param_dtype,
                    name=names[idx],
                )()
                if initial_state is None:
                    carry0 = initial_carry(self, batch, dtype)
                elif self.mode == "LSTM":
                    carry0 = (
                        initial_state[0][idx].astype(dtype),
                        initial_state[1][idx].astype(dtype),
                    )
                else:
                    carry0 = initial_state[idx].astype(dtype)
                if self.impl == "fused" and not return_states and self.proj_size == 0:
                    outputs_d, final_d = fused_scan(
                        self.mode, p, layer_in.astype(dtype), carry0, lengths,
                        reverse=(d == 1), nonlinearity=self.nonlinearity,
                        chunk=self.remat_chunk or DEFAULT_CHUNK, remat=self.remat_chunk > 0,
                    )  # fmt: skip
                    res = ScanResult(outputs_d, final_d, None)
                else:
                    res = scan_layer(
                        step,
                        p,
                        layer_in.astype(dtype),
                        carry0,
                        lengths,
                        reverse=(d == 1),
                        return_carries=return_states,
                        remat_chunk=self.remat_chunk,
                    )
                outs.append(res.outputs)
                finals.append(res.final_carry)
                all_states.append(res.carries)
            layer_out = outs[0] if dirs == 1 else jnp.concatenate(outs, axis=-1)
            if k < self.num_layers - 1 and self.dropout > 0:
                layer_out = time_dropout(
                    self.dropout, self.variational_dropout, layer_out, deterministic
                )
            layer_in = layer_out
        outputs = layer_in
        if self.mode == "LSTM":
            final_state = (jnp.stack([f[0] for f in finals]), jnp.stack([f[1] for f in finals]))
        else:
            final_state = jnp.stack(finals)
        if not return_states:
            return outputs, final_state
        if self.mode == "LSTM":
            states = (
                jnp.stack([s[0] for s in all_states]),
                jnp.stack([s[1] for s in all_states]),
            )
        else:
            states = jnp.stack(all_states)
        return outputs, final_state, states


class RNN(_Recurrent):
    """Elman RNN, ``torch.nn.RNN(input_size, hidden_size, num_layers, nonlinearity,
    bias, batch_first=True, dropout, bidirectional)``; the input size is inferred at init.

    ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` (or relu).
    """

    nonlinearity: str = "tanh"
    mode = "RNN"


class LSTM(_Recurrent):
    """LSTM with PyTorch's equations and layout (``lstm_step``), optional ``proj_size``."""

    proj_size: int = 0
    mode = "LSTM"


class GRU(_Recurrent):
    """GRU with PyTorch's equations and layout (``gru_step``)."""

    mode = "GRU"


CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}  # the layers by the names configs use


# ---------------------------------------------------------------------------------------
# PyTorch weight exchange
# ---------------------------------------------------------------------------------------

_FIELDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _expected_shapes(layer: _Recurrent, input_size: int) -> dict[str, dict[str, tuple]]:
    x = jax.ShapeDtypeStruct((1, 1, input_size), jnp.float32)
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: tuple(s.shape), shapes["params"])


def from_torch_state_dict(layer: _Recurrent, state_dict: Mapping[str, Any]) -> dict:
    """Variables for ``layer.apply`` from a PyTorch recurrent layer's ``state_dict``.

    ``state_dict`` maps PyTorch names (``weight_ih_l0``, ``bias_hh_l1_reverse``,
    ``weight_hr_l0``...) to arrays (numpy, or anything ``np.asarray`` accepts). Missing or
    unexpected keys and wrong shapes raise a ``ValueError`` listing them all.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if "weight_ih_l0" not in sd:
        raise ValueError(
            "state_dict: missing key 'weight_ih_l0' (needed to infer the input size); "
            f"got keys {sorted(sd)}"
        )
    shapes = _expected_shapes(layer, int(sd["weight_ih_l0"].shape[1]))
    params, problems, used = {}, [], set()
    for group, fields in shapes.items():
        sfx = "_reverse" if group.endswith("_reverse") else ""
        base = group[: len(group) - len(sfx)]
        params[group] = {}
        for field, shape in fields.items():
            name = f"{field}_{base}{sfx}"
            if name not in sd:
                problems.append(f"missing key {name!r} (expected shape {shape})")
                continue
            used.add(name)
            if sd[name].shape != shape:
                problems.append(f"{name!r}: expected shape {shape}, got {sd[name].shape}")
                continue
            params[group][field] = jnp.asarray(sd[name])
    unexpected = sorted(set(sd) - used)
    problems += [f"unexpected key {k!r}" for k in unexpected]
    if problems:
        raise ValueError("state_dict does not match the layer:\n  " + "\n  ".join(problems))
    return {"params": params}


def to_torch_state_dict(layer: _Recurrent, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of ``from_torch_state_dict``: PyTorch names to numpy arrays."""
    out = {}
    for group in layer_names(layer):
        sfx = "_reverse" if group.endswith("_reverse") else ""
        base = group[: len(group) - len(sfx)]
        for field in _FIELDS:
            if field in variables["params"][group]:
                out[f"{field}_{base}{sfx}"] = np.asarray(variables["params"][group][field])
    return out
