"""Receptive field: two stacked 3x3 convs see what one 5x5 sees, three what one 7x7 sees.

VGG's argument (Simonyan & Zisserman 2014, Sec. 2.3), measured instead of asserted:

1. Receptive field. For each stack the gradient of one output unit (the centre of the map)
   with respect to the input is non-zero exactly on the input pixels that unit sees. Its
   bounding box is 5x5 for two 3x3 layers and for one 5x5 layer, 7x7 for three 3x3 layers and
   for one 7x7 layer. Without padding the map shrinks the same way (h -> h-2 -> h-4 = h-4).
2. Parameters. A C -> C stack of two 3x3 layers holds 2*9*C^2 weights, one 5x5 layer
   25*C^2 (three 3x3: 27*C^2 vs 49*C^2), read off the parameter trees.
3. Accuracy. Small VGG-style nets that differ only in their blocks (two 3x3 vs one 5x5,
   three 3x3 vs one 7x7; a shared 3x3 stem, BatchNorm, ReLU, 2x2 max-pools) are trained on
   the same data (the 8x8 digits resized to 16x16) and their test accuracies compared, with
   the seed-to-seed noise: the stacked nets get there with fewer parameters and more
   non-linearities. On the full training set the task saturates (~99% accuracy, 360 test
   images) and the measured differences are within two standard errors; with 200 training
   images (``--train-examples 200``) it does not, and two 3x3 layers at least match one 5x5.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import data, distributed, plots, runs, train
from jaxnets.models.common import conv
from jaxnets.models.probes import receptive_field
from jaxnets.models.vgg import VGGSmallHead, VGGStage

TOUR_ORDER = 200
TOUR_SECONDS = 16  # its tour entry's wall time (2 jobs, 2 cores): longest start first

# name -> (conv layers per block, kernel size)
VARIANTS = {"3x3x2": (2, 3), "5x5": (1, 5), "3x3x3": (3, 3), "7x7": (1, 7)}
PAIRS = (("3x3x2", "5x5"), ("3x3x3", "7x7"))


@dataclasses.dataclass(frozen=True)
class Config:
    """Receptive fields from gradients, parameter counts, and a trained comparison.

    Command line: ``python -m experiments.receptive_field [--width 32] [--steps 800]
    [--seeds 3]``
    Runtime (measured on a heavily shared 2-core machine, CPU time in brackets): default
    25 min wall [6.8 min CPU]; ``TOUR`` (``--no-train``: receptive fields and weight counts
    only) a few seconds; ``--quick`` 1.3 min wall [22 s CPU]. On a free laptop expect about
    the CPU time.
    Expected (measured, default config): extents 5x5 / 5x5 / 7x7 / 7x7; weights 18, 25, 27,
    49 x C^2; test accuracy (3 seeds) 3x3x2 0.986 +- 0.002 vs 5x5 0.990 +- 0.001, 3x3x3
    0.991 +- 0.001 vs 7x7 0.992 +- 0.002 (all nets fit the training set): differences of one
    or two test images, within two standard errors. A tour-size trained comparison (3
    seeds, width 16, 300 Adam steps at batch 32 and lr 5e-3 on the first 200 training
    images; ~2 min CPU; every net fits its training images): 3x3x2 0.849 ± 0.009 vs 5x5
    0.872 ± 0.007, 3x3x3 0.850 ± 0.002 vs 7x7 0.878 ± 0.002: at that width and budget the
    large kernels are 2-3 points more accurate, so the tour does not train. With
    ``--train-examples 200 --seeds 5`` (not saturated; 9 min on 2 quiet cores): 3x3x2
    0.891 +- 0.005 vs 5x5 0.885 +- 0.007 (the stack at least as accurate with 27% fewer
    parameters), 3x3x3 0.872 +- 0.013 vs 7x7 0.885 +- 0.007.
    """

    seed: int = 0
    seeds: int = 3
    width: int = 32
    blocks: int = 2
    image_size: int = 16
    rf_input: int = 15
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    train_examples: int = 0  # 0: the whole training set (1438 images); n: its first n
    log_every: int = 50
    train: bool = True  # False: receptive fields and weight counts only (no training)


QUICK = {"seeds": 1, "width": 8, "steps": 40, "log_every": 20}
# The tour checks the notes' own claim, which needs no training: the same receptive field
# with fewer weights (measured from the gradient and the parameter trees, in seconds). The
# trained comparison is the full run's: at a tour-size budget (3 seeds x 4 nets, width 16,
# 300 steps on 200 images, ~2 min CPU) the large kernels were 2-3 points *more* accurate
# (see the Config docstring), a result of that budget, not a claim of the notes.
TOUR = {"train": False}


class KernelNet(nn.Module):
    """3x3 stem (in -> width), then ``blocks`` x [``layers`` k x k convs width -> width, max-pool],
    global average pool, Linear. ``(batch, H, W, C)`` -> ``(batch, num_classes)``.

    The stem is shared by every variant so that each block maps ``width`` to ``width`` channels,
    the setting of the 2*9*C^2 vs 25*C^2 comparison.
    """

    layers: int
    kernel: int
    width: int
    blocks: int
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = VGGStage((self.width,), None, batch_norm=True, name="stem")(x, train)
        for b in range(self.blocks):
            x = VGGStage(
                (self.width,) * self.layers, "maxpool", batch_norm=True,
                kernel_size=self.kernel, name=f"block{b + 1}",
            )(x, train)  # fmt: skip
        return VGGSmallHead(self.num_classes, name="head")(x, train)


def kernel_weights(params) -> int:
    """Number of conv weights (kernels only: no biases, no BatchNorm)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(math.prod(v.shape) for p, v in leaves if p[-1].key == "kernel" and v.ndim == 4)


def measure_stacks(cfg: Config) -> dict:
    """Receptive field (from the gradient), map shrinkage without padding, weight counts."""
    key = jax.random.key(cfg.seed)
    c = cfg.width
    x = jax.random.normal(key, (1, cfg.rf_input, cfg.rf_input, c))
    out = {}
    for name, (layers, k) in VARIANTS.items():
        stage = VGGStage((c,) * layers, None, kernel_size=k)
        variables = stage.init(key, x, train=False)
        g, extent = receptive_field(lambda x, s=stage, v=variables: s.apply(v, x, train=False), x)
        weights = kernel_weights(variables["params"])

        # Valid (unpadded) convs: h -> h - (k - 1) per layer.
        def valid(x, layers=layers, k=k):
            for _ in range(layers):
                x = conv(c, k, 1, 0).apply({"params": {"kernel": jnp.zeros((k, k, c, c))}}, x)
            return x

        h = cfg.rf_input
        valid_h = jax.eval_shape(valid, jax.ShapeDtypeStruct((1, h, h, c), jnp.float32)).shape[1]
        out[name] = {
            "layers": layers,
            "kernel": k,
            "extent": list(extent),
            "kernel_weights": weights,
            "kernel_weights_per_C2": weights / c**2,
            "valid_output": f"{h} -> {valid_h}",
            "rf_map": (g / g.max()).tolist(),
        }
    return out


def accuracy_gap(small: list[float], large: list[float]) -> dict:
    """Mean test-accuracy difference (stacked minus large kernel) and its standard error over
    seeds, sqrt(s_a^2 / n + s_b^2 / n) with sample variances; ``within_noise`` when
    |difference| <= 2 standard errors (None with a single seed: no noise estimate)."""
    a, b = np.asarray(small), np.asarray(large)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"accuracy_difference": diff, "difference_se": None, "within_noise": None}
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    return {"accuracy_difference": diff, "difference_se": se, "within_noise": abs(diff) <= 2 * se}


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    stacks = measure_stacks(cfg)
    out = {"width": cfg.width, "receptive_field": stacks, "training": {}}
    if cfg.train:
        training, n_train = _train_nets(cfg, run_dir)
        checks = {}
        for small, large in PAIRS:
            checks[f"{small}_vs_{large}"] = {
                "same_receptive_field": stacks[small]["extent"] == stacks[large]["extent"],
                "fewer_weights": stacks[small]["kernel_weights"] < stacks[large]["kernel_weights"],
                "fewer_params_in_trained_net": training[small]["params"] < training[large]["params"],
                **accuracy_gap(training[small]["test_accuracies"], training[large]["test_accuracies"]),
            }  # fmt: skip
        out |= {"train_examples": n_train, "training": training, "claims": checks}
    _plots(stacks, out["training"], run_dir)
    for s in stacks.values():
        del s["rf_map"]  # plotted; too bulky for results.json
    return out | {"config": runs._config_json(cfg)}


def _train_nets(cfg: Config, run_dir: runs.RunDir) -> tuple[dict, int]:
    """The four nets trained for ``cfg.seeds`` seeds each: (per-net results, training images)."""
    ds = data.load_digits(size=cfg.image_size, seed=cfg.seed)
    if cfg.train_examples:  # fewer labels: a task that is not saturated at ~99%
        ds = ds.take_train(cfg.train_examples, arg="train_examples")
    batch_fn = data.Batches(ds.train, cfg.batch_size, seed=cfg.seed)
    tx = train.make_optimizer(cfg.optimizer, cfg.lr, total_steps=cfg.steps, schedule="cosine")

    training = {}
    for name, (layers, k) in VARIANTS.items():
        model = KernelNet(layers, k, cfg.width, cfg.blocks, ds.num_classes)
        trainer = train.Trainer(model, train.cross_entropy_loss, tx)

        def fn(sub, trainer=trainer, seed=0):
            t0 = time.perf_counter()
            state = trainer.init(jax.random.key(seed), batch_fn(0))
            res = trainer.fit(
                state, data.Batches(ds.train, cfg.batch_size, seed=seed), cfg.steps,
                run_dir=sub, eval_batches=lambda: data.eval_batches(ds.test, 500),
                log_every=cfg.log_every, checkpoint_every=cfg.steps, desc=sub.path.name,
            )  # fmt: skip
            train_acc = trainer.evaluate(res.state, data.eval_batches(ds.train, 500))["accuracy"]
            return {
                "test_accuracy": res.eval["accuracy"],
                "train_accuracy": train_acc,
                "params": res.num_params,
                "kernel_weights": kernel_weights(res.state.params),
                "runtime_s": time.perf_counter() - t0,
            }

        per_seed = [
            run_dir.sub_run(f"{name}-seed{s}", lambda sub, s=s: fn(sub, seed=s))
            for s in range(cfg.seed, cfg.seed + cfg.seeds)
        ]
        accs = np.array([r["test_accuracy"] for r in per_seed])
        training[name] = {
            "test_accuracy": float(accs.mean()),
            "test_accuracy_std": float(accs.std()),
            "test_accuracies": accs.tolist(),
            "train_accuracy": float(np.mean([r["train_accuracy"] for r in per_seed])),
            "params": per_seed[0]["params"],
            "kernel_weights": per_seed[0]["kernel_weights"],
            "runtime_s": float(np.sum([r["runtime_s"] for r in per_seed])),
        }

    return training, len(ds.y_train)


def closed_form(layers: int, kernel: int, channels: int) -> tuple[int, int]:
    """(receptive field side, conv weights) of ``layers`` stacked stride-1 ``kernel`` x
    ``kernel`` convs, C -> C without bias: each layer adds kernel - 1 to the side, so
    ``layers * (kernel - 1) + 1``; each holds kernel^2 C^2 weights."""
    return layers * (kernel - 1) + 1, layers * kernel * kernel * channels * channels


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """VGG's argument as checked claims.

    Per pair (two 3x3 vs one 5x5, three 3x3 vs one 7x7): (1) deterministic: the receptive
    field measured from the gradient is the closed form ``layers * (k - 1) + 1`` for both
    stacks (5x5, 7x7) and the conv weights are the closed form ``layers * k^2 * C^2``
    (18 vs 25, 27 vs 49 x C^2), fewer for the stack; (2) over seeds: the stacked net is not
    less accurate: its mean test accuracy is at least the large kernel's minus 2 standard
    errors of the difference (the large kernel does not beat it in `runs.compare`'s sense),
    and it has fewer parameters. The notes claim fewer parameters and more
    non-linearities, not higher accuracy; that is what is checked. One seed: the test is on
    the means alone (``min_seeds=1``) and the evidence says so.
    """
    topic = "VGG: stacked 3x3 convolutions"
    rf, tr, c = results["receptive_field"], results["training"], results["width"]
    out = []
    for small, large in PAIRS:
        (side_s, w_s), (side_l, w_l) = (closed_form(*VARIANTS[n], c) for n in (small, large))
        ext_s, ext_l = rf[small]["extent"], rf[large]["extent"]
        holds = (
            ext_s == [side_s, side_s] and ext_l == [side_l, side_l] and side_s == side_l
            and rf[small]["kernel_weights"] == w_s and rf[large]["kernel_weights"] == w_l
            and w_s < w_l
        )  # fmt: skip
        layers, k = VARIANTS[small][0], VARIANTS[large][1]
        out.append(runs.Claim(
            topic, f"{layers} stacked 3x3 convs see the same {side_l}x{side_l} receptive field "
            f"as one {k}x{k} conv (measured from the gradient) with {w_s // c**2} C^2 < "
            f"{w_l // c**2} C^2 weights (C = {c})", bool(holds),
            f"receptive field {'x'.join(map(str, ext_s))} vs {'x'.join(map(str, ext_l))}; conv "
            f"weights {rf[small]['kernel_weights']:,} vs {rf[large]['kernel_weights']:,}",
        ))  # fmt: skip
    n_train = results.get("train_examples", cfg.train_examples or "all")
    for small, large in PAIRS if tr else ():
        a, b = tr[small]["test_accuracies"], tr[large]["test_accuracies"]
        n = min(len(a), len(b))
        beaten, ev = runs.compare(
            b, a, higher_is_better=True, names=(large, small), min_seeds=1 if n == 1 else 3
        )
        fewer = tr[small]["params"] < tr[large]["params"]
        out.append(runs.Claim(
            topic, f"{small} is not less accurate than {large} with fewer parameters "
            f"({tr[small]['params']:,} vs {tr[large]['params']:,}): mean test accuracy >= "
            f"{large}'s - 2 SE of the difference (digits 16x16, {n_train} training images, "
            f"{cfg.steps} {cfg.optimizer} steps, width {c}, {n} seed{'s' if n > 1 else ''})",
            bool(fewer and not beaten), f"test accuracy {ev}", n,
        ))  # fmt: skip
    return out


def _plots(stacks: dict, training: dict, run_dir: runs.RunDir) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stacks), figsize=(2.6 * len(stacks), 3.0))
    for ax, (name, s) in zip(axes, stacks.items(), strict=True):
        ax.imshow(np.array(s["rf_map"]), cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name}: {'x'.join(map(str, s['extent']))}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("|d y_centre / d x| over the input (normalised); support = receptive field")
    fig.tight_layout()
    if distributed.is_main():  # one writer in a multi-process run
        fig.savefig(run_dir.plot_path("receptive_fields"), dpi=100)
    plt.close(fig)
    if not training:
        return
    labels = {n: f"{n}\n{t['params']:,} p" for n, t in training.items()}
    plots.bars(
        {labels[n]: 1.0 - t["test_accuracy"] for n, t in training.items()},
        run_dir.plot_path("accuracy"),
        errors={labels[n]: t["test_accuracy_std"] for n, t in training.items()},
        ylabel="test error (mean over seeds)", title="digits 16x16: stacked 3x3 vs large kernels",
    )  # fmt: skip


def report(results: dict, run_dir: runs.RunDir) -> str:
    c = results["width"]
    lines = [
        f"Stacks at C = {c} channels (C -> C):",
        "",
        "| stack | receptive field (from grad) | no padding | conv weights | = x C^2 |",
        "|---|---|---|---|---|",
    ]
    for n, s in results["receptive_field"].items():
        lines.append(
            f"| {n} | {'x'.join(map(str, s['extent']))} | {s['valid_output']} | "
            f"{s['kernel_weights']:,} | {s['kernel_weights_per_C2']:g} |"
        )
    cfg = runs.config_from_args(sys.modules[__name__], results.get("config", {}))
    if results["training"]:
        lines += _training_table(results, cfg)
    else:
        lines += ["", "No training in this run (`--no-train`): the accuracy comparison is the "
                  "full run's.", ""]  # fmt: skip
    for cl in claims(results, cfg):
        lines.append(f"- {'pass' if cl.holds else '**FAIL**'}: {cl.claim}. {cl.evidence}")
    lines += ["", "![receptive fields](receptive_fields.png)"]
    if results["training"]:
        lines += ["", "![test error](accuracy.png)"]
    return "\n".join(lines)


def _training_table(results: dict, cfg: Config) -> list[str]:
    c = results["width"]
    n = len(next(iter(results["training"].values()))["test_accuracies"])
    lines = [
        "",
        f"Training: digits at {cfg.image_size}x{cfg.image_size}, "
        f"{results.get('train_examples', '?')} training images, width {c}, {cfg.blocks} "
        f"blocks, {cfg.steps} {cfg.optimizer} steps (batch {cfg.batch_size}, lr {cfg.lr}, "
        f"cosine), {n} seed{'s' if n > 1 else ''}.",
        "",
        "| net | params | test accuracy (mean ± standard error) | train accuracy |",
        "|---|---|---|---|",
    ]
    for name, t in results["training"].items():
        accs = t["test_accuracies"]
        acc = (
            "{:.4f} ± {:.4f}".format(*runs.mean_se(accs)) if len(accs) > 1
            else f"{accs[0]:.4f} (one seed: no standard error)"
        )  # fmt: skip
        lines.append(f"| {name} | {t['params']:,} | {acc} | {t['train_accuracy']:.4f} |")
    return lines + [""]


if __name__ == "__main__":
    runs.main(__name__)
