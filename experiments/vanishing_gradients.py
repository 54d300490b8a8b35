"""Vanishing and exploding gradients, measured: ||dL/ds_k|| against lag for tanh RNN, LSTM, GRU.

The notes: with tanh, the BPTT gradient reaching step k is a product of T - k per-step
Jacobians; when they contract, the gradient vanishes and the network learns from recent
steps only; LSTM and GRU were built to fix that. Here, on the adding problem (many-to-one,
the loss reads the last step only, so dL/ds_k = (J_{T-1}...J_k)^T dL/ds_T exactly):

1. ||dL/ds_k|| against lag T - k for tanh RNN, LSTM and GRU (state: h, or (h, c) for the
   LSTM), at initialisation and after training, with the fitted log-slope per step.
2. A tanh RNN with W_hh rescaled to sigma_max in {0.5, 0.9, 1.0, 1.5}: the gradient and
   ||prod J||_2 curves against the Pascanu et al. (2013) bound
   ||dh_t/dh_k|| <= (sigma_max * max|tanh'|)^(t-k) = sigma_max^(t-k); the fitted slope of the
   log-norm curve must be <= log(sigma_max) where sigma_max < 1; the largest Lyapunov
   exponent of the Jacobian products.
3. Exploding: the sigma_max = 1.5 RNN trained by plain SGD without clipping spikes or
   diverges; with gradient-norm clipping at 1 (Pascanu et al.'s remedy) it does not.
   Spike, precisely: a NonFiniteError, or a per-step training loss above ``spike_factor``
   times the run's median loss.

Plots: the lag curves, the sigma sweep with its bounds, heat maps of the singular values of
every J_t over time, and the training losses with and without clipping.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import bptt, data, distributed, plots, runs, train
from jaxnets.models.readout import RecurrentReadout, readout_parts

TOUR_ORDER = 60
TOUR_SECONDS = 117  # its tour entry's wall time (2 jobs, 2 cores): longest start first
CELL_NAMES = ("rnn", "lstm", "gru")


@dataclasses.dataclass(frozen=True)
class Config:
    """Gradient-norm-versus-lag curves, the sigma_max sweep and the clipping test.

    Command line: ``python -m experiments.vanishing_gradients [--seq-len 50] [--train-steps 800]``
    Runtime: about 30 s of CPU (40 s wall on 2 shared cores; ``--quick``: about 15 s).
    Expected (seed 0): log-slopes per step at init -0.57 (tanh RNN), -0.50 (LSTM), -0.48
    (GRU); after 800 Adam steps the gated cells keep their gradient over all 50 steps
    (slopes about -0.01) while the RNN's still vanishes (-0.65); sigma_max = 0.5 / 0.9 give
    slopes -1.34 / -0.74 <= log(0.5) = -0.69 / log(0.9) = -0.11; sigma_max = 1.5 with SGD
    lr 0.3 diverges (NonFiniteError) without clipping and trains with clip_norm = 1.
    """

    seed: int = 0
    seeds: int = 3
    seq_len: int = 50
    hidden: int = 32
    batch_size: int = 64
    curve_batch: int = 128
    train_steps: int = 800
    lr: float = 3e-3
    sigmas: tuple[float, ...] = (0.5, 0.9, 1.0, 1.5)
    spike_sigma: float = 1.5
    spike_steps: int = 300
    spike_lr: float = 0.3
    clip_norm: float = 1.0
    spike_factor: float = 10.0


QUICK = {
    "seeds": 2,
    "seq_len": 20,
    "hidden": 8,
    "train_steps": 20,
    "curve_batch": 8,
    "sigmas": (0.5, 1.5),
    "spike_steps": 30,
}
TOUR = {"train_steps": 400}  # 3 seeds of each cell; the gradient claims hold at 400 steps


def readout_mse(outputs, final_state, kernel, bias, y):
    """MSE of the linear readout of the last output (module level: compiled once)."""
    pred = outputs[:, -1] @ kernel[:, 0] + bias[0]
    return jnp.mean(jnp.square(pred - y))


def _curves(model, params, x, y) -> dict:
    """||dL/ds_k|| (mean over the batch) against lag, and its fitted log-slope."""
    layer, lv, _ = readout_parts(model, params)
    head = params["head"]
    sg = bptt.state_gradients(
        layer, lv, x, readout_mse, loss_args=(head["kernel"], head["bias"], y)
    )
    curve = np.asarray(bptt.lag_curve(sg.state_grads)[0], np.float64)
    return {"grad_norm": curve.tolist(), "slope": bptt.log_slope(curve)}


def _jacobian_svals(model, params, x) -> np.ndarray:
    """Singular values of every J_t of example 0: (T, N) (the whole batch's Jacobians: the
    same compiled function as the sigma sweep's)."""
    layer, lv, _ = readout_parts(model, params)
    J = bptt.step_jacobians(layer, lv, x)
    return np.asarray(bptt.singular_values(J)[0, 0])


def _set_sigma(params, sigma: float):
    """Rescale W_hh of the RNN so that its largest singular value is ``sigma``."""
    W = params["rnn"]["l0"]["weight_hh"]
    W = W * (sigma / jnp.linalg.norm(W, ord=2))
    new = jax.tree.map(lambda a: a, params)
    new["rnn"]["l0"]["weight_hh"] = W
    return new


def _fit(
    cfg: Config,
    cell: str,
    sub: runs.RunDir,
    x_test,
    y_test,
    params0=None,
    *,
    optimizer,
    steps: int,
    log_every: int,
    seed: int | None = None,
    trainer: train.Trainer | None = None,
):
    """Train a RecurrentReadout on fresh adding batches; returns (state, history, error).
    Evaluates on (x_test, y_test) at the end unless x_test is None. ``seed`` (default
    ``cfg.seed``) picks the initialisation and the training batches; ``trainer`` (one per
    cell and optimizer) lets the seeds share one compiled step."""
    seed = cfg.seed if seed is None else seed
    model = RecurrentReadout(cell, cfg.hidden)
    if trainer is None:
        trainer = train.Trainer(model, train.mse_loss, optimizer)
    batch_fn = data.adding_batches(cfg.batch_size, cfg.seq_len, seed)
    state = trainer.init(jax.random.key(seed), batch_fn(0))
    if params0 is not None:
        state = state.replace(params=params0, opt_state=optimizer.init(params0))
    try:
        res = trainer.fit(
            state,
            batch_fn,
            steps,
            run_dir=sub,
            log_every=log_every,
            eval_batches=None
            if x_test is None
            else (lambda: data.eval_batches({"x": x_test, "y": y_test}, 256)),
            checkpoint_every=max(steps, 1),
            desc=sub.path.name,
        )
        return res.state, res.history, None
    except train.NonFiniteError as e:
        return None, sub.metrics(), e


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    T = cfg.seq_len
    x_np, y_np = data.adding_problem(cfg.curve_batch, T, seed=(cfg.seed, 1))
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    x_test, y_test = data.adding_problem(1000, T, seed=(cfg.seed, 3))
    out: dict = {"cells": {}, "sigmas": {}, "spikes": {}}
    svals: dict[str, np.ndarray] = {}

    # 1. the three cells at init and after training
    inits = {}  # one compiled init per cell, shared by its seeds (and the sigma sweep)
    for cell in CELL_NAMES:
        model = RecurrentReadout(cell, cfg.hidden)
        init = inits[cell] = jax.jit(model.init)
        params0 = init(jax.random.key(cfg.seed), x[:1])["params"]
        tx = train.make_optimizer("adam", cfg.lr, clip_norm=1.0)
        trainer = train.Trainer(model, train.mse_loss, tx)

        def one(sub, seed, cell=cell, model=model, tx=tx, trainer=trainer, init=init):
            state, history, err = _fit(
                cfg,
                cell,
                sub,
                x_test,
                y_test,
                optimizer=tx,
                steps=cfg.train_steps,
                log_every=max(cfg.train_steps // 20, 1),
                seed=seed,
                trainer=trainer,
            )
            if err is not None:
                raise err
            evals = [r for r in history if "eval_loss" in r]
            params_init = init(jax.random.key(seed), x[:1])["params"]
            return {
                "test_mse": evals[-1]["eval_loss"],
                "init_slope": _curves(model, params_init, x, y)["slope"],
                "curve": _curves(model, state.params, x, y),
                "svals": _jacobian_svals(model, state.params, x).tolist(),
            }

        per_seed = [
            run_dir.sub_run(
                f"train-{cell}" + (f"-s{k}" if k else ""),
                lambda sub, seed=cfg.seed + k: one(sub, seed),
            )
            for k in range(cfg.seeds)
        ]
        trained = per_seed[0]
        out["cells"][cell] = {
            "init": _curves(model, params0, x, y),
            "trained": trained["curve"],
            "test_mse": trained["test_mse"],
            "init_slope_seeds": [r["init_slope"] for r in per_seed],
            "trained_slope_seeds": [r["curve"]["slope"] for r in per_seed],
            "test_mse_seeds": [r["test_mse"] for r in per_seed],
        }
        svals[f"{cell} init"] = _jacobian_svals(model, params0, x)
        svals[f"{cell} trained"] = np.asarray(trained["svals"])

    # 2. the sigma_max sweep (tanh RNN at init)
    model = RecurrentReadout("rnn", cfg.hidden)
    base = inits["rnn"](jax.random.key(cfg.seed), x[:1])["params"]
    for sigma in cfg.sigmas:
        params = _set_sigma(base, sigma)
        c = _curves(model, params, x, y)
        layer, lv, _ = readout_parts(model, params)
        J = bptt.step_jacobians(layer, lv, x)
        logp = np.asarray(bptt.product_log_norms(J)[0], np.float64)  # (B, T+1)
        prod_curve = np.exp(logp.mean(axis=0))  # geometric mean over the batch
        lam = float(bptt.lyapunov_spectrum(J, 1)[0, :, 0].mean())
        out["sigmas"][str(sigma)] = {
            "sigma": sigma,
            "grad_norm": c["grad_norm"],
            "slope": c["slope"],
            "product_norm": prod_curve.tolist(),
            "product_slope": bptt.log_slope(prod_curve),
            "log_sigma": math.log(sigma),
            "slope_within_bound": bool(c["slope"] <= math.log(sigma)) if sigma < 1 else None,
            "lyapunov_max": lam,
        }
        svals[f"rnn sigma={sigma}"] = np.asarray(bptt.singular_values(J)[0, 0])

    # 3. exploding gradients: SGD without and with clipping
    spiky = _set_sigma(base, cfg.spike_sigma)
    for label, clip in (("no_clip", None), ("clip", cfg.clip_norm)):
        tx = train.make_optimizer("sgd", cfg.spike_lr, momentum=0.0, clip_norm=clip)
        spike_trainer = train.Trainer(RecurrentReadout("rnn", cfg.hidden), train.mse_loss, tx)

        def spike_run(sub, tx=tx, seed=cfg.seed, trainer=spike_trainer):
            _, history, err = _fit(
                cfg,
                "rnn",
                sub,
                None,
                None,
                spiky,
                optimizer=tx,
                steps=cfg.spike_steps,
                log_every=1,
                seed=seed,
                trainer=trainer,
            )
            recs = [r for r in history if "loss" in r and "event" not in r]
            losses = np.array([r["loss"] for r in recs])
            grads = np.array([r["grad_norm"] for r in recs])
            med = float(np.median(losses)) if len(losses) else float("nan")
            loss_ratio = float(losses.max() / med) if len(losses) else float("inf")
            return {
                "diverged": err is not None,
                "diverged_at": None if err is None else err.step,
                "steps_done": len(recs),
                "loss_max_over_median": loss_ratio,
                "grad_max_over_median": float(grads.max() / np.median(grads))
                if len(grads)
                else None,
                "final_loss": float(losses[-1]) if len(losses) else None,
                "spiked": bool(err is not None or loss_ratio > cfg.spike_factor),
            }

        # every seed starts from the same rescaled W_hh; the seed picks the batches
        per_seed = [
            run_dir.sub_run(
                f"spike-{label}" + (f"-s{k}" if k else ""),
                lambda sub, seed=cfg.seed + k, f=spike_run: f(sub, seed=seed),
            )
            for k in range(cfg.seeds)
        ]
        out["spikes"][label] = {
            **per_seed[0],
            "spiked_seeds": [r["spiked"] for r in per_seed],
            "loss_max_over_median_seeds": [r["loss_max_over_median"] for r in per_seed],
        }

    _plots(cfg, out, svals, run_dir)
    return out


def _plots(cfg: Config, out: dict, svals: dict, run_dir: runs.RunDir) -> None:
    import matplotlib.pyplot as plt

    lags = np.arange(cfg.seq_len + 1)
    curves = {}
    for cell, r in out["cells"].items():
        for when in ("init", "trained"):
            g = np.asarray(r[when]["grad_norm"])
            curves[f"{cell} {when}"] = g / g[0]
    plots.lines(
        lags,
        curves,
        run_dir.plot_path("lag_curves"),
        xlabel="lag T - k",
        ylabel="||dL/ds_k|| / ||dL/ds_T||",
        logy=True,
        title=f"Gradient reaching step k (adding problem, T={cfg.seq_len})",
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for i, (key, r) in enumerate(out["sigmas"].items()):
        color = f"C{i}"
        g = np.asarray(r["grad_norm"])
        ax.semilogy(lags, g / g[0], color=color, label=f"sigma_max={key}: ||dL/ds_k||")
        ax.semilogy(lags, r["product_norm"], color=color, ls="--", lw=1)
        ax.semilogy(lags, r["sigma"] ** lags.astype(float), color=color, ls=":", lw=1)
    ax.set_xlabel("lag T - k")
    ax.set_ylabel("norm (relative to lag 0)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-30))
    ax.set_title(
        "tanh RNN: solid ||dL/ds_k||, dashed ||prod J||_2, dotted bound sigma^lag", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if distributed.is_main():  # one writer in a multi-process run
        fig.savefig(run_dir.plot_path("sigma_sweep"), dpi=110)
    plt.close(fig)
    names = list(svals)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, layout="constrained"
    )
    for ax, name in zip(axes.flat, names, strict=False):
        s = np.log10(np.maximum(svals[name].T, 1e-12))
        im = ax.imshow(
            s, aspect="auto", origin="upper", cmap="magma", vmin=-4, vmax=1, interpolation="nearest"
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step t", fontsize=8)
        ax.set_ylabel("singular value #", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="log10 singular value of J_t", shrink=0.8)
    if distributed.is_main():  # one writer in a multi-process run
        fig.savefig(run_dir.plot_path("jacobian_singular_values"), dpi=100)
    plt.close(fig)
    recs = {label: run_dir.sub(f"spike-{label}").metrics() for label in out["spikes"]}
    plots.metric_curves(
        recs,
        run_dir.plot_path("spikes"),
        keys=("loss", "grad_norm"),
        logy=True,
        title=f"tanh RNN sigma_max={cfg.spike_sigma}, SGD lr={cfg.spike_lr}",
    )


TOPIC = "BPTT: vanishing gradients"


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """What the notes say about the product of Jacobians, measured (see the module doc)."""
    T = cfg.seq_len
    out = []
    rnn = results["cells"]["rnn"]
    inits = rnn.get("init_slope_seeds", [rnn["init"]["slope"]])
    worst = max(inits)
    out.append(runs.Claim(
        TOPIC, f"in a {cfg.hidden}-unit tanh RNN at initialisation the BPTT gradient ||dL/ds_k|| "
        f"shrinks with lag: over {T - 1} steps by more than 10x", math.exp(worst * (T - 1)) < 0.1,
        f"fitted log-slope per step {', '.join(f'{v:.3f}' for v in inits)} ({len(inits)} "
        f"seed(s)), i.e. at most {math.exp(worst * (T - 1)):.1e} of the gradient at lag 0 is "
        f"left at lag {T - 1}", len(inits)))  # fmt: skip
    bounded = [r for r in results["sigmas"].values() if r["slope_within_bound"] is not None]
    if bounded:
        out.append(runs.Claim(
            TOPIC, "Pascanu et al.'s bound: with sigma_max(W_hh) < 1 the gradient's log-slope "
            "per step is <= log sigma_max",
            all(r["slope_within_bound"] for r in bounded),
            "; ".join(f"sigma {r['sigma']}: slope {r['slope']:.3f} <= {r['log_sigma']:.3f}"
                      for r in bounded), None))  # fmt: skip
    n = min(3, len(rnn.get("trained_slope_seeds", [0])))
    for cell in ("lstm", "gru"):
        c = results["cells"].get(cell)
        if c is None or "trained_slope_seeds" not in c:
            continue
        holds, ev = runs.compare(c["trained_slope_seeds"], rnn["trained_slope_seeds"],
                                 names=(cell.upper(), "tanh RNN"), min_seeds=n)  # fmt: skip
        out.append(runs.Claim(
            TOPIC, f"after {cfg.train_steps} Adam steps on the adding problem (T = {T}) the "
            f"{cell.upper()}'s gradient decays less with lag than the tanh RNN's (log-slope per "
            "step, higher = keeps more)", holds, ev, len(c["trained_slope_seeds"])))  # fmt: skip
    sp = results["spikes"]
    if "spiked_seeds" in sp.get("no_clip", {}):
        no, yes = sp["no_clip"]["spiked_seeds"], sp["clip"]["spiked_seeds"]
        out.append(runs.Claim(
            TOPIC, f"exploding gradients (sigma_max = {cfg.spike_sigma}, SGD lr {cfg.spike_lr}): "
            f"without clipping training spikes or diverges in every seed, with clip-norm "
            f"{cfg.clip_norm} in none", all(no) and not any(yes),
            f"spiked without clipping {sum(no)}/{len(no)}, with clipping {sum(yes)}/{len(yes)}",
            len(no)))  # fmt: skip
    return out


def report(results: dict, run_dir: runs.RunDir) -> str:
    lines = [
        "**Gradient norm against lag** (fitted slope of log ||dL/ds_k|| per step; more "
        "negative = vanishes faster):",
        "",
        "| cell | slope at init | slope trained | test MSE trained (predict-1: 0.167) |",
        "|---|---|---|---|",
    ]
    for cell, r in results["cells"].items():
        lines.append(
            f"| {cell} | {r['init']['slope']:.3f} | {r['trained']['slope']:.3f} | "
            f"{r['test_mse']:.4f} |"
        )
    lines += [
        "",
        "**tanh RNN with sigma_max(W_hh) rescaled** (bar: slope <= log sigma_max for "
        "sigma_max < 1, the Pascanu bound):",
        "",
        "| sigma_max | log sigma_max | slope of ||dL/ds_k|| | slope of ||prod J|| | "
        "within bound | largest Lyapunov exp. |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["sigmas"].values():
        ok = {True: "yes", False: "**no**", None: "n/a"}[r["slope_within_bound"]]
        lines.append(
            f"| {r['sigma']} | {r['log_sigma']:.3f} | {r['slope']:.3f} | "
            f"{r['product_slope']:.3f} | {ok} | {r['lyapunov_max']:.3f} |"
        )
    lines += [
        "",
        "**Exploding gradients** (sigma_max = 1.5, SGD; spike = NonFiniteError or a step's "
        "loss > factor x median loss; bar: spikes without clipping, not with clipping):",
        "",
        "| run | diverged | max/median loss | max/median grad norm | spiked |",
        "|---|---|---|---|---|",
    ]
    for label, r in results["spikes"].items():
        div = f"yes (step {r['diverged_at']})" if r["diverged"] else "no"
        gm = r["grad_max_over_median"]
        lines.append(
            f"| {label} | {div} | {r['loss_max_over_median']:.3g} | "
            f"{'n/a' if gm is None else f'{gm:.3g}'} | {r['spiked']} |"
        )
    lines += [
        "",
        "![lag curves](lag_curves.png)",
        "",
        "![sigma sweep](sigma_sweep.png)",
        "",
        "![Jacobian singular values](jacobian_singular_values.png)",
        "",
        "![spikes](spikes.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
