"""Long memory: the adding problem at T = 100 and 200 (and the copy task), tanh RNN vs LSTM vs GRU.

The adding problem (Hochreiter & Schmidhuber 1997; the setting of Le et al. 2015): a
sequence of T pairs (u_t ~ U[0, 1], marker m_t), exactly two markers set, one in each half;
the target is the sum of the two marked values. Predicting 1 always gives MSE 1/6 = 0.167.
The answer depends on inputs up to T steps back, so BPTT must carry a gradient that far: the
tanh RNN's vanishes (see ``vanishing_gradients``) and it stays at the baseline (Le et al.
report failure beyond T ~ 150), while LSTM and GRU learn it.

The copy task (Arjovsky et al. 2016) at delay T = 50 is a second long-memory task: read 10
symbols, wait T steps, write them back. Outputting blanks and then guessing gives
cross-entropy 10 log 8 / (T + 20) = 0.297 per token.

Test error on 1000 fixed sequences per length, trained on fresh random batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import data, distributed, plots, runs, train
from jaxnets.bptt import flossing
from jaxnets.models.readout import RecurrentReadout

TOUR_ORDER = 61
BASELINE_MSE = 1.0 / 6.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Adding problem (T = 100, 200) and copy task (delay 50): tanh RNN vs LSTM vs GRU.

    Command line: ``python -m experiments.adding_problem [--lengths 100 200] [--steps 4000]``
    Runtime: about 6 minutes of CPU (8.5 min wall on 2 shared cores; the LSTM at T = 200,
    the longest run, about 100 s); ``--quick``: about 15 s. The tour's budget (800 steps,
    H = 32, about 1.5 min) is too small for the LSTM: the bars need the full one.
    Expected (seed 0, measured): test MSE T = 100: RNN 0.178, LSTM 0.0006, GRU 0.0001;
    T = 200: RNN 0.179, LSTM 0.0001, GRU 0.0001 (bars: LSTM and GRU < 0.01 at T = 100 and
    < 0.05 at T = 200 within 4000 steps; tanh RNN >= 0.15; predicting 1 gives 0.167). The
    LSTM sits on the 0.167 plateau for ~1000 (T = 100) / ~2000 (T = 200) steps first.
    Copy task, delay 50, 3000 steps: cross-entropy RNN 0.297 (= the memoryless baseline,
    copied symbols at chance 0.13), LSTM 0.289 (0.16), GRU 0.224 (0.34).
    ``--track-lyapunov`` logs the recurrent layer's leading Lyapunov exponent on 8 test
    sequences (``lyapunov_1`` in metrics.jsonl) at every eval. ``--tbptt K1 K2`` trains the recurrent layer by truncated BPTT(K1, K2) instead: with
    K2 < T / 2 no model can learn the adding problem.
    """

    seed: int = 0
    lengths: tuple[int, ...] = (100, 200)
    cells: tuple[str, ...] = ("rnn", "lstm", "gru")
    hidden: int = 64
    batch_size: int = 64
    steps: int = 4000
    lr: float = 3e-3
    clip_norm: float = 1.0
    lstm_forget_bias: float = 1.0
    n_test: int = 1000
    eval_every: int = 500
    tbptt: tuple[int, ...] = ()
    copy_delay: int = 50
    copy_steps: int = 3000
    copy_length: int = 10
    track_lyapunov: bool = False


QUICK = {
    "lengths": (20,),
    "cells": ("rnn", "lstm"),
    "hidden": 8,
    "steps": 20,
    "n_test": 100,
    "eval_every": 20,
    "copy_delay": 5,
    "copy_steps": 10,
}
TOUR = {"lengths": (100, 200), "hidden": 32, "steps": 800, "eval_every": 200, "copy_steps": 300}


def one_hot_copy(n: int, delay: int, seed, copy_length: int) -> dict:
    """Copy-task batch with one-hot inputs: x (n, T + 2S, 10) float32, y (n, T + 2S) int."""
    x, y = data.copy_task(n, delay, seed=seed, copy_length=copy_length)
    return {"x": np.eye(10, dtype=np.float32)[x], "y": y}


def copy_loss(copy_length: int):
    """Per-token cross-entropy (eval mask broadcast over tokens) + accuracy on the copied
    symbols (the last ``copy_length`` steps)."""

    def loss_fn(logits, batch):
        y = batch["y"]
        mask = batch.get("mask")
        w = None if mask is None else jnp.broadcast_to(mask[:, None], y.shape).astype(jnp.float32)
        loss, _ = train.cross_entropy(logits, y, w)
        tail = None if w is None else w[:, -copy_length:]
        _, acc = train.cross_entropy(logits[:, -copy_length:], y[:, -copy_length:], tail)
        return loss, {"copy_accuracy": acc}

    return loss_fn


def init_state(trainer: train.Trainer, cfg: Config, batch: dict) -> train.TrainState:
    """Initial state; an LSTM's forget-gate bias starts at ``cfg.lstm_forget_bias``
    (Gers et al. 2000, Jozefowicz et al. 2015) instead of PyTorch's U(-1/sqrt(H), 1/sqrt(H))
    draw: with gates i, f, g, o stacked, b_ih[H:2H] += value."""
    state = trainer.init(jax.random.key(cfg.seed), batch)
    if trainer.model.cell != "lstm" or not cfg.lstm_forget_bias:
        return state
    params = jax.tree.map(lambda a: a, state.params)
    H = trainer.model.hidden
    b = params["rnn"]["l0"]["bias_ih"]
    params["rnn"]["l0"]["bias_ih"] = b.at[H : 2 * H].add(cfg.lstm_forget_bias)
    return state.replace(params=params, opt_state=trainer.tx.init(params))


def _tbptt(cfg: Config):
    if not cfg.tbptt:
        return None
    if len(cfg.tbptt) != 2:
        raise ValueError(f"tbptt: expected two ints K1 K2, got {cfg.tbptt!r}")
    return int(cfg.tbptt[0]), int(cfg.tbptt[1])


def _lyapunov_hook(cfg: Config, model: RecurrentReadout, x):
    if not cfg.track_lyapunov:
        return None
    x = np.asarray(x[:8], np.float32)
    return flossing.lyapunov_hook(model.recurrent_layer(), x, 1, burn_in=x.shape[1] // 4)


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    results: dict = {}
    tbptt = _tbptt(cfg)
    tx = train.make_optimizer("adam", cfg.lr, clip_norm=cfg.clip_norm)
    for T in cfg.lengths:
        x_test, y_test = data.adding_problem(cfg.n_test, T, seed=(cfg.seed, 1))
        test = {"x": x_test, "y": y_test}
        results[f"T{T}"] = {}
        for cell in cfg.cells:
            model = RecurrentReadout(cell, cfg.hidden, tbptt=tbptt)

            def one(sub, model=model, T=T, test=test):
                trainer = train.Trainer(model, train.mse_loss, tx)
                batch_fn = data.adding_batches(cfg.batch_size, T, cfg.seed)
                state = init_state(trainer, cfg, batch_fn(0))
                res = trainer.fit(
                    state,
                    batch_fn,
                    cfg.steps,
                    run_dir=sub,
                    eval_batches=lambda: data.eval_batches(test, 250),
                    eval_every=cfg.eval_every,
                    log_every=max(cfg.eval_every // 5, 1),
                    checkpoint_every=cfg.eval_every,
                    desc=f"adding T={T} {model.cell}",
                    eval_hook=_lyapunov_hook(cfg, model, test["x"]),
                )
                return {"test_mse": res.eval["loss"]}

            results[f"T{T}"][cell] = run_dir.sub_run(f"T{T}-{cell}", one)["test_mse"]
    if cfg.copy_steps > 0:
        results[f"copy{cfg.copy_delay}"] = _copy_task(cfg, run_dir, tx, tbptt)
    _plots(cfg, results, run_dir)
    return results


def _copy_task(cfg: Config, run_dir: runs.RunDir, tx, tbptt) -> dict:
    S, delay = cfg.copy_length, cfg.copy_delay
    test = one_hot_copy(cfg.n_test, delay, (cfg.seed, 1), S)
    out = {}
    for cell in cfg.cells:
        model = RecurrentReadout(cell, cfg.hidden, out=10, every_step=True, tbptt=tbptt)

        def one(sub, model=model):
            trainer = train.Trainer(model, copy_loss(S), tx)

            def batch_fn(step):
                return one_hot_copy(cfg.batch_size, delay, (cfg.seed, 2, step), S)

            state = init_state(trainer, cfg, batch_fn(0))
            res = trainer.fit(
                state,
                batch_fn,
                cfg.copy_steps,
                run_dir=sub,
                eval_batches=lambda: data.eval_batches(test, 250),
                eval_every=cfg.eval_every,
                log_every=max(cfg.eval_every // 5, 1),
                checkpoint_every=cfg.eval_every,
                desc=f"copy T={delay} {model.cell}",
                eval_hook=_lyapunov_hook(cfg, model, test["x"]),
            )
            return {"test_ce": res.eval["loss"], "copy_accuracy": res.eval["copy_accuracy"]}

        out[cell] = run_dir.sub_run(f"copy{delay}-{cell}", one)
    out["baseline_ce"] = data.copy_task_baseline(delay, S)
    return out


def _plots(cfg: Config, results: dict, run_dir: runs.RunDir) -> None:
    import matplotlib.pyplot as plt

    Ts = [f"T{T}" for T in cfg.lengths]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    width = 0.8 / len(cfg.cells)
    for i, cell in enumerate(cfg.cells):
        vals = [results[t][cell] for t in Ts]
        ax.bar(np.arange(len(Ts)) + (i - (len(cfg.cells) - 1) / 2) * width, vals, width, label=cell)
    ax.axhline(BASELINE_MSE, color="k", ls="--", lw=1, label="predict 1 (0.167)")
    ax.axhline(0.01, color="gray", ls=":", lw=1, label="bar 0.01 (T=100)")
    ax.set_xticks(np.arange(len(Ts)), Ts)
    ax.set_yscale("log")
    ax.set_ylabel("test MSE (1000 sequences)")
    ax.set_title("Adding problem")
    ax.legend(fontsize=8)
    if distributed.is_main():  # one writer in a multi-process run
        fig.savefig(run_dir.plot_path("adding_mse"), dpi=110)
    plt.close(fig)
    for T in cfg.lengths:
        recs = {cell: run_dir.sub(f"T{T}-{cell}").metrics() for cell in cfg.cells}
        plots.metric_curves(
            recs,
            run_dir.plot_path(f"adding_T{T}_curves"),
            keys=("loss", "eval_loss"),
            logy=True,
            title=f"Adding problem T={T}: MSE (predict-1 baseline 0.167)",
        )
    key = f"copy{cfg.copy_delay}"
    if key in results:
        recs = {cell: run_dir.sub(f"{key}-{cell}").metrics() for cell in cfg.cells}
        plots.metric_curves(
            recs,
            run_dir.plot_path("copy_curves"),
            keys=("loss", "eval_loss", "eval_copy_accuracy"),
            title=f"Copy task, delay {cfg.copy_delay} (baseline CE "
            f"{results[key]['baseline_ce']:.3f})",
        )


def _bar(T: int, cell: str, mse: float) -> tuple[str, bool | None]:
    if cell == "rnn":
        return ">= 0.15", mse >= 0.15
    if T == 100:
        return "< 0.01", mse < 0.01
    if T == 200:
        return "< 0.05", mse < 0.05
    return "", None


def report(results: dict, run_dir: runs.RunDir) -> str:
    cfg = runs.read_json(run_dir.config_path) if run_dir.config_path.exists() else {}
    lines = [
        f"Budget: {cfg.get('steps', '?')} steps of batch {cfg.get('batch_size', '?')}, "
        f"hidden {cfg.get('hidden', '?')}, Adam lr {cfg.get('lr', '?')}, clip "
        f"{cfg.get('clip_norm', '?')}, LSTM forget bias {cfg.get('lstm_forget_bias', '?')}"
        + (f", truncated BPTT {cfg['tbptt']}" if cfg.get("tbptt") else "")
        + " (the bars assume the full 4000-step budget).",
        "",
        "| T | cell | test MSE | bar | met |",
        "|---|---|---|---|---|",
    ]
    for key, per in results.items():
        if not key.startswith("T"):
            continue
        T = int(key[1:])
        for cell, mse in per.items():
            bar, ok = _bar(T, cell, mse)
            met = "" if ok is None else ("yes" if ok else "**no**")
            lines.append(f"| {T} | {cell} | {mse:.4f} | {bar} | {met} |")
    lines += ["", f"Predicting 1 always: {BASELINE_MSE:.3f}.", "", "![adding MSE](adding_mse.png)"]
    for key in results:
        if key.startswith("T"):
            lines += ["", f"![{key} curves](adding_{key}_curves.png)"]
    copy = [k for k in results if k.startswith("copy")]
    if copy:
        c = results[copy[0]]
        lines += [
            "",
            f"**Copy task, delay {copy[0][4:]}** (memoryless baseline cross-entropy "
            f"{c['baseline_ce']:.3f}; chance on the copied symbols 0.125):",
            "",
            "| cell | test cross-entropy | accuracy on copied symbols |",
            "|---|---|---|",
        ]
        for cell, r in c.items():
            if cell != "baseline_ce":
                lines.append(f"| {cell} | {r['test_ce']:.4f} | {r['copy_accuracy']:.3f} |")
        lines += ["", "![copy curves](copy_curves.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
