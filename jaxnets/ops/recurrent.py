"""One recurrent layer (one direction) as a ``lax.scan`` with a hand-written, chunked backward.

``fused_scan`` computes exactly what ``jaxnets.rnn.scan_layer`` computes with the cells
``rnn_step``, ``lstm_step`` and ``gru_step`` (PyTorch's equations), and its gradient equals
``jax.grad`` through ``scan_layer`` (tests: float64 to 1e-10). Only the backward pass is
organised differently, for speed on a CPU:

``jax.grad`` of a scanned step runs, at every time step t of the reverse scan, the
cotangent of the gates ``dz_t`` (B, G*H), then ``dh_{t-1} = dz_t W_hh`` *and* the weight
gradients ``dW_hh += dz_t^T h_{t-1}``, ``dW_ih += dz_t^T x_t``: two more small matrix products
of a transposed layout that XLA's CPU backend runs far below its peak, plus a read-modify-
write of the (G*H, H) accumulator, T times. Here the reverse scan does only what is
sequential (``dz_t`` and ``dh_{t-1} = dz_t W_hh``), and every ``chunk`` steps the weight
gradients of those steps are one matrix product over ``chunk * B`` rows::

    dW^T += [x; h_prev]^T dz        ((I + H) x chunk*B) @ (chunk*B x G*H)

with the chunk's operands still in cache (one product over all T*B rows would stream
them from memory and needs a (T, B, G*H) buffer; chunks of about 10 steps measured
fastest, see ``experiments/bench``). The input gradient ``dx = dz W_ih`` is one product per
chunk as well.

The forward pass saves per step only what the backward needs: the gate activations
(LSTM: i, f, g, o and c_{t-1}; GRU: r, z, n and W_hn h + b_hn; RNN: nothing), since the
hidden states h_{t-1} are the layer's own outputs shifted by one step. With ``remat=True``
it saves only the carry at the start of every chunk and the backward recomputes each
chunk's forward just before it needs it: memory O(T/chunk + chunk) steps instead of O(T),
for about one more forward pass.

``lengths`` follow ``scan_layer``'s packed-sequence rules: at ``t >= lengths[b]`` the carry
of sequence b stops changing and its output is zero.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["fused_scan", "DEFAULT_CHUNK", "MODES", "step_mask"]

MODES = ("RNN", "LSTM", "GRU")
DEFAULT_CHUNK = 10  # backward weight-gradient products every 10 steps (measured, see module doc)

_UNROLL = 1  # lax.scan unroll of the step loops (2 measured 0-7% slower)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of the scan (hashable: it is a ``nondiff_argnums`` argument)."""

    mode: str
    nonlinearity: str
    reverse: bool
    chunk: int
    remat: bool


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


def step_mask(lengths: Array | None, n_time: int) -> Array | None:
    """``(time, batch)`` bool, True at ``t < lengths[b]`` (packed sequences: the steps that
    count); None when ``lengths`` is None (every sequence full length). Exported by
    `jaxnets.rnn`, whose layers this module implements."""
    if lengths is None:
        return None
    return jnp.arange(n_time)[:, None] < jnp.asarray(lengths)[None, :]


def _prepare(mode: str, p: Mapping[str, Array]) -> dict[str, Array]:
    """Transposed weights and combined biases, computed once outside the scan."""
    g = p["weight_hh"].shape[0]
    dtype = p["weight_hh"].dtype
    b_ih = p.get("bias_ih", jnp.zeros((g,), dtype))
    b_hh = p.get("bias_hh", jnp.zeros((g,), dtype))
    q = {"wih_t": p["weight_ih"].T, "whh_t": p["weight_hh"].T}
    if mode == "GRU":
        # the reset gate multiplies W_hn h + b_hn: the two biases cannot be merged
        q["b_ih"], q["b_hh"] = b_ih[None, :], b_hh[None, :]
    else:
        q["b"] = (b_ih + b_hh)[None, :]
    return q


def _h(cfg: _Config, carry: Any) -> Array:
    return carry[0] if cfg.mode == "LSTM" else carry


def _step(cfg: _Config, q: Mapping[str, Array], carry: Any, x_t: Array, m_t: Array | None):
    """One forward step: ``(new_carry, y_t, residuals_t)``, equations as in ``jaxnets.rnn``."""
    if cfg.mode == "LSTM":
        h, c = carry
        n_h = h.shape[-1]
        z = x_t @ q["wih_t"] + h @ q["whh_t"] + q["b"]
        i = jax.nn.sigmoid(z[:, :n_h])
        f = jax.nn.sigmoid(z[:, n_h : 2 * n_h])
        g = jnp.tanh(z[:, 2 * n_h : 3 * n_h])
        o = jax.nn.sigmoid(z[:, 3 * n_h :])
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        new, out = (h_new, c_new), h_new
        res = (jnp.concatenate([i, f, g, o], axis=-1), c)
    elif cfg.mode == "GRU":
        h = carry
        n_h = h.shape[-1]
        gi = x_t @ q["wih_t"] + q["b_ih"]
        gh = h @ q["whh_t"] + q["b_hh"]
        r = jax.nn.sigmoid(gi[:, :n_h] + gh[:, :n_h])
        z = jax.nn.sigmoid(gi[:, n_h : 2 * n_h] + gh[:, n_h : 2 * n_h])
        gh_n = gh[:, 2 * n_h :]
        n = jnp.tanh(gi[:, 2 * n_h :] + r * gh_n)
        h_new = (1.0 - z) * n + z * h
        new = out = h_new
        res = (jnp.concatenate([r, z, n, gh_n], axis=-1),)
    else:
        a = x_t @ q["wih_t"] + carry @ q["whh_t"] + q["b"]
        new = out = jnp.tanh(a) if cfg.nonlinearity == "tanh" else jax.nn.relu(a)
        res = ()
    if m_t is None:
        return new, out, res
    keep = m_t[:, None]
    new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry)
    return new, jnp.where(keep, out, jnp.zeros_like(out)), res


def _back_step(cfg: _Config, whh: Array, dcarry: Any, inp: tuple):
    """Cotangents of one step, from the carry's and the output's.

    Returns ``(d_carry_prev, (dgi, dgh))``: the cotangents of the input pre-activation
    ``x W_ih^T + b_ih`` and the hidden one ``h W_hh^T + b_hh`` (the same array except for the
    GRU's n gate, where the reset gate sits between them).
    """
    dy, m, res, h_prev, y = inp
    dh = dcarry[0] if cfg.mode == "LSTM" else dcarry
    gh = dh + dy
    if m is not None:
        keep = m[:, None]
        zero = jnp.zeros_like(gh)
        pass_h = jnp.where(keep, zero, dh)  # a masked step hands its carry through
        gh = jnp.where(keep, gh, zero)
    if cfg.mode == "LSTM":
        acts, c_prev = res
        dc = dcarry[1]
        if m is not None:
            pass_c = jnp.where(keep, jnp.zeros_like(dc), dc)
            dc = jnp.where(keep, dc, jnp.zeros_like(dc))
        n_h = c_prev.shape[-1]
        i, f = acts[:, :n_h], acts[:, n_h : 2 * n_h]
        g, o = acts[:, 2 * n_h : 3 * n_h], acts[:, 3 * n_h :]
        tc = jnp.tanh(f * c_prev + i * g)
        dc = dc + gh * o * (1.0 - tc * tc)
        dz = jnp.concatenate(
            [
                dc * g * i * (1.0 - i),
                dc * c_prev * f * (1.0 - f),
                dc * i * (1.0 - g * g),
                gh * tc * o * (1.0 - o),
            ],
            axis=-1,
        )
        dh_prev, dc_prev = dz @ whh, dc * f
        if m is not None:
            dh_prev, dc_prev = dh_prev + pass_h, dc_prev + pass_c
        return (dh_prev, dc_prev), (dz, dz)
    if cfg.mode == "GRU":
        (gates,) = res
        n_h = h_prev.shape[-1]
        r, z = gates[:, :n_h], gates[:, n_h : 2 * n_h]
        n, gh_n = gates[:, 2 * n_h : 3 * n_h], gates[:, 3 * n_h :]
        dan = gh * (1.0 - z) * (1.0 - n * n)
        dar = dan * gh_n * r * (1.0 - r)
        daz = gh * (h_prev - n) * z * (1.0 - z)
        dgi = jnp.concatenate([dar, daz, dan], axis=-1)
        dgh = jnp.concatenate([dar, daz, dan * r], axis=-1)
        dh_prev = gh * z + dgh @ whh
        if m is not None:
            dh_prev = dh_prev + pass_h
        return dh_prev, (dgi, dgh)
    # RNN: y is h_t wherever the step counts (elsewhere gh is zero)
    da = gh * (1.0 - y * y) if cfg.nonlinearity == "tanh" else gh * (y > 0).astype(gh.dtype)
    dh_prev = da @ whh
    if m is not None:
        dh_prev = dh_prev + pass_h
    return dh_prev, (da, da)


# ---------------------------------------------------------------------------------------
# Scans
# ---------------------------------------------------------------------------------------


def _scan(cfg, q, xs, mask, carry0, save: bool, with_h_prev: bool = False, ybuf=None, t0=0):
    """Forward scan over ``xs`` (time-major). Returns ``(final, ys, res, h_prev)``;
    ``res`` (stacked residuals) only with ``save``, ``h_prev`` only with ``with_h_prev``.

    With ``ybuf`` (batch, T, H) the outputs are written into it at times ``t0 + i``
    (batch-major, the layer's layout: no (T, B, H) -> (B, T, H) transpose afterwards) and
    ``ys`` is the updated buffer; otherwise ``ys`` is time-major."""

    def body(state, inp):
        carry, buf = state
        x_t, m_t, t = inp
        new, y, res = _step(cfg, q, carry, x_t, m_t)
        extras = (res if save else None, _h(cfg, carry) if with_h_prev else None)
        if buf is None:
            return (new, None), (y,) + extras
        buf = jax.lax.dynamic_update_slice_in_dim(buf, y[:, None], t0 + t, axis=1)
        return (new, buf), (None,) + extras

    steps = jnp.arange(xs.shape[0])
    (final, buf), (ys, res, h_prev) = jax.lax.scan(
        body, (carry0, ybuf), (xs, mask, steps), reverse=cfg.reverse, unroll=_UNROLL
    )
    return final, (ys if ybuf is None else buf), res, h_prev


def _segments(n_time: int, k: int, reverse: bool) -> tuple[int, int, int, int]:
    """``(n_chunks, chunks_start, rem_start, rem_size)``: time is cut into n chunks of k
    steps and a remainder of ``T mod k`` steps, the remainder placed where the recurrence
    starts (time 0 forward, time T-1 reversed) so the backward meets it last."""
    n, r = divmod(n_time, k)
    return (n, r, 0, r) if not reverse else (n, 0, n * k, r)


def _slice(tree: Any, start, size: int) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), tree)


def _time_major_slice(a: Array, start, size: int) -> Array:
    """Steps ``start .. start+size-1`` of a batch-major (B, T, ...) array, as (size, B, ...)
    (a chunk-sized transpose, in cache)."""
    return jnp.swapaxes(jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), 0, 1)


def _forward_remat(cfg, q, xs, mask, carry0, ybuf):
    """Forward pass that keeps only the carry at the start of every chunk; outputs go
    into the batch-major ``ybuf``."""
    n_time = xs.shape[0]
    n, base, rs, r = _segments(n_time, cfg.chunk, cfg.reverse)
    carry = carry0
    if r:
        carry, ybuf, _, _ = _scan(
            cfg, q, xs[rs : rs + r], _sl(mask, rs, r), carry, False, ybuf=ybuf, t0=rs
        )
    bounds = None
    if n:

        def outer(state, j):
            carry, ybuf = state
            start = base + j * cfg.chunk
            x_c, m_c = _slice((xs, mask), start, cfg.chunk)
            new, ybuf, _, _ = _scan(cfg, q, x_c, m_c, carry, False, ybuf=ybuf, t0=start)
            return (new, ybuf), carry

        (carry, ybuf), bounds = jax.lax.scan(
            outer, (carry, ybuf), jnp.arange(n), reverse=cfg.reverse
        )
    return carry, ybuf, bounds


def _sl(a: Array | None, start: int, size: int) -> Array | None:
    return None if a is None else a[start : start + size]


def _join(reverse: bool, chunks: Array | None, rem: Array | None) -> Array:
    """Chunk part and remainder part back in time order (see ``_segments``)."""
    if rem is None:
        return chunks
    if chunks is None:
        return rem
    return jnp.concatenate([chunks, rem] if reverse else [rem, chunks], axis=0)


def _h_prev_from_outputs(cfg, ys, mask, h0, start, size: int):
    """h_{t-1} of steps ``start .. start+size-1`` (in recurrence order) from the outputs.

    The carry before step t is the previous step's output, or ``h0`` where that step did
    not count (before the first step; for a masked sequence, steps past its length, whose
    carry is the untouched initial one in the reverse direction). Where step t itself does
    not count, its h_{t-1} is never used.
    """
    n_time = ys.shape[1]  # ys is batch-major (B, T, H); the chunk comes out time-major
    y_c = _time_major_slice(ys, start, size)
    if not cfg.reverse:
        idx = start - 1
        row = ys[:, jnp.maximum(idx, 0)]
        prev = jnp.concatenate([row[None], y_c[:-1]], axis=0)
    else:
        idx = start + size
        row = ys[:, jnp.minimum(idx, n_time - 1)]
        prev = jnp.concatenate([y_c[1:], row[None]], axis=0)
    inside = (idx >= 0) & (idx < n_time)
    pos = jnp.arange(size) if not cfg.reverse else jnp.arange(size)[::-1]
    valid = jnp.where(pos == 0, inside, True)[:, None]  # (size, 1): only the edge row may fall off
    if mask is not None:
        m_c = jax.lax.dynamic_slice_in_dim(mask, start, size, axis=0)
        m_edge = mask[jnp.clip(idx, 0, n_time - 1)]
        if not cfg.reverse:
            m_prev = jnp.concatenate([m_edge[None], m_c[:-1]], axis=0)
        else:
            m_prev = jnp.concatenate([m_c[1:], m_edge[None]], axis=0)
        valid = valid & m_prev
    return jnp.where(valid[:, :, None], prev, h0[None])


def _weight_grads(cfg, x_c, hp_c, dgi, dgh):
    """This chunk's ``(dW_ih^T, dW_hh^T)`` contributions (or the stacked one for LSTM/RNN)
    as matrix products over chunk*batch rows, the transposed operand made explicitly
    (a small in-cache copy) so the product runs in XLA's fast layout."""
    rows = dgi.shape[0] * dgi.shape[1]

    def t(a):  # (k, B, n) -> (n, k*B)
        return jnp.transpose(a, (2, 0, 1)).reshape(a.shape[-1], rows)

    gi2 = dgi.reshape(rows, -1)
    if cfg.mode == "GRU":
        gh2 = dgh.reshape(rows, -1)
        return (t(x_c) @ gi2, t(hp_c) @ gh2), gi2.sum(0), gh2.sum(0)
    stacked = t(jnp.concatenate([x_c, hp_c], axis=-1)) @ gi2
    db = gi2.sum(0)
    return (stacked,), db, db


def _out_buffer(xs: Array, carry0: Any) -> Array:
    h0 = carry0[0] if isinstance(carry0, tuple) else carry0
    return jnp.zeros((xs.shape[1], xs.shape[0], h0.shape[-1]), xs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: _Config, p, xs, carry0, mask):
    q = _prepare(cfg.mode, p)
    final, ys, _, _ = _scan(cfg, q, xs, mask, carry0, False, ybuf=_out_buffer(xs, carry0))
    return ys, final


def _fused_fwd(cfg: _Config, p, xs, carry0, mask):
    q = _prepare(cfg.mode, p)
    ybuf = _out_buffer(xs, carry0)
    if cfg.remat:
        final, ys, bounds = _forward_remat(cfg, q, xs, mask, carry0, ybuf)
        return (ys, final), (p, xs, carry0, mask, None, None, bounds)
    final, ys, res, _ = _scan(cfg, q, xs, mask, carry0, True, ybuf=ybuf)
    return (ys, final), (p, xs, carry0, mask, ys, res, None)


def _fused_bwd(cfg: _Config, saved, cotangents):
    p, xs, carry0, mask, ys, res, bounds = saved
    dys, dfinal = cotangents
    q = _prepare(cfg.mode, p)
    whh = p["weight_hh"]
    n_time, _, n_in = xs.shape
    n, base, rs, r = _segments(n_time, cfg.chunk, cfg.reverse)
    h0 = _h(cfg, carry0)

    def segment(dcarry, acc, start, size: int, carry_in):
        x_c, m_c = _slice((xs, mask), start, size)
        dy_c = _time_major_slice(dys, start, size)
        if cfg.remat:  # recompute this chunk's forward from the carry saved at its start
            _, y_c, res_c, hp_c = _scan(cfg, q, x_c, m_c, carry_in, True, with_h_prev=True)
        else:
            y_c, res_c = _time_major_slice(ys, start, size), _slice(res, start, size)
            hp_c = _h_prev_from_outputs(cfg, ys, mask, h0, start, size)
        dcarry, (dgi, dgh) = jax.lax.scan(
            functools.partial(_back_step, cfg, whh),
            dcarry,
            (dy_c, m_c, res_c, hp_c, y_c),
            reverse=not cfg.reverse,
            unroll=_UNROLL,
        )
        w, dbi, dbh = _weight_grads(cfg, x_c, hp_c, dgi, dgh)
        acc = jax.tree.map(jnp.add, acc, (w, dbi, dbh))
        dx_c = (dgi.reshape(-1, dgi.shape[-1]) @ p["weight_ih"]).reshape(x_c.shape)
        return dcarry, acc, dx_c

    g = p["weight_hh"].shape[0]
    n_h = whh.shape[1]
    dtype = whh.dtype
    if cfg.mode == "GRU":
        w0 = (jnp.zeros((n_in, g), dtype), jnp.zeros((n_h, g), dtype))
    else:
        w0 = (jnp.zeros((n_in + n_h, g), dtype),)
    acc = (w0, jnp.zeros((g,), dtype), jnp.zeros((g,), dtype))
    dcarry = dfinal
    dx_ch = dx_rem = None
    if n:

        def outer(state, j):
            dcarry, acc = state
            carry_in = jax.tree.map(lambda b: b[j], bounds) if cfg.remat else None
            dcarry, acc, dx_c = segment(dcarry, acc, base + j * cfg.chunk, cfg.chunk, carry_in)
            return (dcarry, acc), dx_c

        (dcarry, acc), dx_ch = jax.lax.scan(
            outer, (dcarry, acc), jnp.arange(n), reverse=not cfg.reverse
        )
        dx_ch = dx_ch.reshape((n * cfg.chunk,) + dx_ch.shape[2:])
    if r:
        dcarry, acc, dx_rem = segment(dcarry, acc, rs, r, carry0)
    (w, dbi, dbh) = acc
    if cfg.mode == "GRU":
        grads = {"weight_ih": w[0].T, "weight_hh": w[1].T}
    else:
        grads = {"weight_ih": w[0][:n_in].T, "weight_hh": w[0][n_in:].T}
    if "bias_ih" in p:
        grads["bias_ih"], grads["bias_hh"] = dbi, dbh
    dxs = _join(cfg.reverse, dx_ch, dx_rem)
    return grads, dxs, dcarry, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_scan(
    mode: str,
    params: Mapping[str, Array],
    x: Float[Array, "batch time features"],
    carry0: Any,
    lengths: Int[Array, " batch"] | None = None,
    *,
    reverse: bool = False,
    nonlinearity: str = "tanh",
    chunk: int = DEFAULT_CHUNK,
    remat: bool = False,
) -> tuple[Float[Array, "batch time hidden"], Any]:
    """One direction of one recurrent layer: ``(outputs, final_carry)``.

    The same values as ``jaxnets.rnn.scan_layer(step, params, x, carry0, lengths, reverse)``
    for ``mode`` "RNN" (``nonlinearity`` "tanh" or "relu"), "LSTM" (no ``weight_hr``) or
    "GRU", and the same gradient, computed by the chunked backward of the module docstring.

    Args:
      params: one cell's PyTorch-layout parameters, ``weight_ih`` (G*H, I), ``weight_hh``
        (G*H, H) and optionally ``bias_ih``, ``bias_hh`` (G*H,).
      x: ``(batch, time, I)``; carry0: ``h0`` (batch, H), or ``(h0, c0)`` for the LSTM.
      lengths: ``(batch,)`` ints in 1..time (packed-sequence semantics) or None.
      chunk: steps per weight-gradient product in the backward (and per saved carry with
        ``remat``); any value >= 1 gives the same result.
      remat: keep only the carry every ``chunk`` steps, recompute the rest in the backward.

    Returns:
      ``outputs`` ``(batch, time, H)`` (zero past each length) and the final carry.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if "weight_hr" in params:
        raise ValueError("params: fused_scan has no projection (weight_hr); use scan_layer")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    # one compute dtype, as scan_layer's promotion gives (float32 params, float64 x -> float64)
    dtype = jnp.result_type(x, *params.values())
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    carry0 = jax.tree.map(lambda a: jnp.asarray(a, dtype), carry0)
    xs = jnp.swapaxes(jnp.asarray(x, dtype), 0, 1)
    n_time = xs.shape[0]
    mask = step_mask(lengths, n_time)
    cfg = _Config(mode, nonlinearity, bool(reverse), min(chunk, n_time), bool(remat))
    ys, final = _fused(cfg, params, xs, carry0, mask)  # ys batch-major already
    return ys, final
