"""Seq2seq (many-to-many, autoregressive decoder): a recurrent encoder, a decoder cell
unrolled step by step with optional additive (Bahdanau) or multiplicative (Luong)
attention, as pure functions (`decoder_step`, the attentions) under a Flax module
(`Seq2Seq`); `greedy_decode` and `beam_search` decode freely.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets.rnn import CELLS, GATES, cell_params, step_function
from jaxnets.seq.models import (
    _check_cell,
    _check_tokens,
    last_layer_state,
    length_mask,
    recurrent_layer,
)

__all__ = [
    "ATTENTIONS",
    "Seq2Seq",
    "Memory",
    "DecoderSpec",
    "decoder_step",
    "additive_attention",
    "multiplicative_attention",
    "masked_softmax",
    "greedy_decode",
    "beam_search",
]

ATTENTIONS = (None, "bahdanau", "luong")


class Memory(NamedTuple):
    """What the decoder attends over (computed once per source batch)."""

    values: Float[Array, "batch src mem"]  # encoder outputs
    keys: Float[Array, "batch src attn"] | None  # W_k values (additive attention only)
    mask: Array  # (batch, src) bool, True on real source symbols


class DecoderSpec(NamedTuple):
    """Static description of a decoder: which cell, attention and how many layers."""

    cell: str
    attention: str | None
    num_layers: int


def masked_softmax(scores: Float[Array, "batch src"], mask: Array) -> Float[Array, "batch src"]:
    """``softmax`` over the masked-in entries of each row; exactly 0 on masked-out ones.

    Each row needs at least one True in ``mask`` (``lengths >= 1`` guarantees it).
    """
    scores = jnp.where(mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.where(mask, weights, 0.0)


def additive_attention(
    params: Mapping[str, Array],
    query: Float[Array, "batch q"],
    memory: Memory,
) -> tuple[Float[Array, "batch mem"], Float[Array, "batch src"]]:
    """Bahdanau et al. (2015): ``e_j = v^T tanh(W_q s + W_k h_j)``, ``a = softmax(e)``,
    ``context = sum_j a_j h_j``. ``memory.keys`` holds the precomputed ``W_k h_j``.

    Returns ``(context (batch, mem), weights (batch, src))``.
    """
    q = query @ params["query"]  # (batch, attn)
    scores = jnp.tanh(memory.keys + q[:, None, :]) @ params["v"]
    weights = masked_softmax(scores, memory.mask)
    return jnp.einsum("bs,bsm->bm", weights, memory.values), weights


def multiplicative_attention(
    params: Mapping[str, Array],
    query: Float[Array, "batch q"],
    memory: Memory,
) -> tuple[Float[Array, "batch mem"], Float[Array, "batch src"]]:
    """Luong et al. (2015), "general" score: ``e_j = s^T W_a h_j``, ``a = softmax(e)``,
    ``context = sum_j a_j h_j``. Returns ``(context, weights)`` as ``additive_attention``.
    """
    q = query @ params["w"]  # (batch, mem)
    scores = jnp.einsum("bm,bsm->bs", q, memory.values)
    weights = masked_softmax(scores, memory.mask)
    return jnp.einsum("bs,bsm->bm", weights, memory.values), weights


def decoder_step(
    spec: DecoderSpec,
    params: Mapping[str, Any],
    memory: Memory,
    carry: tuple[tuple, Array],
    y_prev: Int[Array, " batch"],
) -> tuple[tuple[tuple, Array], Float[Array, "batch vocab"], Array]:
    """One decoder step: previous symbol in, next-symbol logits out.

    ``carry = (cell_states, o_prev)``: one cell carry per layer and the previous
    attentional output (used by Luong's input feeding). With ``e = embed(y_prev)``:

    - no attention: ``s_t = cell(e, s_{t-1})``, ``o_t = tanh(W_c s_t)``
    - Bahdanau:     ``c_t = attend(s_{t-1}, H)``, ``s_t = cell([e; c_t], s_{t-1})``,
      ``o_t = tanh(W_c [s_t; c_t])``
    - Luong:        ``s_t = cell([e; o_{t-1}], s_{t-1})``, ``c_t = attend(s_t, H)``,
      ``o_t = tanh(W_c [s_t; c_t])``

    then ``logits = W_out o_t + b_out`` (``s`` is the top layer's h). Returns
    ``((cell_states, o_t), logits (batch, vocab), weights (batch, src))``; weights are
    zeros of shape ``(batch, 1)`` without attention.
    """
    states, o_prev = carry
    step = step_function(CELLS[spec.cell])
    x = params["embed"][y_prev]
    batch = y_prev.shape[0]
    weights = jnp.zeros((batch, 1), x.dtype)
    attend = additive_attention if spec.attention == "bahdanau" else multiplicative_attention
    if spec.attention == "bahdanau":
        context, weights = attend(params["attention"], _hidden(states[-1]), memory)
        x = jnp.concatenate([x, context], axis=-1)
    elif spec.attention == "luong":
        x = jnp.concatenate([x, o_prev], axis=-1)
    new_states = []
    for layer in range(spec.num_layers):
        st, x = step(params["cells"][layer], states[layer], x)
        new_states.append(st)
    features = [x]
    if spec.attention == "luong":
        context, weights = attend(params["attention"], x, memory)
    if spec.attention is not None:
        features.append(context)
    o = jnp.tanh(
        jnp.concatenate(features, axis=-1) @ params["combine"]["kernel"]
        + params["combine"]["bias"][None, :]
    )
    logits = o @ params["out"]["kernel"] + params["out"]["bias"][None, :]
    return (tuple(new_states), o), logits, weights


def _hidden(state):
    """h of a cell carry: ``h`` itself, or the h of an LSTM's ``(h, c)``."""
    return state[0] if isinstance(state, tuple) else state


class Seq2Seq(nn.Module):
    """Encoder-decoder for sequence transduction (translation, grapheme-to-phoneme).

    Encoder: ``embed -> jaxnets.rnn layer`` (bidirectional allowed: the source is read
    whole before decoding starts). Bridge: the decoder's initial state is
    ``tanh(W_h [h_fwd; h_bwd] + b)`` for every decoder layer (for an LSTM also
    ``c_0 = W_c [c_fwd; c_bwd] + b``) from the encoder's last layer. Decoder: the pure
    ``decoder_step`` unrolled with ``lax.scan``; it is autoregressive, hence
    unidirectional.

    ``__call__`` is teacher forcing: ``tgt_in = [BOS, y_1 .. y_{n-1}]`` ->
    ``(logits (batch, T, tgt_vocab), attention weights (batch, T, src) or None)``, to be
    scored against ``[y_1 .. y_n]``. ``greedy_decode`` / ``beam_search`` decode freely.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int = 64
    hidden_size: int = 128
    cell: str = "lstm"
    encoder_layers: int = 1
    decoder_layers: int = 1
    bidirectional_encoder: bool = True
    attention: str | None = "bahdanau"
    attention_size: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        _check_cell(self.cell)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {self.attention!r}")
        if self.decoder_layers < 1:
            raise ValueError(f"decoder_layers: expected a positive int, got {self.decoder_layers}")
        super().__post_init__()

    @property
    def spec(self) -> DecoderSpec:
        return DecoderSpec(self.cell, self.attention, self.decoder_layers)

    @property
    def memory_size(self) -> int:
        return self.hidden_size * (2 if self.bidirectional_encoder else 1)

    def setup(self):
        h, e, m = self.hidden_size, self.embed_dim, self.memory_size
        self.src_embed = nn.Embed(self.src_vocab_size, e)
        self.encoder = recurrent_layer(
            self.cell, h, self.encoder_layers, self.bidirectional_encoder, self.dropout
        )
        self.enc_dropout = nn.Dropout(self.dropout)
        self.bridge_h = nn.Dense(h * self.decoder_layers)
        if self.cell == "lstm":
            self.bridge_c = nn.Dense(h * self.decoder_layers)
        embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        extra = {None: 0, "bahdanau": m, "luong": h}[self.attention]
        cells = tuple(
            cell_params(
                self,
                gates=GATES[CELLS[self.cell].mode],
                hidden_size=h,
                input_size=e + extra if layer == 0 else h,
                recurrent_size=h,
                prefix=f"dec_l{layer}_",
            )
            for layer in range(self.decoder_layers)
        )
        lecun = nn.initializers.lecun_normal()
        zeros = nn.initializers.zeros
        combine_in = h + (m if self.attention else 0)
        dec = {
            "embed": self.param("tgt_embed", embed_init, (self.tgt_vocab_size, e)),
            "cells": cells,
            "combine": {
                "kernel": self.param("combine_kernel", lecun, (combine_in, h)),
                "bias": self.param("combine_bias", zeros, (h,)),
            },
            "out": {
                "kernel": self.param("out_kernel", lecun, (h, self.tgt_vocab_size)),
                "bias": self.param("out_bias", zeros, (self.tgt_vocab_size,)),
            },
        }
        if self.attention == "bahdanau":
            a = self.attention_size
            dec["attention"] = {
                "query": self.param("attn_query", lecun, (h, a)),
                "key": self.param("attn_key", lecun, (m, a)),
                "v": self.param("attn_v", lecun, (a, 1)),
            }
        elif self.attention == "luong":
            dec["attention"] = {"w": self.param("attn_w", lecun, (h, m))}
        self.dec = dec

    def decoder_params(self) -> dict[str, Any]:
        """The decoder's parameters as the pytree ``decoder_step`` takes."""
        p = dict(self.dec)
        if "attention" in p and "v" in p["attention"]:
            p["attention"] = dict(p["attention"], v=p["attention"]["v"][:, 0])
        return p

    def encode(
        self,
        src: Int[Array, "batch src"],
        src_lengths: Int[Array, " batch"] | None = None,
        deterministic: bool = True,
    ) -> tuple[Memory, tuple[tuple, Array]]:
        """Read the source: ``(memory, initial decoder carry)``."""
        _check_tokens(src, src_lengths, "src")
        x = self.enc_dropout(self.src_embed(src), deterministic=deterministic)
        outputs, final = self.encoder(x, lengths=src_lengths, deterministic=deterministic)
        outputs = self.enc_dropout(outputs, deterministic=deterministic)
        directions = 2 if self.bidirectional_encoder else 1
        batch, h = src.shape[0], self.hidden_size
        h0 = jnp.tanh(self.bridge_h(last_layer_state(final, directions)))
        h0 = h0.reshape(batch, self.decoder_layers, h)
        if self.cell == "lstm":
            c_last = jnp.concatenate(list(final[1][-directions:]), axis=-1)
            c0 = self.bridge_c(c_last).reshape(batch, self.decoder_layers, h)
            states = tuple((h0[:, k], c0[:, k]) for k in range(self.decoder_layers))
        else:
            states = tuple(h0[:, k] for k in range(self.decoder_layers))
        keys = None
        if self.attention == "bahdanau":
            keys = outputs @ self.dec["attention"]["key"]
        mask = length_mask(src_lengths, src.shape[1], batch)
        return Memory(outputs, keys, mask), (states, jnp.zeros((batch, h), outputs.dtype))

    def __call__(
        self,
        src: Int[Array, "batch src"],
        src_lengths: Int[Array, " batch"] | None,
        tgt_in: Int[Array, "batch tgt"],
        deterministic: bool = True,
    ) -> tuple[Float[Array, "batch tgt vocab"], Float[Array, "batch tgt src"] | None]:
        """Teacher forcing: every decoder input is the true previous symbol."""
        _check_tokens(tgt_in, None, "tgt_in")
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(
                f"tgt_in: expected batch {src.shape[0]} (as src), got shape {tgt_in.shape}"
            )
        memory, carry = self.encode(src, src_lengths, deterministic)
        params = self.decoder_params()
        spec = self.spec

        def body(carry, y_prev):
            carry, logits, weights = decoder_step(spec, params, memory, carry, y_prev)
            return carry, (logits, weights)

        _, (logits, weights) = jax.lax.scan(body, carry, tgt_in.T)
        logits = jnp.swapaxes(logits, 0, 1)
        weights = jnp.swapaxes(weights, 0, 1) if self.attention else None
        return logits, weights


def _encode(model: Seq2Seq, variables, src, src_lengths):
    memory, carry = model.apply(variables, src, src_lengths, method=Seq2Seq.encode)
    params = model.apply(variables, method=Seq2Seq.decoder_params)
    return memory, carry, params


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _greedy(model, variables, src, src_lengths, max_len, bos_id, eos_id, pad_id):
    memory, carry, params = _encode(model, variables, src, src_lengths)
    batch = src.shape[0]

    def body(state, _):
        carry, y_prev, done = state
        carry, logits, weights = decoder_step(model.spec, params, memory, carry, y_prev)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        return (carry, tok, done | (tok == eos_id)), (tok, weights)

    init = (carry, jnp.full((batch,), bos_id, jnp.int32), jnp.zeros((batch,), bool))
    _, (toks, weights) = jax.lax.scan(body, init, None, length=max_len)
    return toks.T, jnp.swapaxes(weights, 0, 1)


def _check_decode_args(model, src, src_lengths, max_len):
    if not isinstance(model, Seq2Seq):
        raise TypeError(f"model: expected a Seq2Seq, got {type(model).__name__}")
    _check_tokens(src, src_lengths, "src")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")


def greedy_decode(
    model: Seq2Seq,
    variables: Mapping,
    src: Int[Array, "batch src"],
    src_lengths: Int[Array, " batch"] | None,
    max_len: int,
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
) -> tuple[Int[Array, "batch max_len"], Float[Array, "batch max_len src"]]:
    """Feed back the most likely symbol at every step (jit-compiled ``lax.scan``).

    Returns ``(tokens, weights)``: ``tokens`` ``(batch, max_len)`` int32 with EOS where a
    sequence ends and PAD after it; ``weights`` the attention of every step
    ``(batch, max_len, src)`` (``(batch, max_len, 1)`` zeros without attention).
    """
    _check_decode_args(model, src, src_lengths, max_len)
    if src_lengths is None:
        src_lengths = jnp.full((np.shape(src)[0],), np.shape(src)[1], jnp.int32)
    return _greedy(
        model,
        variables,
        jnp.asarray(src),
        jnp.asarray(src_lengths),
        max_len,
        bos_id,
        eos_id,
        pad_id,
    )


_NEG = -1e9  # score of a dead beam: far below any real log-probability, yet finite


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_len"))
def _beam(
    model, variables, src, src_lengths, beam_size, max_len, bos_id, eos_id, pad_id, length_penalty
):
    memory, carry, params = _encode(model, variables, src, src_lengths)
    batch, k = src.shape[0], beam_size
    vocab = model.tgt_vocab_size
    # Every beam of a source reads the same memory: tile it beam-major within the batch.
    tile = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731
    memory = jax.tree.map(tile, memory)
    carry = jax.tree.map(tile, carry)
    scores = jnp.full((batch, k), _NEG).at[:, 0].set(0.0)  # one live beam at the start
    toks = jnp.full((batch, k, max_len), pad_id, jnp.int32)
    done = jnp.zeros((batch, k), bool)
    y_prev = jnp.full((batch * k,), bos_id, jnp.int32)
    only_pad = jnp.full((vocab,), _NEG).at[pad_id].set(0.0)

    def body(state, t):
        carry, y_prev, scores, toks, done = state
        carry, logits, _ = decoder_step(model.spec, params, memory, carry, y_prev)
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
        # A finished beam can only continue with PAD, at no cost.
        logp = jnp.where(done[:, :, None], only_pad[None, None, :], logp)
        cand = (scores[:, :, None] + logp).reshape(batch, k * vocab)
        scores, flat = jax.lax.top_k(cand, k)
        parent, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        toks = jnp.take_along_axis(toks, parent[:, :, None], axis=1).at[:, :, t].set(tok)
        done = jnp.take_along_axis(done, parent, axis=1) | (tok == eos_id)
        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        carry = jax.tree.map(lambda a: a[rows], carry)
        return (carry, tok.reshape(-1), scores, toks, done), None

    init = (carry, y_prev, scores, toks, done)
    (_, _, scores, toks, done), _ = jax.lax.scan(body, init, jnp.arange(max_len))
    lengths = jnp.sum((toks != pad_id) & (toks != eos_id), axis=-1) + 1
    norm = ((5.0 + lengths) / 6.0) ** length_penalty  # GNMT length normalisation
    rank = scores / norm + jnp.where(done, 0.0, _NEG)  # finished hypotheses first
    best = jnp.argmax(rank, axis=1)

    def pick(a):
        idx = best[:, None] if a.ndim == 2 else best[:, None, None]
        return jnp.take_along_axis(a, idx, axis=1)[:, 0]

    return pick(toks), pick(scores)


def beam_search(
    model: Seq2Seq,
    variables: Mapping,
    src: Int[Array, "batch src"],
    src_lengths: Int[Array, " batch"] | None,
    max_len: int,
    beam_size: int = 4,
    length_penalty: float = 0.0,
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
) -> tuple[Int[Array, "batch max_len"], Float[Array, " batch"]]:
    """Beam search: keep the ``beam_size`` best prefixes by summed log-probability.

    Each step extends every live beam by every symbol and keeps the top ``beam_size``
    of the ``beam_size * vocab`` candidates; finished beams (EOS emitted) carry on with
    PAD at no cost. The result is the best finished hypothesis, ranked by
    ``log p / ((5 + len) / 6) ** length_penalty`` (0 = raw log-probability). With
    ``beam_size=1`` this is exactly ``greedy_decode``.

    Returns ``(tokens (batch, max_len), log-probability (batch,))``.
    """
    _check_decode_args(model, src, src_lengths, max_len)
    if not isinstance(beam_size, int) or not 1 <= beam_size <= model.tgt_vocab_size:
        raise ValueError(
            f"beam_size: expected an int in 1..{model.tgt_vocab_size} (the target "
            f"vocabulary), got {beam_size!r}"
        )
    if src_lengths is None:
        src_lengths = jnp.full((np.shape(src)[0],), np.shape(src)[1], jnp.int32)
    return _beam(
        model,
        variables,
        jnp.asarray(src),
        jnp.asarray(src_lengths),
        beam_size,
        max_len,
        bos_id,
        eos_id,
        pad_id,
        jnp.asarray(length_penalty, jnp.float32),
    )
