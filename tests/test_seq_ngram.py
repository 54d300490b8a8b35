"""Modified Kneser-Ney n-gram: against a plain-Python dictionary implementation of the
Chen & Goodman formulas, normalisation, and order selection."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from jaxnets.seq import ngram


def _reference_kn(train, order, vocab, pad):
    """Dictionary-based modified Kneser-Ney, written from the equations, no numpy."""
    seq = [pad] * (order - 1) + list(train)
    raw = Counter(tuple(seq[i : i + order]) for i in range(len(seq) - order + 1))
    counts = {order: raw}
    for k in range(order - 1, 0, -1):
        longer = {tuple(seq[i : i + k + 1]) for i in range(len(seq) - k)}
        counts[k] = Counter(g[1:] for g in longer)

    def discounts(c):
        n = [sum(1 for v in c.values() if v == j) for j in (1, 2, 3, 4)]
        if min(n) == 0:
            return [0.5, 1.0, 1.5]
        y = n[0] / (n[0] + 2 * n[1])
        d = [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]]
        return [min(max(x, 0.0), j + 1.0) for j, x in enumerate(d)]

    disc = {k: discounts(counts[k]) for k in counts}
    followers = {k: defaultdict(list) for k in counts}
    for k, c in counts.items():
        for g, v in c.items():
            followers[k][g[:-1]].append(v)

    def prob(context, w):
        p = 1.0 / vocab
        for k in range(1, order + 1):
            h = tuple(context[len(context) - (k - 1) :]) if k > 1 else ()
            f = followers[k].get(h)
            if not f:
                continue
            d1, d2, d3 = disc[k]
            total = sum(f)
            c = counts[k].get(h + (w,), 0)
            d = 0 if c == 0 else (d1 if c == 1 else d2 if c == 2 else d3)
            gamma = (
                d1 * sum(v == 1 for v in f)
                + d2 * sum(v == 2 for v in f)
                + d3 * sum(v >= 3 for v in f)
            ) / total
            p = max(c - d, 0) / total + gamma * p
        return p

    return prob


def _text_stream(n, seed):
    rng = np.random.default_rng(seed)
    # a repetitive source, so high-order counts 1..4 all occur
    words = ["abc", "abd", "bca", "cab", "dd"]
    out = []
    while len(out) < n:
        out += [int(ch) for ch in "".join(str(" abcd".index(c)) for c in rng.choice(words))]
        out.append(0)
    return np.asarray(out[:n], dtype=np.int32)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_dictionary_reference(order):
    train, test = _text_stream(400, 0), _text_stream(60, 1)
    test[5] = 5  # a symbol never seen in training still gets probability
    vocab, pad = 6, 0
    lm = ngram.fit_kneser_ney(train, order, vocab, pad)
    ref = _reference_kn(train, order, vocab, pad)
    padded = [pad] * (order - 1) + test.tolist()
    want = [
        np.log2(ref(padded[t : t + order - 1], padded[t + order - 1])) for t in range(1, len(test))
    ]
    np.testing.assert_allclose(lm.log2_probs(test), want, rtol=1e-10)


def test_distribution_sums_to_one_for_seen_and_unseen_contexts():
    train = _text_stream(500, 2)
    lm = ngram.fit_kneser_ney(train, 4, 6, 0)
    for ctx in ([1, 2], [3, 3, 3], [5, 5, 5], [0]):
        p = lm.next_distribution(np.asarray(ctx))
        assert p.min() > 0
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)


def test_unigram_closed_form():
    # order 1 (no context): P(w) = max(c(w) - D(c(w)), 0) / N + gamma / V with
    # gamma = (D1 N1 + D2 N2 + D3 N3+) / N, counted over every position of the stream.
    train = np.asarray([1, 1, 1, 2, 2, 3, 4, 4, 4, 4, 5, 5, 5], np.int32)
    lm = ngram.fit_kneser_ney(train, 1, 7, 0)
    counts = {1: 3, 2: 2, 3: 1, 4: 4, 5: 3}
    n = 13
    n1, n2, n3, n4 = 1, 1, 2, 1  # count-of-counts
    y = n1 / (n1 + 2 * n2)
    d1, d2, d3 = 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3
    gamma = (d1 * 1 + d2 * 1 + d3 * 3) / n
    disc = {1: d1, 2: d2}
    want = {w: (c - disc.get(c, d3)) / n + gamma / 7 for w, c in counts.items()}
    want[6] = gamma / 7
    probe = np.asarray([0, 1, 2, 3, 4, 5, 6], np.int32)
    got = 2.0 ** lm.log2_probs(probe)
    np.testing.assert_allclose(got, [want[w] for w in range(1, 7)], rtol=1e-12)


def test_select_order_prefers_longer_context_on_structured_text():
    train, val = _text_stream(3000, 3), _text_stream(500, 4)
    best, scores = ngram.select_order(train, val, 6, max_order=4)
    assert set(scores) == {1, 2, 3, 4}
    assert best.order == min(scores, key=scores.get)
    assert scores[3] < scores[1]
    assert ngram.bits_per_symbol(best, val) == pytest.approx(scores[best.order])


def test_errors():
    with pytest.raises(ValueError, match="order: expected a positive int"):
        ngram.fit_kneser_ney(np.zeros(5, np.int32), 0, 3)
    with pytest.raises(ValueError, match=r"stream: ids must lie in 0..2"):
        ngram.fit_kneser_ney(np.asarray([0, 1, 3]), 2, 3)
    with pytest.raises(ValueError, match="stream: expected a 1-D integer id array"):
        ngram.fit_kneser_ney(np.zeros((2, 2), np.int32), 2, 3)
    with pytest.raises(ValueError, match="overflow"):
        ngram.fit_kneser_ney(np.zeros(5, np.int32), 20, 1000)
