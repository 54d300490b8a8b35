"""Degradation: a deeper plain CNN trains worse, a deeper ResNet does not (He et al. 2015, Fig. 6).

He et al. trained "plain" networks (a ResNet with its skip connections removed) of depth 20
and 56 on CIFAR-10: the 56-layer plain net has the *higher training error*, so the problem is
optimisation, not overfitting; with skip connections (H(x) = F(x) + x) the 56-layer net is
at least as good as the 20-layer one. Here the same CIFAR-style networks (three stages of 3x3
basic blocks, option-A shortcuts, BatchNorm), at small width, learn MNIST-1D with 1D
convolutions (or the 8x8 digits resized to 16x16 with 2D ones) under the paper's recipe:
SGD with momentum 0.9, learning rate divided by 10 at 50% and 75% of training, weight decay.

Also measured: the gradient norm of every conv kernel at initialisation (first batch, train
mode), which shows how the gradient reaching the early layers differs with and without the
skip connections.

``seeds`` runs each net from that many seeds (seed s: initial weights from ``key(s)``, batch
order from ``Batches(seed=s)``), one after the other with one compiled step per net; the
claims (``claims``) compare training errors over the seeds with their standard errors.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import data, plots, runs, train
from jaxnets.models import cifar_resnet
from jaxnets.models.probes import conv_kernels, layer_grad_norms
from jaxnets.ops.conv import IMPLS, default_impl

TOUR_ORDER = 210
TOUR_SECONDS = 150  # its tour entry's wall time (2 jobs, 2 cores): longest start first


@dataclasses.dataclass(frozen=True)
class Config:
    """Plain vs residual at two depths: training and test error.

    Command line: ``python -m experiments.degradation [--depths 20 56] [--width 8]
    [--steps 3000] [--dataset mnist1d]``
    Runtime (measured on a heavily shared 2-core machine, CPU time in brackets): default
    16 min wall [4.9 min CPU]; ``TOUR`` 2.5 min wall in the 2-job tour (about half of it
    compiling and initialising the four nets); ``--quick`` 1.6 min wall [33 s CPU]. On a free
    laptop expect about the CPU time.
    Expected (measured, MNIST-1D, seed 0). Default config: training error plain20 0.000,
    plain56 0.271, resnet20 0.000, resnet56 0.000 (test error 0.019 / 0.307 / 0.020 /
    0.018). 600 steps on the first 1000 training examples (one seed): 0.046 / 0.462 / 0.000 /
    0.000. ``TOUR`` (depths 8 and 32, 150 steps on the first 1000 examples, 3 seeds, mean ±
    standard error; XLA's convolutions, no gradient probe): plain8 0.265 ± 0.028, plain32
    0.599 ± 0.062, resnet8 0.255 ± 0.027, resnet32 0.084 ± 0.019. Either way the deeper plain net trains worse and the deeper ResNet does not, as in
    He et al.'s CIFAR-10 Fig. 6. (With 600 steps on all 4000 examples ResNet-56 is still
    behind ResNet-20, 0.036 vs 0.009: it starts more slowly, then catches up.)
    """

    seed: int = 0
    seeds: int = 1  # seeds seed, seed + 1, ...: each net trained once per seed
    dataset: Literal["mnist1d", "digits"] = "mnist1d"
    depths: tuple[int, ...] = (20, 56)
    width: int = 8
    train_examples: int = 0  # 0: the whole training set; n: its first n examples
    steps: int = 3000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_batch: int = 256
    grad_probe: bool = True  # the per-layer gradient norms at init (first seed; 2 compiles)
    log_every: int = 50
    checkpoint_every: int = 1000
    # The convolution library (`jaxnets.ops.conv`; same values): "auto" picks oneDNN on
    # x86-64, "xla" is XLA's own, ~4x cheaper per step for these width-8 1D nets (measured).
    conv_impl: Literal["auto", "onednn", "gemm", "xla"] = "auto"


QUICK = {
    "depths": (8, 14),
    "width": 4,
    "steps": 60,
    "warmup_steps": 10,
    "log_every": 20,
    "grad_batch": 64,
    "train_examples": 512,
}
# 3 seeds of depths 8 and 32 on 1000 examples; XLA's convolutions and no gradient probe
# keep it within the tour's budget (see the Config docstring).
TOUR = {
    "seeds": 3,
    "depths": (8, 32),
    "steps": 150,
    "warmup_steps": 30,
    "train_examples": 1000,
    "conv_impl": "xla",
    "grad_probe": False,
}


def load(cfg: Config) -> data.Dataset:
    ds = (
        data.load_mnist1d()
        if cfg.dataset == "mnist1d"
        else data.load_digits(size=16, seed=cfg.seed)
    )
    return ds.take_train(cfg.train_examples, arg="train_examples") if cfg.train_examples else ds


def _check(cfg: Config) -> None:
    if isinstance(cfg.seeds, bool) or not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise ValueError(f"degradation: seeds must be an int >= 1, got {cfg.seeds!r}")
    if cfg.conv_impl not in IMPLS:
        raise ValueError(f"degradation: conv_impl must be one of {IMPLS}, got {cfg.conv_impl!r}")


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    _check(cfg)
    ds = load(cfg)
    spatial_dims = ds.x_train.ndim - 2
    rng = np.random.default_rng(cfg.seed)
    grad_idx = rng.choice(len(ds.y_train), min(cfg.grad_batch, len(ds.y_train)), replace=False)
    grad_x, grad_y = jnp.asarray(ds.x_train[grad_idx]), jnp.asarray(ds.y_train[grad_idx])
    # He et al.: lr / 10 at 50% and 75% of training (32k, 48k of 64k), after a warm-up at lr / 10.
    schedule = train.he_schedule(cfg.lr, (cfg.steps // 2, 3 * cfg.steps // 4), cfg.warmup_steps)
    tx = train.make_optimizer("sgd", schedule, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)

    def one(depth: int, plain: bool):
        model = cifar_resnet(
            depth, ds.num_classes, width=cfg.width, plain=plain, spatial_dims=spatial_dims
        )
        # One trainer per net: its compiled step is shared by the seeds.
        trainer = train.Trainer(model, train.cross_entropy_loss, tx, schedule=schedule)

        def fn(sub: runs.RunDir, seed: int) -> dict:
            t0, c0 = time.perf_counter(), time.process_time()
            batch_fn = data.Batches(ds.train, cfg.batch_size, seed=seed)
            with default_impl(cfg.conv_impl):
                # Eager, not jitted: the ops' compilations are cached across nets and seeds
                # (a jitted init compiles anew for every net, ~4-12 s of CPU each).
                state = trainer.init(jax.random.key(seed), batch_fn(0))
                out = {}
                if cfg.grad_probe and seed == cfg.seed:  # one seed is enough to show it
                    norms = layer_grad_norms(model, state.variables, grad_x, grad_y)
                    # At init the running statistics are mean 0, variance 1, so inference-mode
                    # BatchNorm is the identity: this is the same network without normalisation.
                    norms_no_bn = layer_grad_norms(
                        model, state.variables, grad_x, grad_y, train=False
                    )
                    out = {
                        "grad_norms_at_init": [n for _, n in norms],
                        "grad_norms_at_init_no_bn": [n for _, n in norms_no_bn],
                    }
                result = trainer.fit(
                    state, batch_fn, cfg.steps, run_dir=sub, log_every=cfg.log_every,
                    checkpoint_every=cfg.checkpoint_every, desc=sub.path.name,
                )  # fmt: skip
                ev_train = trainer.evaluate(result.state, data.eval_batches(ds.train, 500))
                ev_test = trainer.evaluate(result.state, data.eval_batches(ds.test, 500))
            curve = [(r["step"], 1.0 - r["accuracy"]) for r in result.history if "accuracy" in r]
            return {
                "seed": seed,
                "train_error": 1.0 - ev_train["accuracy"],
                "test_error": 1.0 - ev_test["accuracy"],
                "train_loss": ev_train["loss"],
                "params": result.num_params,
                "conv_layers": len(conv_kernels(result.state.params)),
                **out,
                "train_error_curve": curve,
                "runtime_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,
            }

        name = f"{'plain' if plain else 'resnet'}{depth}"
        per_seed = [run_dir.sub_run(f"{name}-seed{s}", lambda sub, s=s: fn(sub, s)) for s in seeds]
        first = per_seed[0]
        return name, {
            "train_error": float(np.mean([r["train_error"] for r in per_seed])),
            "test_error": float(np.mean([r["test_error"] for r in per_seed])),
            "train_loss": float(np.mean([r["train_loss"] for r in per_seed])),
            "train_errors": [r["train_error"] for r in per_seed],
            "test_errors": [r["test_error"] for r in per_seed],
            "seeds": [r["seed"] for r in per_seed],
            "params": first["params"],
            "conv_layers": first["conv_layers"],
            **{
                k: first[k]
                for k in ("grad_norms_at_init", "grad_norms_at_init_no_bn")
                if k in first
            },
            "train_error_curve": first["train_error_curve"],  # the first seed's
            "runtime_s": float(sum(r["runtime_s"] for r in per_seed)),
            "cpu_s": float(sum(r["cpu_s"] for r in per_seed)),
        }

    results = dict(one(d, plain) for plain in (True, False) for d in cfg.depths)
    _plots(results, run_dir, cfg)
    results["config"] = runs._config_json(cfg)
    results["train_examples"] = len(ds.y_train)
    return results


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """He et al.'s degradation, checked on training error over ``cfg.seeds`` seeds.

    With depths d < D: (1) plain-D trains worse than plain-d: plain-d's mean training error
    is lower by more than 2 standard errors of the difference (`runs.compare`); (2) the
    skip connections fix it: ResNet-D's is lower than plain-D's by more than 2 SE; (3) the
    deeper ResNet is no worse than the shallower one: mean ResNet-D <= mean ResNet-d + 2 SE of
    the difference. One seed (the full default): the verdicts are on the means alone
    (``min_seeds=1``) and the evidence says "no standard error". One depth: no claim.
    """
    depths = sorted(set(cfg.depths))
    if len(depths) < 2:
        return []
    d, D = depths[0], depths[-1]
    topic = "ResNet: residual vs plain depth"
    errs = {n: results[n]["train_errors"] for n in (f"plain{d}", f"plain{D}", f"resnet{d}",
                                                     f"resnet{D}")}  # fmt: skip
    n = len(errs[f"plain{d}"])
    min_seeds = 1 if n == 1 else 3  # 1: a full-size run's single seed, quoted as such
    n_train = results.get("train_examples", cfg.train_examples or "all")
    setup = (
        f"{cfg.dataset}, {n_train} training examples, {cfg.steps} SGD steps, width {cfg.width}, "
        f"{n} seed{'s' if n > 1 else ''}"
    )
    out = []
    holds, ev = runs.compare(
        errs[f"plain{d}"], errs[f"plain{D}"], higher_is_better=False,
        names=(f"plain{d}", f"plain{D}"), min_seeds=min_seeds,
    )  # fmt: skip
    out.append(runs.Claim(
        topic, f"plain-{D} has a higher training error than plain-{d} by > 2 SE ({setup})",
        holds, f"training error {ev}", n,
    ))  # fmt: skip
    holds, ev = runs.compare(
        errs[f"resnet{D}"], errs[f"plain{D}"], higher_is_better=False,
        names=(f"resnet{D}", f"plain{D}"), min_seeds=min_seeds,
    )  # fmt: skip
    out.append(runs.Claim(
        topic, f"residual connections fix it: ResNet-{D} has a lower training error than "
        f"plain-{D} by > 2 SE ({setup})", holds, f"training error {ev}", n,
    ))  # fmt: skip
    # "No worse" = ResNet-d does not beat ResNet-D by more than 2 SE.
    beaten, ev = runs.compare(
        errs[f"resnet{d}"], errs[f"resnet{D}"], higher_is_better=False,
        names=(f"resnet{d}", f"resnet{D}"), min_seeds=min_seeds,
    )  # fmt: skip
    out.append(runs.Claim(
        topic, f"ResNet-{D} trains no worse than ResNet-{d}: its mean training error is at "
        f"most ResNet-{d}'s + 2 SE of the difference ({setup})", not beaten,
        f"training error {ev}", n,
    ))  # fmt: skip
    return out


def _plots(results: dict, run_dir: runs.RunDir, cfg: Config) -> None:
    names = [k for k in results if k.startswith(("plain", "resnet"))]
    curves = {n: np.array(results[n]["train_error_curve"]) for n in names}
    step = next(iter(curves.values()))[:, 0]
    plots.lines(
        step, {n: c[:, 1] for n, c in curves.items()}, run_dir.plot_path("train_error"),
        xlabel="step", ylabel="training error (train mode, window mean)", logy=True,
        title=f"plain vs residual on {cfg.dataset} (He et al. Fig. 6)",
    )  # fmt: skip
    plots.bars(
        {f"{n} train": results[n]["train_error"] for n in names}
        | {f"{n} test": results[n]["test_error"] for n in names},
        run_dir.plot_path("errors"),
    )
    if not cfg.grad_probe:
        return
    longest = max(len(results[n]["grad_norms_at_init"]) for n in names)
    xs = np.arange(longest)
    ys = {}
    for key, suffix in (("grad_norms_at_init", ""), ("grad_norms_at_init_no_bn", " no BN")):
        for n in names:  # shorter nets end early (NaN padding is not drawn)
            if key in results[n]:  # runs made before the no-BN probe lack it
                g = results[n][key]
                ys[n + suffix] = np.concatenate([g, np.full(longest - len(g), np.nan)])
    plots.lines(
        xs + 1, ys, run_dir.plot_path("grad_norms"), xlabel="conv layer (1 = stem)",
        ylabel="||dL/dW|| at init", logy=True,
        title="per-layer gradient norm at initialisation (with / without BatchNorm)",
    )  # fmt: skip


def report(results: dict, run_dir: runs.RunDir) -> str:
    names = [k for k in results if k.startswith(("plain", "resnet"))]
    cfg = runs.config_from_args(sys.modules[__name__], results.get("config", {}))
    n = len(results[names[0]].get("train_errors", [0]))
    lines = [
        f"Configuration: {cfg.dataset}, {results.get('train_examples', '?')} training "
        f"examples, width {cfg.width}, {cfg.steps} SGD steps (batch {cfg.batch_size}, lr "
        f"{cfg.lr}, momentum {cfg.momentum}, weight decay {cfg.weight_decay}), {n} seed"
        f"{'s' if n > 1 else ''} ({'mean ± standard error' if n > 1 else 'no standard error'}).",
        "",
        "| net | params | conv layers | train error | test error | grad norm first/last layer "
        "at init | without BatchNorm: first/last, median over layers | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = results[name]
        g = r.get("grad_norms_at_init")
        g0 = r.get("grad_norms_at_init_no_bn")
        ratio = f"{g[0] / g[-1]:.3g}" if g else "not probed"
        no_bn = f"{g0[0] / g0[-1]:.3g}, {np.median(g0):.2e}" if g0 else "-"
        tr = r.get("train_errors", [r["train_error"]])
        te = r.get("test_errors", [r["test_error"]])
        lines.append(
            f"| {name} | {r['params']:,} | {r['conv_layers']} | {runs.pm(tr, 4)} | "
            f"{runs.pm(te, 4)} | {ratio} | {no_bn} | {r['runtime_s']:.0f} |"
        )
    lines.append("")
    for c in claims(results, cfg):
        lines.append(f"- {'pass' if c.holds else '**FAIL**'}: {c.claim}. {c.evidence}")
    probe = [
        "Gradient norms at initialisation (first seed, first batch, train-mode BatchNorm): "
        "the column 'first/last' is ||dL/dW|| of the stem conv over that of the last conv. A "
        "ratio far "
        "from 1 means the layers see very differently scaled gradients; with BatchNorm the "
        "deep plain net's gradient does not vanish towards the input but grows (explodes) "
        "layer by layer, while the skip connections keep it within a small factor. Either "
        "way, the deep plain net is hard to optimise; the residual one is not. The next "
        "column probes the same weights without normalisation (inference-mode BatchNorm at "
        "init is the identity): compare the median gradient norm of the plain nets across "
        "depths to see the gradient vanish with depth.",
        "",
    ]
    lines += [
        "",
        "He et al. (CIFAR-10, Fig. 6): plain-56 has a higher training error than plain-20; "
        "ResNet-56 a lower one than ResNet-20.",
        "",
        *(probe if cfg.grad_probe else []),
        "![training error](train_error.png)",
        "",
        *(["![gradient norms](grad_norms.png)", ""] if cfg.grad_probe else []),
        "![errors](errors.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
