"""Evaluation measures for the sequence tasks (numpy / plain Python, run on host).

- ``accuracy``, ``macro_f1``, ``confusion_matrix``: many-to-one classification.
- ``boundary_f1``, ``word_f1``: word segmentation (tags 1 where a word starts).
- ``edit_distance``, ``error_rates``: word and phoneme error rates (g2p), with several
  reference pronunciations per word.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "accuracy",
    "confusion_matrix",
    "macro_f1",
    "boundary_f1",
    "word_f1",
    "edit_distance",
    "error_rates",
]


def _labels(name: str, y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {y.shape} {y.dtype}")
    return y


def accuracy(y_true, y_pred) -> float:
    """Fraction of positions where ``y_pred == y_true`` (both ``(n,)`` ints)."""
    t, p = _labels("y_true", y_true), _labels("y_pred", y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_pred: expected shape {t.shape} (as y_true), got {p.shape}")
    return float(np.mean(t == p)) if t.size else 0.0


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``M[i, j]`` = number of items of true class i predicted as j, ``(C, C)`` int."""
    t, p = _labels("y_true", y_true), _labels("y_pred", y_pred)
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean over classes of ``F1_c = 2 TP / (2 TP + FP + FN)``.

    A class with no true and no predicted items counts as F1 = 0 (sklearn's default
    ``zero_division=0`` behaviour), so a model cannot gain by ignoring a class.
    """
    m = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(m).astype(float)
    denom = 2 * tp + (m.sum(0) - tp) + (m.sum(1) - tp)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def _prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def boundary_f1(true_tags: Sequence[np.ndarray], pred_tags: Sequence[np.ndarray]) -> dict:
    """Precision/recall/F1 of predicted word starts, position 0 excluded.

    The first character always starts a word, so counting it would only inflate the
    score. ``true_tags[i]`` and ``pred_tags[i]`` are 0/1 arrays of the same length.
    """
    tp = n_pred = n_true = 0
    for t, p in zip(true_tags, pred_tags, strict=True):
        t, p = np.asarray(t)[1:] == 1, np.asarray(p)[1:] == 1
        if t.shape != p.shape:
            raise ValueError(
                f"pred_tags: a sequence has length {p.size + 1}, expected {t.size + 1}"
            )
        tp += int(np.sum(t & p))
        n_pred += int(p.sum())
        n_true += int(t.sum())
    return _prf(tp, n_pred, n_true)


def _spans(tags: np.ndarray) -> set[tuple[int, int]]:
    starts = np.flatnonzero(np.asarray(tags) == 1).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts  # the first character starts a word whatever the tag says
    ends = starts[1:] + [len(tags)]
    return set(zip(starts, ends, strict=True))


def word_f1(true_tags: Sequence[np.ndarray], pred_tags: Sequence[np.ndarray]) -> dict:
    """Word-level precision/recall/F1 (the word-segmentation standard): a predicted
    word counts as correct when both its start and its end match a true word."""
    tp = n_pred = n_true = 0
    for t, p in zip(true_tags, pred_tags, strict=True):
        st, sp = _spans(t), _spans(p)
        tp += len(st & sp)
        n_pred += len(sp)
        n_true += len(st)
    return _prf(tp, n_pred, n_true)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit insert, delete, substitute) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> dict[str, float]:
    """Word and phoneme error rates against one or more references per item.

    A word is right when its hypothesis equals any of its references (WER = fraction
    wrong). PER = sum of each item's smallest edit distance to a reference / sum of the
    lengths of those closest references.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"references: expected {len(hypotheses)} items (one per hypothesis), "
            f"got {len(references)}"
        )
    if not hypotheses:
        raise ValueError("hypotheses: expected at least one item")
    wrong = errors = length = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        if not refs:
            raise ValueError("references: every item needs at least one reference")
        hyp = tuple(hyp)
        dists = [(edit_distance(hyp, tuple(r)), len(r)) for r in refs]
        d, n = min(dists)
        wrong += d > 0
        errors += d
        length += n
    return {"wer": wrong / len(hypotheses), "per": errors / max(length, 1)}
