"""Sequence data: MNIST-1D (generated offline), the adding problem and the copy task.

Sequences are (N, time, features) arrays, the shape every jaxnets recurrent layer takes.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from jaxnets.data.splits import Dataset

# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------

MNIST1D_DEFAULTS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": (36, 60),
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "final_seq_length": 40,
    "seed": 42,
}
"""The `mnist1d` package's default generation arguments (its `get_dataset_args()`), which
give the 4000-train / 1000-test, length-40 dataset of Greydanus (2020)."""


def _freeze(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # cached arrays are shared between callers
    return a


@functools.lru_cache(maxsize=8)
def _generate_mnist1d(args_items: tuple) -> tuple[np.ndarray, ...]:
    """Run the package's `make_dataset` once per argument set (about a second)."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    args = dict(args_items)
    args["padding"] = list(args["padding"])
    args["shuffle_seq"] = False
    # make_dataset reseeds numpy's and Python's global generators; put them back afterwards
    # so that generating data never changes a caller's unrelated random numbers.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(ObjectView(args))
        # With shuffle_seq=True the package would draw its position permutation next, from the
        # same global stream: drawing it here gives the package's (and the paper's) permutation.
        perm = np.random.permutation(args["final_seq_length"])
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return tuple(
        _freeze(a)
        for a in (
            d["x"].astype(np.float32),
            d["y"].astype(np.int32),
            d["x_test"].astype(np.float32),
            d["y_test"].astype(np.int32),
            perm.astype(np.int64),
        )
    )


def load_mnist1d(
    *,
    shuffle: bool = False,
    features_axis: bool = True,
    **overrides: Any,
) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated locally with `mnist1d.data.make_dataset`.

    Nothing is downloaded (the package's `get_dataset` would). With the defaults: 4000 train
    and 1000 test sequences of length 40, 10 classes, globally standardised (mean 0, std 1).

    Args:
      shuffle: the shuffled-positions variant: one fixed permutation `perm` of the 40
        positions (the one the package draws for `shuffle_seq=True`) applied to train and test
        alike, x_shuffled[..., t] = x[..., perm[t]]. It destroys locality but keeps every
        value, so models without a spatial prior (logistic regression, MLP) are unaffected.
      features_axis: return x as (N, 40, 1) (time, features) as recurrent layers and 1-D
        convolutions take it; False gives (N, 40).
      **overrides: any `MNIST1D_DEFAULTS` key (e.g. `num_samples=1000`, `seed=0`).

    Returns a `Dataset` (float32 x, int32 y); `info["permutation"]` holds `perm`.
    Arrays are cached per argument set and read-only.
    """
    unknown = sorted(set(overrides) - set(MNIST1D_DEFAULTS))
    if unknown:
        raise ValueError(
            f"load_mnist1d: unknown argument(s) {unknown}; known: {sorted(MNIST1D_DEFAULTS)}"
        )
    args = {**MNIST1D_DEFAULTS, **overrides}
    args["padding"] = tuple(args["padding"])
    if args["num_samples"] < 10 * 2:
        raise ValueError(f"load_mnist1d: num_samples must be >= 20, got {args['num_samples']}")
    x, y, x_test, y_test, perm = _generate_mnist1d(tuple(sorted(args.items())))
    if shuffle:
        x, x_test = _freeze(x[:, perm]), _freeze(x_test[:, perm])
    if features_axis:
        x, x_test = x[..., None], x_test[..., None]
    return Dataset(
        x,
        y,
        x_test,
        y_test,
        num_classes=10,
        name="mnist1d-shuffled" if shuffle else "mnist1d",
        info={"permutation": perm, "shuffled": shuffle, "args": args},
    )


# ---------------------------------------------------------------------------------------------
# Synthetic long-memory tasks
# ---------------------------------------------------------------------------------------------

Seed = int | Sequence[int]


def _check_positive(name: str, value: int, where: str, minimum: int = 1) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")


def adding_problem(
    num_examples: int, length: int, *, seed: Seed
) -> tuple[Float[np.ndarray, "n time 2"], Float[np.ndarray, " n"]]:
    """The adding problem (Hochreiter & Schmidhuber 1997; as in Le et al. 2015).

    Each input is (length, 2): channel 0 holds values u_t ~ U[0, 1], channel 1 is a marker
    that is 1 at exactly two positions, i in [0, length//2) and j in [length//2, length),
    and 0 elsewhere. The target is y = u_i + u_j. Predicting 1 always gives MSE 1/6.

    `seed` may be an int or a sequence of ints, e.g. `(seed, step)` for a fresh batch per
    training step that is still a pure function of the step.
    Returns x (num_examples, length, 2) float32 and y (num_examples,) float32.
    """
    _check_positive("num_examples", num_examples, "adding_problem")
    _check_positive("length", length, "adding_problem", minimum=2)
    rng = np.random.default_rng(seed)
    half = length // 2
    values = rng.uniform(0.0, 1.0, size=(num_examples, length))
    first = rng.integers(0, half, size=num_examples)
    second = rng.integers(half, length, size=num_examples)
    rows = np.arange(num_examples)
    markers = np.zeros((num_examples, length))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (x[rows, first, 0] + x[rows, second, 0]).astype(np.float32)
    return x, y


def adding_batches(batch_size: int, length: int, seed: int):
    """``step -> {"x": (B, T, 2), "y": (B,)}``: a fresh `adding_problem` batch per step, a
    pure function of (seed, step), so resumed runs see the same batches."""

    def batch_fn(step: int) -> dict:
        x, y = adding_problem(batch_size, length, seed=(seed, 2, step))
        return {"x": x, "y": y}

    return batch_fn


def copy_task(
    num_examples: int,
    delay: int,
    *,
    seed: Seed,
    copy_length: int = 10,
    num_symbols: int = 8,
) -> tuple[Int[np.ndarray, "n time"], Int[np.ndarray, "n time"]]:
    """The copy-memory task of Arjovsky, Shah & Bengio (2016), as integer tokens.

    Tokens 0..num_symbols-1 are data, `num_symbols` is the blank and `num_symbols + 1` the
    delimiter (so the vocabulary has num_symbols + 2 tokens; with the defaults 0-7 data,
    8 blank, 9 delimiter). With S = copy_length and T = delay, sequences have length T + 2S:

      input:  S data tokens drawn uniformly with replacement, T - 1 blanks, the delimiter,
              S blanks;
      target: T + S blanks, then the S data tokens in the same order.

    A model that outputs blanks and then guesses uniformly has cross-entropy
    `copy_task_baseline(delay, copy_length, num_symbols)` per token.
    Returns x, y: (num_examples, delay + 2 * copy_length) int32.
    """
    _check_positive("num_examples", num_examples, "copy_task")
    _check_positive("delay", delay, "copy_task")
    _check_positive("copy_length", copy_length, "copy_task")
    _check_positive("num_symbols", num_symbols, "copy_task")
    rng = np.random.default_rng(seed)
    blank, delimiter = num_symbols, num_symbols + 1
    total = delay + 2 * copy_length
    data = rng.integers(0, num_symbols, size=(num_examples, copy_length))
    x = np.full((num_examples, total), blank, dtype=np.int32)
    y = np.full((num_examples, total), blank, dtype=np.int32)
    x[:, :copy_length] = data
    x[:, copy_length + delay - 1] = delimiter
    y[:, delay + copy_length :] = data
    return x, y


def copy_task_baseline(delay: int, copy_length: int = 10, num_symbols: int = 8) -> float:
    """Mean per-token cross-entropy of the memoryless strategy: S log(K) / (T + 2S)."""
    return copy_length * float(np.log(num_symbols)) / (delay + 2 * copy_length)


def dataset_from_generator(
    generate, num_train: int, num_test: int, *, seed: int, name: str, **kwargs: Any
) -> Dataset:
    """A fixed train/test `Dataset` from `adding_problem` or `copy_task` (independent streams).

    Train draws from the stream seeded (seed, 0) and test from (seed, 1); `kwargs` go to the
    generator (e.g. `length=100` or `delay=50`).
    """
    x_train, y_train = generate(num_train, seed=(seed, 0), **kwargs)
    x_test, y_test = generate(num_test, seed=(seed, 1), **kwargs)
    num_classes = kwargs.get("num_symbols", 8) + 2 if generate is copy_task else 0
    return Dataset(
        x_train, y_train, x_test, y_test, num_classes=num_classes, name=name, info=dict(kwargs)
    )
