"""Smoothed character n-gram language model: the baseline a recurrent LM must beat.

Interpolated modified Kneser-Ney (Chen & Goodman 1998, section 3.5), vectorised with
numpy. For order ``k`` with context ``h`` (the previous ``k - 1`` symbols) and symbol w::

    P_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h .)  +  gamma_k(h) * P_{k-1}(w | h')
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3 N3+(h .)) / c_k(h .)
    P_0(w) = 1 / V

where ``h'`` drops the oldest symbol of ``h``, ``c_n`` are raw counts at the highest
order and ``c_k`` (k < n) are continuation counts (the number of distinct symbols seen
before ``h w``), ``N_j(h .)`` counts the symbols following ``h`` with count exactly j
(``N3+``: at least 3), and the discounts come from the count-of-counts n_j of order k::

    Y = n1 / (n1 + 2 n2);  D_k1 = 1 - 2Y n2/n1;  D_k2 = 2 - 3Y n3/n2;  D_k3 = 3 - 4Y n4/n3

An unseen context (``c_k(h .) = 0``) falls back to ``P_{k-1}`` entirely. Every symbol of
the vocabulary gets a positive probability and the probabilities over the vocabulary sum
to one for every context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KneserNeyLM", "fit_kneser_ney", "bits_per_symbol", "select_order"]


def _gram_keys(stream: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """Integer key of every length-k window: ``sum_i stream[t + i] * V^(k - 1 - i)``."""
    n = len(stream) - k + 1
    keys = np.zeros(n, dtype=np.int64)
    for i in range(k):
        keys = keys * vocab_size + stream[i : i + n].astype(np.int64)
    return keys


def _discounts(counts: np.ndarray) -> np.ndarray:
    """``(D1, D2, D3+)`` from the count-of-counts (Chen & Goodman's estimates).

    Falls back to 0.5/1.0/1.5 style values when a count-of-count is zero (tiny corpora),
    and clips into ``[0, j]`` so no discount exceeds the count it is taken from.
    """
    n = [np.sum(counts == j) for j in (1, 2, 3, 4)]
    if min(n) == 0:
        return np.asarray([0.5, 1.0, 1.5])
    y = n[0] / (n[0] + 2 * n[1])
    d = np.asarray([1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]])
    return np.clip(d, 0.0, np.asarray([1.0, 2.0, 3.0]))


@dataclass(frozen=True)
class _Order:
    keys: np.ndarray  # sorted int64 keys of the k-grams with count > 0
    counts: np.ndarray  # their (raw or continuation) counts
    ctx_keys: np.ndarray  # sorted keys of the contexts (k-1 symbols)
    ctx_total: np.ndarray  # c_k(h .)
    ctx_gamma: np.ndarray  # gamma_k(h)
    discounts: np.ndarray  # (D1, D2, D3+)


@dataclass(frozen=True)
class KneserNeyLM:
    """A fitted modified Kneser-Ney model of order ``order`` over ``vocab_size`` ids.

    Build with ``fit_kneser_ney``; score with ``log2_probs`` (every position of a
    stream) or ``next_distribution`` (the full distribution after one context).
    """

    order: int
    vocab_size: int
    pad_id: int
    tables: tuple[_Order, ...]  # tables[k - 1] is order k

    def log2_probs(self, stream: np.ndarray) -> np.ndarray:
        """``log2 P(stream[t] | stream[t - n + 1 : t])`` for ``t = 1 .. N - 1``.

        Positions before the start of the stream read as ``pad_id`` (the same padding
        the counts were taken with). Shape ``(N - 1,)`` float64.
        """
        stream = _check_stream(stream, self.vocab_size, "stream")
        padded = np.concatenate([np.full(self.order - 1, self.pad_id, np.int64), stream])
        # Position t of the stream is padded index t + order - 1; its k-gram ends there.
        targets = np.arange(1, len(stream)) + self.order - 1
        p = np.full(len(targets), 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            p = self._interpolate(k, padded, targets, p)
        return np.log2(p)

    def _interpolate(self, k, padded, targets, p_lower):
        table = self.tables[k - 1]
        key = np.zeros(len(targets), dtype=np.int64)
        for i in range(k):
            key = key * self.vocab_size + padded[targets - k + 1 + i]
        ctx = key // self.vocab_size
        ci = np.searchsorted(table.ctx_keys, ctx)
        ci = np.minimum(ci, len(table.ctx_keys) - 1)
        seen_ctx = table.ctx_keys[ci] == ctx
        gi = np.minimum(np.searchsorted(table.keys, key), len(table.keys) - 1)
        c = np.where(table.keys[gi] == key, table.counts[gi], 0)
        d = np.where(c >= 3, table.discounts[2], table.discounts[np.clip(c, 1, 2) - 1])
        total = np.where(seen_ctx, table.ctx_total[ci], 1)
        p = np.maximum(c - d, 0.0) / total + table.ctx_gamma[ci] * p_lower
        return np.where(seen_ctx, p, p_lower)

    def next_distribution(self, context: np.ndarray) -> np.ndarray:
        """``P(w | context)`` for every id w, ``(vocab_size,)`` (sums to one)."""
        context = _check_stream(context, self.vocab_size, "context")
        out = np.empty(self.vocab_size)
        for w in range(self.vocab_size):
            out[w] = 2.0 ** self.log2_probs(np.concatenate([context, [w]]))[-1]
        return out


def _check_stream(stream, vocab_size: int, name: str) -> np.ndarray:
    stream = np.asarray(stream)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(
            f"{name}: expected a 1-D integer id array, got shape {stream.shape} "
            f"dtype {stream.dtype}"
        )
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise ValueError(
            f"{name}: ids must lie in 0..{vocab_size - 1}, got min {stream.min()} "
            f"max {stream.max()}"
        )
    return stream.astype(np.int64)


def fit_kneser_ney(stream: np.ndarray, order: int, vocab_size: int, pad_id: int = 0) -> KneserNeyLM:
    """Count a training id stream ``(N,)`` into a modified Kneser-Ney model.

    The stream is left-padded with ``order - 1`` copies of ``pad_id`` so the first
    symbols have full-length contexts (for ``lm_stream`` streams pass ``EOS``, the
    symbol that starts every entry).
    """
    if not isinstance(order, int | np.integer) or order < 1:
        raise ValueError(f"order: expected a positive int, got {order!r}")
    if vocab_size**order >= 2**62:
        raise ValueError(
            f"order: {order}-grams over {vocab_size} symbols overflow int64 keys; "
            "use a smaller order or vocabulary"
        )
    stream = _check_stream(stream, vocab_size, "stream")
    if len(stream) < 2:
        raise ValueError(f"stream: expected at least 2 ids, got {len(stream)}")
    padded = np.concatenate([np.full(order - 1, pad_id, np.int64), stream])
    tables = []
    for k in range(1, order + 1):
        if k == order:
            keys, counts = np.unique(_gram_keys(padded, k, vocab_size), return_counts=True)
        else:
            # Continuation count: distinct symbols seen before the k-gram.
            longer = np.unique(_gram_keys(padded, k + 1, vocab_size))
            keys, counts = np.unique(longer % vocab_size**k, return_counts=True)
        disc = _discounts(counts)
        ctx = keys // vocab_size
        ctx_keys, inv = np.unique(ctx, return_inverse=True)
        m = len(ctx_keys)
        total = np.bincount(inv, weights=counts, minlength=m)
        n1 = np.bincount(inv, weights=counts == 1, minlength=m)
        n2 = np.bincount(inv, weights=counts == 2, minlength=m)
        n3 = np.bincount(inv, weights=counts >= 3, minlength=m)
        gamma = (disc[0] * n1 + disc[1] * n2 + disc[2] * n3) / total
        tables.append(_Order(keys, counts, ctx_keys, total, gamma, disc))
    return KneserNeyLM(order, vocab_size, pad_id, tuple(tables))


def bits_per_symbol(model: KneserNeyLM, stream: np.ndarray) -> float:
    """Mean ``-log2 P`` over the ``N - 1`` predictions of ``stream``."""
    return float(-np.mean(model.log2_probs(stream)))


def select_order(
    train: np.ndarray,
    validation: np.ndarray,
    vocab_size: int,
    max_order: int = 6,
    pad_id: int = 0,
) -> tuple[KneserNeyLM, dict[int, float]]:
    """Fit orders ``1..max_order`` on ``train``; return the model with the lowest
    validation bits per symbol and ``{order: validation bits}``."""
    scores, best = {}, None
    for n in range(1, max_order + 1):
        lm = fit_kneser_ney(train, n, vocab_size, pad_id)
        scores[n] = bits_per_symbol(lm, validation)
        if best is None or scores[n] < scores[best.order]:
            best = lm
    return best, scores
