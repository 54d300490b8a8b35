"""Seeded batch iterators: the training batch at global step k is a pure function of (seed, k).

Training batches (`Batches`): the examples are reshuffled every epoch by the permutation
`default_rng([seed, epoch]).permutation(n)`, and step k reads slice `k mod steps_per_epoch`
of the permutation of epoch `k // steps_per_epoch`. Nothing depends on how many batches were
drawn before, so a run resumed from a checkpoint at step k continues with bitwise the same
batches as an uninterrupted run: call `batches.batch_at(k)` or `batches.iterate(start_step=k)`.

Evaluation batches (`eval_batches`): every example exactly once, in order; the last partial
batch is padded to full size (so a jitted eval step compiles once) and a boolean `mask` marks
the real examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


def _check_data(data: Mapping[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], int]:
    if not isinstance(data, Mapping) or not data:
        raise TypeError(
            f"{where}: data must be a non-empty dict of arrays, got {type(data).__name__}"
        )
    arrays = {k: np.asarray(v) for k, v in data.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(f"{where}: every array needs the same leading length, got {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"{where}: data has no examples")
    return arrays, n


def _check_batch_size(batch_size: int, where: str) -> None:
    if (
        not isinstance(batch_size, int | np.integer)
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}")


def _to_jax(batch: dict[str, np.ndarray]) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(v) for k, v in batch.items()}


class Batches:
    """Seeded, shuffling training batches from in-memory arrays.

    Args:
      data: dict of arrays with a common leading length n, e.g. `dataset.train`.
      batch_size: examples per batch.
      seed: the shuffling seed; batch k depends only on (seed, k).
      drop_last: drop each epoch's final partial batch (every batch then has `batch_size`
        examples, so a jitted step compiles once). Without it the last batch of an epoch
        is smaller.
      shuffle: reshuffle every epoch (False: the same order every epoch).
      as_jax: yield `jax.Array`s instead of numpy arrays.

    `batch_at(k)` (also `batches(k)`) returns the batch at global step k as a dict with the
    same keys as `data`; `iterate(start_step, num_steps)` yields batches from a step on;
    `rows(k, start, stop)` is ``batch_at(k)[start:stop]`` alone (what one process of a
    multi-process run builds, see `jaxnets.train.Trainer.fit`).
    """

    def __init__(
        self,
        data: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = True,
        shuffle: bool = True,
        as_jax: bool = False,
    ):
        self.data, self.num_examples = _check_data(data, "Batches")
        _check_batch_size(batch_size, "Batches")
        if drop_last and batch_size > self.num_examples:
            raise ValueError(
                f"Batches: batch_size={batch_size} exceeds the {self.num_examples} examples, "
                "so drop_last=True would leave no batch; lower batch_size or set drop_last=False"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.as_jax = as_jax
        if drop_last:
            self.steps_per_epoch = self.num_examples // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_examples // self.batch_size)
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the examples in `epoch`: default_rng([seed, epoch]).permutation(n)."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            perm = np.arange(self.num_examples)
        self._cached_epoch = (epoch, perm)
        return perm

    def indices_at(self, step: int) -> np.ndarray:
        """Indices (into the arrays) of the examples in the batch at global step `step`."""
        if not isinstance(step, int | np.integer) or isinstance(step, bool) or step < 0:
            raise ValueError(f"Batches: step must be a non-negative int, got {step!r}")
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict:
        """The batch at global step `step`: {key: array[indices_at(step)]}."""
        idx = self.indices_at(step)
        batch = {k: v[idx] for k, v in self.data.items()}
        return _to_jax(batch) if self.as_jax else batch

    __call__ = batch_at

    def size_at(self, step: int) -> int:
        """Number of examples in the batch at global step `step`."""
        return len(self.indices_at(step))

    def rows(self, step: int, start: int, stop: int) -> dict:
        """Rows ``[start, stop)`` of the batch at `step`: ``batch_at(step)[start:stop]``,
        built without the other rows (one process's part of a multi-process batch)."""
        idx = self.indices_at(step)[start:stop]
        batch = {k: v[idx] for k, v in self.data.items()}
        return _to_jax(batch) if self.as_jax else batch

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Batches for steps start_step, start_step + 1, ... (forever when num_steps is None)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)

    def __repr__(self) -> str:
        return (
            f"Batches(n={self.num_examples}, batch_size={self.batch_size}, seed={self.seed}, "
            f"steps_per_epoch={self.steps_per_epoch}, drop_last={self.drop_last})"
        )


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """ceil(num_examples / batch_size): how many batches `eval_batches` yields."""
    return -(-num_examples // batch_size)


def eval_batches(
    data: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    pad: bool = True,
    as_jax: bool = False,
) -> Iterator[dict]:
    """Every example exactly once, in order, with a boolean `mask` of real examples.

    Each batch is {key: array[i:i+batch_size], ..., "mask": (b,) bool}. With `pad` the last
    partial batch is filled up to `batch_size` by repeating the last example (a real input, so
    no model sees an out-of-distribution zero) and `mask` is False there; metrics must weight
    by `mask`: accuracy = sum(mask * correct) / sum(mask). Without `pad` the last batch is
    smaller and `mask` is all True.
    """
    arrays, n = _check_data(data, "eval_batches")
    _check_batch_size(batch_size, "eval_batches")
    if "mask" in arrays:
        raise ValueError("eval_batches: data already has a 'mask' key; it is reserved")
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        size = batch_size if pad else real
        idx = np.minimum(np.arange(start, start + size), n - 1)
        batch = {k: v[idx] for k, v in arrays.items()}
        batch["mask"] = np.arange(size) < real
        yield _to_jax(batch) if as_jax else batch
