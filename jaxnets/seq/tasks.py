"""Glue between the sequence data, models and ``jaxnets.train``: batch layouts, forward
functions, losses and the task evaluations the experiments share.

Batch layouts (dicts of arrays, batch first, as ``jaxnets.train`` expects):

- classification: ``{"x": (B, T) ids, "lengths": (B,), "y": (B,)}``
- tagging: ``{"x": (B, T) ids, "lengths": (B,), "y": (B, T) tags}``
- language model windows: ``{"x": (B, T) ids, "y": (B, T) next ids}`` (no padding)
- seq2seq: ``{"src": (B, S), "src_lengths": (B,), "x": (B, T) decoder inputs
  [BOS, y_1 ..], "y": (B, T) targets [y_1 .. EOS], "lengths": (B,) target lengths}``

``jaxnets.data.eval_batches`` adds ``"mask"`` (B,) marking real examples in a padded batch;
the token loss multiplies it in.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import train
from jaxnets.seq import models as M
from jaxnets.seq import seq2seq
from jaxnets.seq.text import Vocab

__all__ = [
    "classification_arrays",
    "tagging_arrays",
    "seq2seq_arrays",
    "classifier_forward",
    "tagger_forward",
    "seq2seq_forward",
    "lm_forward",
    "token_loss",
    "LMWindows",
    "BucketBatches",
    "lm_bits_per_symbol",
    "predict_classes",
    "predict_tags",
    "decode_dataset",
    "bag_of_symbols",
]


# ---------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------


def classification_arrays(
    vocab: Vocab, texts: Sequence[str], labels: np.ndarray, max_len: int
) -> dict[str, np.ndarray]:
    """``{"x", "lengths", "y"}`` with texts cut/padded to ``max_len`` symbols.

    An empty text becomes one UNK symbol, so every length is at least 1.
    """
    x, lengths = vocab.encode_batch(
        [t if t else vocab.symbols[vocab.unk_id] for t in texts], max_len=max_len
    )
    return {"x": x, "lengths": np.maximum(lengths, 1), "y": np.asarray(labels, np.int32)}


def tagging_arrays(
    vocab: Vocab, examples: Sequence[tuple[str, np.ndarray]], max_len: int
) -> dict[str, np.ndarray]:
    """``{"x", "lengths", "y"}`` from ``(chars, tags)`` pairs (tags padded with 0)."""
    x, lengths = vocab.encode_batch([c for c, _ in examples], max_len=max_len)
    y = np.zeros_like(x)
    for i, (_, tags) in enumerate(examples):
        n = min(len(tags), max_len)
        y[i, :n] = tags[:n]
    return {"x": x, "lengths": lengths, "y": y}


def seq2seq_arrays(
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    pairs: Sequence[tuple[Any, Any]],
    max_src: int,
    max_tgt: int,
) -> dict[str, np.ndarray]:
    """Teacher-forcing arrays from ``(source, target)`` pairs.

    ``x = [BOS, y_1 .. y_n]`` and ``y = [y_1 .. y_n, EOS]`` (both ``max_tgt`` wide;
    ``lengths = n + 1``). Pairs whose source or target does not fit are an error: cut
    targets would teach the model to stop early.
    """
    src, src_lengths = src_vocab.encode_batch([s for s, _ in pairs], max_len=max_src)
    tgt_full = [tgt_vocab.encode(t) for _, t in pairs]
    too_long = [
        i for i, (s, t) in enumerate(pairs) if len(tgt_full[i]) + 1 > max_tgt or len(s) > max_src
    ]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"pairs: {len(too_long)} pairs exceed max_src={max_src} / max_tgt={max_tgt} "
            f"(with EOS), e.g. {pairs[i]!r}; filter them or raise the limits"
        )
    n = len(pairs)
    x = np.zeros((n, max_tgt), np.int32)
    y = np.zeros((n, max_tgt), np.int32)
    lengths = np.zeros(n, np.int32)
    for i, t in enumerate(tgt_full):
        x[i, 0] = tgt_vocab.bos_id
        x[i, 1 : len(t) + 1] = t
        y[i, : len(t)] = t
        y[i, len(t)] = tgt_vocab.eos_id
        lengths[i] = len(t) + 1
    return {
        "src": src,
        "src_lengths": np.maximum(src_lengths, 1),
        "x": x,
        "y": y,
        "lengths": lengths,
    }


# ---------------------------------------------------------------------------------------
# Forward functions and the token loss (for jaxnets.train.Trainer)
# ---------------------------------------------------------------------------------------


def classifier_forward(module, batch, train: bool):
    return module(batch["x"], batch["lengths"], deterministic=not train)


def tagger_forward(module, batch, train: bool):
    return module(batch["x"], batch["lengths"], deterministic=not train)


def lm_forward(module, batch, train: bool):
    return module(batch["x"], deterministic=not train)[0]


def seq2seq_forward(module, batch, train: bool):
    return module(batch["src"], batch["src_lengths"], batch["x"], deterministic=not train)[0]


def token_loss(logits, batch) -> tuple[jax.Array, dict]:
    """Mean cross-entropy per real token, and token accuracy.

    Real tokens: ``t < batch["lengths"][b]`` when present (all otherwise), times the
    example mask ``batch["mask"]`` of padded evaluation batches. Also reports
    ``bits = loss / ln 2`` (bits per symbol).
    """
    y = batch["y"]
    weights = jnp.ones(y.shape, jnp.float32)
    if "lengths" in batch:
        weights = M.length_mask(batch["lengths"], y.shape[1], y.shape[0]).astype(jnp.float32)
    if "mask" in batch:
        weights = weights * batch["mask"].astype(jnp.float32)[:, None]
    total, count = train.masked_cross_entropy(logits, y, weights)
    count = jnp.maximum(count, 1.0)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    loss = total / count
    return loss, {"accuracy": jnp.sum(correct * weights) / count, "bits": loss / jnp.log(2.0)}


class BucketBatches:
    """Seeded training batches of similar-length sequences, cut to their bucket's width.

    Padding is wasted work for a recurrent network (the scan runs over every column),
    so examples are grouped by length: an example goes to the first bucket whose bound
    is >= the largest of its ``length_keys``; each epoch shuffles the examples
    (``default_rng([seed, epoch])``), cuts every bucket into full batches and shuffles the
    batch order. Arrays named in ``width_keys`` are cut to the bucket's bound, so there
    are at most ``len(bounds)`` batch shapes (one compilation each). Batch k depends only
    on (seed, k), as ``jaxnets.data.Batches``.
    """

    def __init__(
        self,
        data: dict[str, np.ndarray],
        batch_size: int,
        seed: int,
        bounds: Sequence[int],
        length_keys: Sequence[str] = ("lengths",),
        width_keys: Sequence[str] = ("x", "y"),
    ):
        self.data = {k: np.asarray(v) for k, v in data.items()}
        self.batch_size, self.seed = batch_size, seed
        self.width_keys = tuple(width_keys)
        longest = np.max(np.stack([self.data[k] for k in length_keys]), axis=0)
        bounds = sorted(bounds)
        if longest.max() > bounds[-1]:
            raise ValueError(
                f"bounds: the longest example ({longest.max()}) exceeds the last bound {bounds[-1]}"
            )
        self.bucket_of = np.searchsorted(bounds, longest)  # first bound >= length
        self.bounds = bounds
        sizes = np.bincount(self.bucket_of, minlength=len(bounds))
        self.steps_per_epoch = int(np.sum(sizes // batch_size))
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size: {batch_size} exceeds every bucket ({sizes.tolist()})")
        self._epoch: tuple[int, list] | None = None

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.bucket_of))
        plan = []
        for b in range(len(self.bounds)):
            members = perm[self.bucket_of[perm] == b]
            for i in range(len(members) // self.batch_size):
                plan.append((b, members[i * self.batch_size : (i + 1) * self.batch_size]))
        order = rng.permutation(len(plan))
        plan = [plan[i] for i in order]
        self._epoch = (epoch, plan)
        return plan

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        bucket, idx = self._plan(epoch)[i]
        w = self.bounds[bucket]
        return {
            k: (v[idx][:, :w] if k in self.width_keys else v[idx]) for k, v in self.data.items()
        }


# ---------------------------------------------------------------------------------------
# Language model windows and stateful evaluation
# ---------------------------------------------------------------------------------------


class LMWindows:
    """Random training windows of a token stream: ``batch_fn(step)`` for ``Trainer.fit``.

    Step k reads ``batch_size`` windows starting at offsets drawn from
    ``default_rng([seed, k])``: ``x = stream[o : o + T]``, ``y = stream[o + 1 : o + T + 1]``.
    A pure function of (seed, step), so resumed runs see the same batches.
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int):
        stream = np.asarray(stream, np.int32)
        if stream.ndim != 1 or len(stream) < seq_len + 2:
            raise ValueError(
                f"stream: expected a 1-D id stream longer than seq_len + 1 = {seq_len + 1}, "
                f"got shape {stream.shape}"
            )
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, self.batch_size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = self.stream[idx]
        return {"x": w[:, :-1], "y": w[:, 1:]}


def lm_bits_per_symbol(
    model: M.LanguageModel,
    variables: Any,
    stream: np.ndarray,
    rows: int = 16,
    chunk: int = 256,
    warmup: int = 256,
) -> float:
    """Bits per symbol of ``stream`` under the model, every one of its ``N - 1``
    predictions counted once (comparable with ``KneserNeyLM.log2_probs``).

    The predictions are cut into ``rows`` contiguous pieces evaluated side by side,
    each in chunks of ``chunk`` steps with the recurrent state carried between chunks;
    each piece (but the first) starts ``warmup`` symbols early with those predictions
    not counted, so it starts with context rather than a zero state.
    """
    stream = np.asarray(stream, np.int32)
    n_pred = len(stream) - 1
    rows = max(1, min(rows, n_pred // max(chunk, 1)))
    piece = -(-n_pred // rows)
    n_chunks = -(-(piece + warmup) // chunk)
    width = n_chunks * chunk
    x = np.zeros((rows, width), np.int32)
    y = np.zeros((rows, width), np.int32)
    count = np.zeros((rows, width), bool)
    for r in range(rows):
        lo, hi = r * piece, min((r + 1) * piece, n_pred)
        start = max(0, lo - warmup)
        n = hi - start
        x[r, :n] = stream[start : start + n]
        y[r, :n] = stream[start + 1 : start + n + 1]
        count[r, lo - start : n] = True

    @jax.jit
    def chunk_nll(state, xc, yc, mc):
        logits, state = model.apply(variables, xc, initial_state=state)
        total, _ = train.masked_cross_entropy(logits, yc, mc)
        return state, total

    state = _zero_state(model, rows)
    total = 0.0
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        state, nll = chunk_nll(state, x[:, sl], y[:, sl], count[:, sl])
        total += float(nll)
    assert int(count.sum()) == n_pred
    return total / n_pred / np.log(2.0)


def _zero_state(model: M.LanguageModel, batch: int):
    h = jnp.zeros((model.num_layers, batch, model.hidden_size), jnp.float32)
    return (h, h) if model.cell == "lstm" else h


# ---------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------


def _batched(data: dict[str, np.ndarray], batch_size: int):
    n = len(next(iter(data.values())))
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # fixed shapes
        yield start, min(batch_size, n - start), {k: v[idx] for k, v in data.items()}


@functools.partial(jax.jit, static_argnums=0)
def _argmax_logits(model, variables, x, lengths):
    # One compilation per (model, shapes): the seeds of a model share it.
    return jnp.argmax(model.apply(variables, x, lengths), -1)


def predict_classes(model, variables, data: dict[str, np.ndarray], batch_size: int = 256):
    """Argmax class of every example, ``(N,)`` int."""
    out = [
        np.asarray(_argmax_logits(model, variables, b["x"], b["lengths"]))[:k]
        for _, k, b in _batched(data, batch_size)
    ]
    return np.concatenate(out)


def predict_tags(model, variables, data: dict[str, np.ndarray], batch_size: int = 256):
    """Argmax tag sequences cut to each example's length: a list of ``(len,)`` arrays."""
    out = []
    for _, k, b in _batched(data, batch_size):
        tags = np.asarray(_argmax_logits(model, variables, b["x"], b["lengths"]))
        out += [tags[i, : b["lengths"][i]] for i in range(k)]
    return out


def decode_dataset(
    model: seq2seq.Seq2Seq,
    variables: Any,
    src: np.ndarray,
    src_lengths: np.ndarray,
    max_len: int,
    batch_size: int = 256,
    beam_size: int = 1,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Decode every source (greedy, or beam search when ``beam_size > 1``).

    Returns the output ids of each source up to (not including) EOS, and for greedy
    decoding with attention the weights ``(N, max_len, S)`` (None otherwise).
    """
    outs, weights = [], []
    data = {"src": src, "src_lengths": src_lengths}
    for _, k, b in _batched(data, batch_size):
        if beam_size > 1:
            toks, _ = seq2seq.beam_search(
                model, variables, b["src"], b["src_lengths"], max_len, beam_size
            )
        else:
            toks, w = seq2seq.greedy_decode(model, variables, b["src"], b["src_lengths"], max_len)
            if model.attention:
                weights.append(np.asarray(w)[:k])
        toks = np.asarray(toks)[:k]
        for row in toks:
            ends = np.flatnonzero(row == 3)
            outs.append(row[: ends[0]] if len(ends) else row)
    return outs, (np.concatenate(weights) if weights else None)


def bag_of_symbols(x: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """Relative frequency of every symbol id in each sequence, ``(N, vocab_size)``."""
    x = np.asarray(x)
    mask = np.arange(x.shape[1])[None, :] < np.asarray(lengths)[:, None]
    counts = np.zeros((x.shape[0], vocab_size))
    rows = np.broadcast_to(np.arange(x.shape[0])[:, None], x.shape)
    np.add.at(counts, (rows[mask], x[mask]), 1.0)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
