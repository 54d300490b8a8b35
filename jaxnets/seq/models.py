"""Sequence models on top of ``jaxnets.rnn``: the notes' three task shapes and seq2seq.

- ``SequenceClassifier`` (many-to-one): embed -> recurrent layer -> last state or pooled
  outputs -> dense head. ``(batch, time)`` ids -> ``(batch, classes)`` logits.
- ``LanguageModel`` (one-to-many, autoregressive): embed -> unidirectional recurrent
  layer -> next-symbol logits ``(batch, time, vocab)``; ``generate`` samples from it with
  a jit-compiled ``lax.scan``.
- ``Tagger`` (many-to-many, non-autoregressive): a label per time step, bidirectional
  allowed ``(batch, time, tags)``.
- ``Seq2Seq`` (many-to-many, autoregressive decoder) with attention, ``greedy_decode`` and
  ``beam_search`` live in `jaxnets.seq.seq2seq` (``jaxnets.seq.models.Seq2Seq`` etc.
  still find them).

Every model takes ``lengths`` (``(batch,)`` ints >= 1): positions at or past a
sequence's length never influence its result (packed-sequence semantics of
``jaxnets.rnn``; pooling and attention mask them out).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxnets.rnn import (
    CELLS,
    check_lengths,
    step_mask,
    time_dropout,
)

__all__ = [
    "CELLS",
    "POOLINGS",
    "recurrent_layer",
    "embed_and_encode",
    "last_layer_state",
    "masked_mean",
    "masked_max",
    "length_mask",
    "SequenceClassifier",
    "LanguageModel",
    "Tagger",
    "sample_logits",
    "generate",
]

POOLINGS = ("last", "mean", "max")


# ---------------------------------------------------------------------------------------
# Checks and small pure helpers
# ---------------------------------------------------------------------------------------


def _check_cell(cell: str) -> None:
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {tuple(CELLS)}, got {cell!r}")


def _check_tokens(tokens, lengths, name: str = "tokens") -> None:
    """Clear errors for the ``(batch, time)`` int ids and ``(batch,)`` lengths."""
    if np.ndim(tokens) != 2:
        raise ValueError(
            f"{name}: expected a 2-D (batch, time) array of ids, got shape {np.shape(tokens)}"
        )
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise TypeError(f"{name}: expected integer ids, got dtype {jnp.result_type(tokens)}")
    if lengths is None:
        return
    batch, n_time = np.shape(tokens)
    check_lengths(lengths, batch, n_time, name)


def length_mask(lengths: Int[Array, " batch"] | None, n_time: int, batch: int) -> Array:
    """``(batch, time)`` bool, True at ``t < lengths[b]`` (all True when lengths is None)."""
    if lengths is None:
        return jnp.ones((batch, n_time), dtype=bool)
    return step_mask(lengths, n_time).T


def recurrent_layer(
    cell: str,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    name: str | None = None,
    variational_dropout: bool = False,
) -> nn.Module:
    """The ``jaxnets.rnn`` layer named by ``cell`` ("rnn" = tanh Elman, "lstm", "gru")."""
    _check_cell(cell)
    return CELLS[cell](
        hidden_size=hidden_size,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=dropout,
        variational_dropout=variational_dropout,
        name=name,
    )


def last_layer_state(final_state: Any, directions: int) -> Float[Array, "batch dh"]:
    """The last layer's final ``h`` of every direction, concatenated: ``(batch, D*H)``.

    ``final_state`` is ``h_n`` ``(directions * layers, batch, H)`` or ``(h_n, c_n)``;
    PyTorch's order puts the last layer's directions at the end. With ``lengths`` the
    forward h is the state after each sequence's own last symbol and the backward h the
    state after reading it back to the first.
    """
    h = final_state[0] if isinstance(final_state, tuple) else final_state
    return jnp.concatenate(list(h[-directions:]), axis=-1)


def embed_and_encode(
    model: nn.Module,
    tokens: Int[Array, "batch time"],
    lengths: Int[Array, " batch"] | None,
    deterministic: bool,
    *,
    initial_state: Any = None,
    variational: bool = False,
) -> tuple[Float[Array, "batch time dh"], Any]:
    """The front every token model shares: ids -> ``Embed`` (params ``"embed"``) ->
    dropout -> the ``jaxnets.rnn`` layer (params ``"rnn"``; dropout between its layers) ->
    ``(outputs, final_state)``. Call it inside ``model``'s compact ``__call__``; ``model``
    supplies ``vocab_size``, ``embed_dim``, ``cell``, ``hidden_size``, ``num_layers``,
    ``dropout`` and ``bidirectional`` (False when it has none). ``variational``: one
    dropout mask per sequence shared over time (`jaxnets.rnn.time_dropout`)."""
    _check_tokens(tokens, lengths)
    x = nn.Embed(model.vocab_size, model.embed_dim, name="embed")(tokens)
    x = time_dropout(model.dropout, variational, x, deterministic)
    rnn = recurrent_layer(
        model.cell,
        model.hidden_size,
        model.num_layers,
        bool(getattr(model, "bidirectional", False)),
        model.dropout,
        "rnn",
        variational,
    )
    return rnn(x, initial_state=initial_state, lengths=lengths, deterministic=deterministic)


def masked_mean(
    x: Float[Array, "batch time d"], lengths: Int[Array, " batch"] | None
) -> Float[Array, "batch d"]:
    """Mean of ``x`` over the first ``lengths[b]`` steps of each row."""
    mask = length_mask(lengths, x.shape[1], x.shape[0])
    total = jnp.sum(jnp.where(mask[:, :, None], x, 0.0), axis=1)
    return total / jnp.sum(mask, axis=1, keepdims=True).astype(x.dtype)


def masked_max(
    x: Float[Array, "batch time d"], lengths: Int[Array, " batch"] | None
) -> Float[Array, "batch d"]:
    """Maximum of ``x`` over the first ``lengths[b]`` steps of each row."""
    mask = length_mask(lengths, x.shape[1], x.shape[0])
    return jnp.max(jnp.where(mask[:, :, None], x, -jnp.inf), axis=1)


# ---------------------------------------------------------------------------------------
# Many-to-one
# ---------------------------------------------------------------------------------------


class SequenceClassifier(nn.Module):
    """Many-to-one classifier: ``logits = W pool(RNN(embed(tokens)))) + b``.

    ``pooling``: "last" takes the last layer's final h of each direction (at each
    sequence's own end), "mean"/"max" pool the top layer's outputs over the first
    ``lengths[b]`` steps. ``(batch, time)`` int ids -> ``(batch, num_classes)`` logits.
    The pooled features are sown as ``intermediates/features``.
    """

    vocab_size: int
    num_classes: int
    embed_dim: int = 64
    hidden_size: int = 128
    cell: str = "lstm"
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    pooling: str = "last"

    def __post_init__(self):
        _check_cell(self.cell)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "batch time"],
        lengths: Int[Array, " batch"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "batch classes"]:
        outputs, final = embed_and_encode(self, tokens, lengths, deterministic)
        if self.pooling == "last":
            feats = last_layer_state(final, 2 if self.bidirectional else 1)
        elif self.pooling == "mean":
            feats = masked_mean(outputs, lengths)
        else:
            feats = masked_max(outputs, lengths)
        self.sow("intermediates", "features", feats)
        feats = nn.Dropout(self.dropout)(feats, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="head")(feats)


# ---------------------------------------------------------------------------------------
# One-to-many: language model and generation
# ---------------------------------------------------------------------------------------


class LanguageModel(nn.Module):
    """Autoregressive next-symbol model ``p(x_{t+1} | x_{<=t}) = softmax(W h_t + b)``.

    ``(batch, time)`` ids -> ``((batch, time, vocab) logits, final_state)``; pass the
    final state back as ``initial_state`` to continue a stream (truncated BPTT, or
    generation one step at a time). Unidirectional only: see ``bidirectional``.

    ``dropout`` acts on the embeddings, between recurrent layers and before the head; with
    ``variational_dropout`` each of those masks is drawn once per sequence and shared by
    every time step (Gal & Ghahramani, 2016).
    """

    vocab_size: int
    embed_dim: int = 64
    hidden_size: int = 256
    cell: str = "lstm"
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False  # only here to be refused with an explanation
    variational_dropout: bool = False

    def __post_init__(self):
        _check_cell(self.cell)
        if self.bidirectional:
            raise ValueError(
                "bidirectional=True: a LanguageModel is autoregressive (it predicts the "
                "next symbol from the past only), so it cannot see the future; a backward "
                "direction would read the very symbols it is asked to predict. Use a "
                "unidirectional LanguageModel, or a Tagger/SequenceClassifier for "
                "bidirectional (non-autoregressive) tasks."
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "batch time"],
        initial_state: Any = None,
        lengths: Int[Array, " batch"] | None = None,
        deterministic: bool = True,
    ) -> tuple[Float[Array, "batch time vocab"], Any]:
        var = self.variational_dropout
        outputs, final = embed_and_encode(
            self, tokens, lengths, deterministic, initial_state=initial_state, variational=var
        )
        outputs = time_dropout(self.dropout, var, outputs, deterministic)
        return nn.Dense(self.vocab_size, name="head")(outputs), final


def sample_logits(
    logits: Float[Array, "batch vocab"],
    key: Array,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
) -> Int[Array, " batch"]:
    """Draw one id per row from ``softmax(logits / temperature)``.

    ``top_k`` keeps only the k largest logits of each row (ties with the k-th kept too);
    ``temperature <= 0`` means greedy (argmax). Deterministic given ``key``.
    """
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    temperature = jnp.asarray(temperature, logits.dtype)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    drawn = jax.random.categorical(key, logits / safe_t, axis=-1)
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "top_k"))
def _generate(
    model, variables, prompt, prompt_lengths, key, temperature, num_steps, top_k, suppress
):
    logits, state = model.apply(variables, prompt, lengths=prompt_lengths)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]

    def body(carry, t):
        state, logits = carry
        logits = jnp.where(suppress[None, :], -jnp.inf, logits)
        tok = sample_logits(logits, jax.random.fold_in(key, t), temperature, top_k)
        new_logits, state = model.apply(variables, tok[:, None], initial_state=state)
        return (state, new_logits[:, 0]), tok

    _, toks = jax.lax.scan(body, (state, last), jnp.arange(num_steps))
    return toks.T


def generate(
    model: LanguageModel,
    variables: Mapping,
    prompt: Int[Array, "batch prompt"],
    num_steps: int,
    key: Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    prompt_lengths: Int[Array, " batch"] | None = None,
    suppress_ids: tuple[int, ...] = (),
) -> Int[Array, "batch steps"]:
    """Continue ``prompt`` by ``num_steps`` sampled symbols (jit-compiled ``lax.scan``).

    The prompt is read in one pass (its last logits and state at ``prompt_lengths[b]``
    when given, so prompts of different lengths share a batch), then each step draws
    ``x_{t+1} ~ sample_logits(logits_t, fold_in(key, t), temperature, top_k)`` and feeds
    it back. ``temperature=0`` is greedy decoding. Ids in ``suppress_ids`` (e.g. PAD,
    BOS) are never drawn. Same key -> same output. Returns ``(batch, num_steps)`` int32.
    """
    if not isinstance(model, LanguageModel):
        raise TypeError(f"model: expected a LanguageModel, got {type(model).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim == 1:
        prompt = prompt[None, :]
    _check_tokens(prompt, prompt_lengths, "prompt")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    if top_k is not None and not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k: expected 1..{model.vocab_size} or None, got {top_k!r}")
    if prompt_lengths is None:
        prompt_lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    suppress = jnp.zeros(model.vocab_size, bool).at[jnp.asarray(suppress_ids, jnp.int32)].set(True)
    return _generate(
        model,
        variables,
        prompt,
        jnp.asarray(prompt_lengths, jnp.int32),
        key,
        jnp.asarray(temperature, jnp.float32),
        num_steps,
        top_k,
        suppress,
    )


# ---------------------------------------------------------------------------------------
# Many-to-many, non-autoregressive
# ---------------------------------------------------------------------------------------


class Tagger(nn.Module):
    """A label per time step: ``logits_t = W h_t + b``, ``(batch, time)`` ids ->
    ``(batch, time, num_tags)``. Non-autoregressive, so ``bidirectional=True`` is allowed:
    each ``h_t`` then sees the whole sequence (the forward and backward states
    concatenated). Logits past ``lengths[b]`` are meaningless and must be masked in the
    loss (``jaxnets.train.masked_cross_entropy`` with ``length_mask``)."""

    vocab_size: int
    num_tags: int
    embed_dim: int = 32
    hidden_size: int = 64
    cell: str = "lstm"
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        _check_cell(self.cell)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "batch time"],
        lengths: Int[Array, " batch"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "batch time tags"]:
        outputs, _ = embed_and_encode(self, tokens, lengths, deterministic)
        outputs = nn.Dropout(self.dropout)(outputs, deterministic=deterministic)
        return nn.Dense(self.num_tags, name="head")(outputs)


def __getattr__(name: str):
    # jaxnets.seq.seq2seq builds on this module, so its names are looked up when asked for
    # rather than imported here, which would be a cycle.
    from jaxnets.seq import seq2seq

    if name in seq2seq.__all__:
        return getattr(seq2seq, name)
    if name == "masked_cross_entropy":  # a loss: its home is jaxnets.train
        from jaxnets import train

        return train.masked_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
