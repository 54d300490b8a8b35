"""The `Dataset` container and seeded ways to cut one: train/test splits, class filters, few-shot.

Everything here is numpy in, numpy out, and a pure function of its arguments (a seed is an
argument): the same call returns the same arrays on every machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Integer, Shaped


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of in-memory arrays with integer class labels or real targets.

    Attributes:
      x_train: (n_train, ...) inputs, e.g. (n, H, W, C) images or (n, time, features) sequences.
      y_train: (n_train, ...) targets (int32 class labels for classification).
      x_test, y_test: the held-out split, same trailing shapes.
      num_classes: number of classes (0 for regression targets).
      name: a short name for logs and reports.
      info: anything else worth keeping (class names, the MNIST-1D position permutation, ...).

    `train` and `test` give the batch-style dicts `{"x": ..., "y": ...}` that `Batches` and
    `eval_batches` take.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = ""
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"Dataset {self.name!r}: x_{split} has {len(x)} examples but y_{split} has "
                    f"{len(y)}; they must match"
                )

    @property
    def train(self) -> dict[str, np.ndarray]:
        return {"x": self.x_train, "y": self.y_train}

    @property
    def test(self) -> dict[str, np.ndarray]:
        return {"x": self.x_test, "y": self.y_test}

    def take_train(self, n: int, *, arg: str = "n") -> Dataset:
        """The same data set with only the first ``n`` training examples (test split, name
        and info unchanged). ``arg`` names ``n`` in the error for an out-of-range value."""
        size = len(self.y_train)
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 < n <= size:
            raise ValueError(
                f"Dataset {self.name!r}: {arg} must be in [1, {size}] (the training examples), "
                f"got {n!r}"
            )
        return dataclasses.replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, x_train={self.x_train.shape} {self.x_train.dtype}, "
            f"x_test={self.x_test.shape}, num_classes={self.num_classes})"
        )


def _check_xy(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y):
        raise ValueError(
            f"{where}: x and y must have the same leading length, got x {x.shape} and y {y.shape}"
        )
    return x, y


def _check_labels(y: np.ndarray, where: str) -> None:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")


def train_test_split(
    x: Shaped[np.ndarray, " n *rest"],
    y: Shaped[np.ndarray, " n *target"],
    *,
    test_fraction: float,
    seed: int,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split into (x_train, y_train, x_test, y_test).

    With `stratify` (integer labels only), each class c with n_c examples puts
    round(test_fraction * n_c) of them in the test split, so class proportions are kept.
    Each split keeps the original order of its examples.
    """
    x, y = _check_xy(x, y, "train_test_split")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"train_test_split: test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    n = len(y)
    is_test = np.zeros(n, dtype=bool)
    if stratify:
        _check_labels(y, "train_test_split(stratify=True)")
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            k = int(round(test_fraction * len(members)))
            is_test[rng.permutation(members)[:k]] = True
    else:
        is_test[rng.permutation(n)[: int(round(test_fraction * n))]] = True
    if is_test.all() or not is_test.any():
        raise ValueError(
            f"train_test_split: test_fraction={test_fraction} of {n} examples leaves an empty split"
        )
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


def filter_classes(
    x: Shaped[np.ndarray, " n *rest"],
    y: Integer[np.ndarray, " n"],
    classes: Sequence[int],
    *,
    relabel: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the examples whose label is in `classes` (order of examples kept).

    With `relabel`, label `classes[i]` becomes `i`, e.g. classes=(5, 6, 7, 8, 9) maps to 0..4,
    so a 5-way head can be trained on the second half of the digits.
    """
    x, y = _check_xy(x, y, "filter_classes")
    _check_labels(y, "filter_classes")
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"filter_classes: classes must be non-empty and unique, got {classes}")
    missing = sorted(set(classes) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"filter_classes: classes {missing} have no examples in the labels")
    keep = np.isin(y, classes)
    x, y = x[keep], y[keep]
    if relabel:
        lookup = np.full(max(classes) + 1, -1, dtype=np.int32)
        lookup[classes] = np.arange(len(classes), dtype=np.int32)
        y = lookup[y]
    return x, y.astype(np.int32)


def few_shot(
    x: Shaped[np.ndarray, " n *rest"],
    y: Integer[np.ndarray, " n"],
    per_class: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subset with exactly `per_class` examples of every class present in `y`.

    The examples of each class are drawn without replacement with `default_rng(seed)`; the
    subset keeps the original order. Raises if a class has fewer than `per_class` examples.
    Returns (x_subset (k*per_class, ...), y_subset (k*per_class,)) for k classes.
    """
    x, y = _check_xy(x, y, "few_shot")
    _check_labels(y, "few_shot")
    if not isinstance(per_class, int | np.integer) or per_class < 1:
        raise ValueError(f"few_shot: per_class must be a positive int, got {per_class!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < per_class:
            raise ValueError(
                f"few_shot: class {int(c)} has only {len(members)} examples, "
                f"fewer than per_class={per_class}"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    idx = np.sort(np.concatenate(chosen))
    return x[idx], y[idx]


def subset(items: list, n: int | None, seed: int) -> list:
    """A seeded subset of ``n`` of ``items`` (drawn without replacement with
    ``default_rng(seed)``), in their original order; all of them when ``n`` is None or at
    least ``len(items)``."""
    if n is None or n >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]
