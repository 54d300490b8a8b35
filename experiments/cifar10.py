"""CIFAR-10 with the He et al. (2015) recipe: ResNet-20..110, their plain twins, VGG with BN.

For users with the CIFAR-10 python batches on disk (``--data-dir``; nothing is downloaded).
The recipe of the paper's Sec. 4.2: per-pixel mean subtracted, 4-pixel zero padding + random
32x32 crop + random horizontal flip, batch 128, SGD with momentum 0.9 and weight decay 1e-4,
learning rate 0.1 divided by 10 at 32k and 48k iterations, 64k iterations in all (ResNet-110
warms up at 0.01 for the first 400 iterations). Published test errors (Table 6): ResNet-20
8.75%, ResNet-32 7.51%, ResNet-44 7.17%, ResNet-56 6.97%, ResNet-110 6.43%.

Any name from ``jaxnets.models.model_names()`` works as ``--model`` (``cifar_resnet56``,
``plain_cifar_resnet56``, ``vgg16_bn``, ...); VGGs use the small-image head.

Where the data is: ``--data-dir``, else the ``CIFAR10_DIR`` environment variable, else
``data/cifar-10-batches-py``. When none exists and no ``--data-dir`` was given (the tour on a
machine without the data set) the run finishes at once with ``{"skipped": ...}`` and a report
saying how to run it; an explicit ``--data-dir`` that does not hold the batches is an error.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import data, plots, runs, train
from jaxnets.models import get_model

TOUR_ORDER = 900
TOUR_SECONDS = 6  # its tour entry's wall time (2 jobs, 2 cores): longest start first

PUBLISHED_TEST_ERROR = {
    "cifar_resnet20": 0.0875,
    "cifar_resnet32": 0.0751,
    "cifar_resnet44": 0.0717,
    "cifar_resnet56": 0.0697,
    "cifar_resnet110": 0.0643,
}


@dataclasses.dataclass(frozen=True)
class Config(train.LoopSettings):
    """He et al. CIFAR-10 training of one network.

    Command line: ``python -m experiments.cifar10 --data-dir ~/data/cifar-10-batches-py
    [--model cifar_resnet56] [--dtype bfloat16]``
    Runtime: the full 64k iterations were not run (no GPU, no CIFAR-10 where this was
    written). Timed on CIFAR-format random data on a quiet 2-core CPU (AMD EPYC, Zen 5):
    ResNet-20 at batch 128, augmentation included, 0.29 s per step (120 steps 45.5 s, 20
    steps 16.3 s; the difference over 100), so the full recipe takes about 5 hours on such
    a CPU for ResNet-20, and roughly proportionally more with depth (ResNet-110: over a
    day): a GPU job. ``--quick`` (and the tests) run 20 steps at batch 16 on whatever is in
    the data directory.
    Expected: test error near the published 8.75% (ResNet-20) ... 6.43% (ResNet-110).
    """

    seed: int = 0
    data_dir: str | None = None
    model: str = "cifar_resnet20"
    width: int | None = None  # None: the model's own (16 for CIFAR ResNets, 64 for VGG)
    batch_size: int = 128
    steps: int = 64_000
    milestones: tuple[int, ...] = (32_000, 48_000)
    lr: float = 0.1
    warmup_steps: int = -1  # -1: 400 for ResNet-110 (the paper), else 0; lr 0.01 meanwhile
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True
    train_subset: int = 0  # 0: all 50k images
    dtype: Literal["float32", "bfloat16"] = "float32"
    eval_every: int = 4000
    log_every: int = 100
    checkpoint_every: int = 4000


QUICK = {"steps": 20, "milestones": (10, 15), "log_every": 5, "eval_every": 10,
         "checkpoint_every": 10, "batch_size": 16}  # fmt: skip
# The tour trains only where the data set is on disk (see find_data); elsewhere it skips.
TOUR = {"steps": 200, "milestones": (100, 150), "eval_every": 200, "checkpoint_every": 200}


def augment(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Zero-pad by ``pad``, take a random HxW crop, flip half the images left-right.

    ``(B, H, W, C)`` -> ``(B, H, W, C)``, one crop offset and one coin per image.
    """
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oy = rng.integers(0, 2 * pad + 1, b)
    ox = rng.integers(0, 2 * pad + 1, b)
    rows = oy[:, None] + np.arange(h)[None, :]  # (B, H)
    cols = ox[:, None] + np.arange(w)[None, :]  # (B, W)
    flip = rng.random(b) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class AugmentedBatches:
    """``batch_fn(step)``: a `data.Batches` batch, augmented with ``default_rng([seed, step])``,
    so a resumed run sees exactly the batches of an uninterrupted one."""

    def __init__(self, batches: data.Batches, seed: int, enabled: bool = True):
        self.batches, self.seed, self.enabled = batches, seed, enabled

    def __call__(self, step: int) -> dict:
        b = dict(self.batches(step))
        if self.enabled:
            b["x"] = augment(b["x"], np.random.default_rng([self.seed, 1, step]))
        return b


DEFAULT_DIR = "data/cifar-10-batches-py"


def find_data(cfg: Config) -> str | None:
    """``cfg.data_dir``, else ``$CIFAR10_DIR``, else ``data/cifar-10-batches-py`` if present."""
    if cfg.data_dir is not None:
        return cfg.data_dir
    for candidate in (os.environ.get("CIFAR10_DIR"), DEFAULT_DIR):
        if candidate and Path(candidate).is_dir():
            return candidate
    return None


def load(directory: str, train_subset: int = 0) -> data.Dataset:
    """CIFAR-10 from ``directory`` with the training set's per-pixel mean subtracted."""
    ds = data.load_cifar10(directory)
    x_train, y_train = ds.x_train, ds.y_train
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    mean = x_train.mean(axis=0, keepdims=True)  # (1, 32, 32, 3): the per-pixel mean
    ds = data.Dataset(
        (x_train - mean).astype(np.float32), y_train, (ds.x_test - mean).astype(np.float32),
        ds.y_test, num_classes=10, name="cifar10", info={"directory": directory},
    )  # fmt: skip
    return ds


SKIP_MESSAGE = (
    "CIFAR-10 is not on disk. Download the python version (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html), unpack it, and run "
    "`python -m experiments.cifar10 --data-dir DIR/cifar-10-batches-py` (or set CIFAR10_DIR "
    "and rerun the tour with this run directory removed)."
)


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    directory = find_data(cfg)
    if directory is None:
        return {"skipped": SKIP_MESSAGE, "model": cfg.model}
    ds = load(directory, cfg.train_subset)
    kwargs = {"num_classes": 10, "dtype": jnp.bfloat16 if cfg.dtype == "bfloat16" else None}
    if cfg.width is not None:
        kwargs["width"] = cfg.width
    if cfg.model.replace("_bn", "").removeprefix("plain_").startswith("vgg"):
        kwargs["head"] = "small"
    model = get_model(cfg.model, **kwargs)
    warmup = cfg.warmup_steps
    if warmup < 0:
        warmup = 400 if cfg.model.endswith("resnet110") else 0
    schedule = train.he_schedule(cfg.lr, cfg.milestones, warmup)
    tx = train.make_optimizer("sgd", schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    trainer = train.Trainer(model, train.cross_entropy_loss, tx, schedule=schedule)
    batch_fn = AugmentedBatches(
        data.Batches(ds.train, cfg.batch_size, seed=cfg.seed), cfg.seed, cfg.augment
    )
    state = trainer.init(jax.random.key(cfg.seed), batch_fn(0))
    result = trainer.fit(
        state, batch_fn, cfg.steps, run_dir=run_dir,
        eval_batches=lambda: data.eval_batches(ds.test, 500), **cfg.loop(), desc=cfg.model,
    )  # fmt: skip
    runtime = result.wall_s
    plots.metric_curves(
        run_dir.metrics(), run_dir.plot_path("curves"),
        keys=("loss", "accuracy", "eval_accuracy"), title=f"{cfg.model} on CIFAR-10",
    )  # fmt: skip
    speeds = [r["steps_per_sec"] for r in result.history if "steps_per_sec" in r]
    return {
        "model": cfg.model,
        "params": result.num_params,
        "steps": cfg.steps,
        "test_error": 1.0 - result.eval["accuracy"],
        "test_loss": result.eval["loss"],
        "train_error_last_window": 1.0 - result.metrics["accuracy"],
        "published_test_error": PUBLISHED_TEST_ERROR.get(cfg.model),
        "train_examples": int(len(ds.y_train)),
        "data_dir": str(directory),
        "steps_per_sec": float(np.median(speeds)) if speeds else None,
        "device": jax.devices()[0].device_kind,
        "runtime_s": runtime,
    }


def report(results: dict, run_dir: runs.RunDir) -> str:
    if "skipped" in results:
        return f"Skipped: {results['skipped']}"
    pub = results["published_test_error"]
    return "\n".join([
        "| model | params | steps | test error | published (He et al. Table 6) | steps/s | device |",
        "|---|---|---|---|---|---|---|",
        f"| {results['model']} | {results['params']:,} | {results['steps']} | "
        f"{results['test_error']:.4f} | {'-' if pub is None else f'{pub:.4f}'} | "
        f"{runs.fmt(results['steps_per_sec'])} | {results['device']} |",
        "",
        "![curves](curves.png)",
    ])  # fmt: skip


if __name__ == "__main__":
    runs.main(__name__)
