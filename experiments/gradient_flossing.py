"""Gradient flossing: pushing the tanh RNN's Lyapunov exponents to 0 extends the delays BPTT can bridge.

Engelken (NeurIPS 2023, "Gradient flossing"): before training ("preflossing") and now and
then during it ("interflossing"), gradient descent on sum_i (lambda_i - 0)^2 over the top
k Lyapunov exponents of the network's own trajectory (`jaxnets.bptt.flossing`). Tasks (the
paper's): a stream of random bits s_t in {0, 1}, one per step; delayed copy y_t = s_{t-d}
(scored for t >= d), delayed XOR y_t = s_{t-d} XOR s_{t-2d} (scored for t >= 2d); binary
cross-entropy of one logit per step. Arms: plain tanh RNN; preflossing; preflossing +
interflossing (all three from the same initial weights and data per seed); GRU and LSTM of
the same width. Every arm: the same Adam, learning rate, clipping, step budget and batches.
The seeds of one (task, delay, arm) train side by side as one vmapped program.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import bptt, plots, runs, train
from jaxnets.bptt import flossing
from jaxnets.models.readout import RecurrentReadout, readout_parts

TOUR_ORDER = 62
TOUR_SECONDS = 108  # its tour entry's wall time (2 jobs, 2 cores): longest start first
ARMS = ("plain", "preflossing", "pre_inter", "gru", "lstm")
RNN_ARMS = ("plain", "preflossing", "pre_inter")
TASKS = ("copy", "xor")


@dataclasses.dataclass(frozen=True)
class Config:
    """Delayed copy and delayed XOR at several delays, 5 arms x `seeds` seeds.

    Command line: ``python -m experiments.gradient_flossing [--steps N] [--copy-delays ...]``
    Model: one-layer tanh RNN with ``hidden`` = 80 units (the paper's N), W_hh ~ N(0, g^2/N)
    with g = 1, W_ih ~ N(0, 1), b_ih ~ U(0, 0.1), b_hh = 0 (the paper's initialisation),
    linear readout of h_t; GRU and LSTM (forget bias + 1) with PyTorch's initialisation.
    Training: Adam ``lr``, global-norm clip ``clip_norm``, batch 16 of fresh sequences of
    ``seq_len`` steps per update, ``steps`` updates. Success: test accuracy on the scored
    steps of ``n_test`` fixed sequences >= ``threshold`` at the end of training (chance 0.5).
    Flossing: top ``floss_k`` exponents to ``floss_target`` on ``floss_batch`` sequences of
    ``floss_len`` steps (first ``floss_burn_in`` left out), QR every ``floss_qr_every``
    steps, Adam ``floss_lr``; ``pre_steps`` updates before training, and in the pre_inter
    arm ``inter_steps`` updates every ``inter_every`` steps, at most ``inter_times`` times.
    Runtime: 60.8 min wall on 2 cores shared with other full runs (1938 s of CPU);
    ``--quick`` about 1 min.
    Expected (measured, successes of 5): copy d = 10/20/30/40: plain 5/3/0/0, preflossing
    and pre_inter 5/5/5/5, GRU 5/0/0/0, LSTM 5/0/0/0; XOR d = 5/10/15: plain 5/1/0,
    preflossing and pre_inter 5/5/5, GRU 5/0/0, LSTM 4/0/0. After the 1500 preflossing
    updates all top 40 exponents are within 0.046 of 0 over every seed, task and delay
    (with 500 updates: 0.067). Table and figures:
    the README section "Gradient flossing".
    """

    seed: int = 0
    seeds: int = 5
    tasks: tuple[str, ...] = TASKS
    copy_delays: tuple[int, ...] = (10, 20, 30, 40)
    xor_delays: tuple[int, ...] = (5, 10, 15)
    arms: tuple[str, ...] = ARMS
    hidden: int = 80
    g: float = 1.0
    batch_size: int = 16
    seq_len: int = 100
    steps: int = 1000
    lr: float = 1e-3
    clip_norm: float = 1.0
    threshold: float = 0.9
    n_test: int = 256
    eval_every: int = 250
    floss_k: int = 40
    floss_target: float = 0.0
    floss_qr_every: int = 3
    floss_len: int = 60
    floss_burn_in: int = 10
    floss_batch: int = 1
    floss_lr: float = 1e-3
    pre_steps: int = 1500
    inter_every: int = 250
    inter_steps: int = 100
    inter_times: int = 3
    track_lyapunov: bool = True
    track_k: int = 3
    spectrum_k: int = 40
    figure_task: str = "copy"
    figure_delay: int = 30


QUICK = {
    "seeds": 2,
    "arms": ("plain", "pre_inter", "lstm"),
    "copy_delays": (3,),
    "xor_delays": (2,),
    "hidden": 8,
    "seq_len": 16,
    "steps": 20,
    "n_test": 16,
    "eval_every": 10,
    "floss_k": 4,
    "floss_len": 12,
    "floss_burn_in": 2,
    "pre_steps": 10,
    "inter_every": 10,
    "inter_steps": 5,
    "track_k": 2,
    "spectrum_k": 4,
}
# The tour: copy d = 20 at H = 32; flossing at Adam 1e-2 on 4 sequences per update
# brings the top 16 exponents within 0.05 of 0 in 300 updates (81 s CPU).
TOUR = {
    "seeds": 5,
    "tasks": ("copy",),
    "copy_delays": (20,),
    "arms": ("plain", "pre_inter", "gru"),
    "hidden": 32,
    "seq_len": 60,
    "steps": 600,
    "eval_every": 200,
    "floss_k": 16,
    "floss_len": 40,
    "floss_batch": 4,
    "floss_lr": 1e-2,
    "pre_steps": 300,
    "inter_every": 200,
    "inter_steps": 50,
    "spectrum_k": 16,
}


# ---------------------------------------------------------------------------------------
# Tasks (generated on the device from (key, step): a resumed run sees the same data)
# ---------------------------------------------------------------------------------------


def task_batch(key, n: int, T: int, delay, xor) -> dict:
    """Bits x (n, T, 1) in {0, 1}; targets y (n, T); mask (n, T) of the scored steps.

    copy: y_t = s_{t-d} for t >= d; xor: y_t = s_{t-d} XOR s_{t-2d} for t >= 2d. ``delay``
    and ``xor`` may be traced (one compiled program for every delay and both tasks)."""
    s = jax.random.bernoulli(key, 0.5, (n, T)).astype(jnp.float32)
    t = jnp.arange(T)
    back1 = jnp.take(s, jnp.clip(t - delay, 0, T - 1), axis=1)
    back2 = jnp.take(s, jnp.clip(t - 2 * delay, 0, T - 1), axis=1)
    y = jnp.where(xor, jnp.abs(back1 - back2), back1)
    start = jnp.where(xor, 2 * delay, delay)
    mask = jnp.broadcast_to((t >= start)[None, :], (n, T)).astype(jnp.float32)
    return {"x": s[..., None], "y": y, "mask": mask}


def check_config(cfg: Config) -> None:
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad:
        raise ValueError(f"arms: expected names from {ARMS}, got {bad}")
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad:
        raise ValueError(f"tasks: expected names from {TASKS}, got {bad}")
    for task in cfg.tasks:
        for d in delays(cfg, task):
            start = 2 * d if task == "xor" else d
            if d < 1 or start >= cfg.seq_len:
                raise ValueError(
                    f"{task}_delays: delay {d} leaves no scored step in seq_len={cfg.seq_len} "
                    f"(scoring starts at {start})"
                )
    if cfg.seeds < 1:
        raise ValueError(f"seeds: expected >= 1, got {cfg.seeds}")
    for name in ("floss_k", "spectrum_k", "track_k"):
        k = getattr(cfg, name)
        if not 1 <= k <= cfg.hidden:
            raise ValueError(f"{name}: expected 1..{cfg.hidden} (hidden), got {k}")
    if cfg.eval_every < 1 or cfg.steps < 1:
        raise ValueError(f"steps, eval_every: expected >= 1, got {cfg.steps}, {cfg.eval_every}")
    flossing_cfg(cfg)  # its own checks


def delays(cfg: Config, task: str) -> tuple[int, ...]:
    return tuple(cfg.copy_delays if task == "copy" else cfg.xor_delays)


def flossing_cfg(cfg: Config, arm: str = "pre_inter") -> flossing.Flossing:
    inter = arm == "pre_inter"
    return flossing.Flossing(
        k=cfg.floss_k,
        target=cfg.floss_target,
        qr_every=cfg.floss_qr_every,
        burn_in=cfg.floss_burn_in,
        lr=cfg.floss_lr,
        pre_steps=cfg.pre_steps,
        inter_every=cfg.inter_every if inter else 0,
        inter_steps=cfg.inter_steps if inter else 0,
        inter_times=cfg.inter_times if inter else 0,
    )


# ---------------------------------------------------------------------------------------
# Model, initialisation, loss
# ---------------------------------------------------------------------------------------


def model_for(cfg: Config, arm: str) -> RecurrentReadout:
    cell = arm if arm in ("gru", "lstm") else "rnn"
    return RecurrentReadout(cell, cfg.hidden, out=0, every_step=True)


def init_params(cfg: Config, arm: str, key) -> dict:
    """One member's parameters. The three RNN arms get identical ones per seed."""
    model = model_for(cfg, arm)
    params = model.init(key, jnp.zeros((1, 2, 1)))["params"]
    params = jax.tree.map(lambda a: a, params)
    H = cfg.hidden
    l0 = dict(params["rnn"]["l0"])
    if arm in RNN_ARMS:
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 7), 3)
        l0["weight_hh"] = cfg.g * jax.random.normal(k1, (H, H)) / math.sqrt(H)
        l0["weight_ih"] = jax.random.normal(k2, (H, 1))
        l0["bias_ih"] = jax.random.uniform(k3, (H,), maxval=0.1)
        l0["bias_hh"] = jnp.zeros((H,))
    elif arm == "lstm":
        l0["bias_ih"] = l0["bias_ih"].at[H : 2 * H].add(1.0)
    params["rnn"] = {"l0": l0}
    return params


def task_loss(model, params, batch) -> tuple[jax.Array, dict]:
    logits = model.apply({"params": params}, batch["x"])
    w = batch["mask"]
    ce = optax.sigmoid_binary_cross_entropy(logits, batch["y"])
    correct = ((logits > 0).astype(jnp.float32) == batch["y"]).astype(jnp.float32)
    total = jnp.maximum(w.sum(), 1.0)
    return (ce * w).sum() / total, {"accuracy": (correct * w).sum() / total}


# ---------------------------------------------------------------------------------------
# One (task, delay, arm): every seed as one vmapped program
# ---------------------------------------------------------------------------------------


class Programs:
    """The compiled pieces for one arm, shared by every delay and task (delay and task are
    traced arguments, the shapes are fixed by the config)."""

    def __init__(self, cfg: Config, arm: str):
        self.cfg, self.arm = cfg, arm
        self.model = model_for(cfg, arm)
        self.layer = self.model.recurrent_layer()
        self.tx = train.make_optimizer("adam", cfg.lr, clip_norm=cfg.clip_norm)
        fl = flossing_cfg(cfg, arm)
        self.floss_cfg = fl
        model, tx = self.model, self.tx

        def train_steps(params, opt, key, start, delay, xor, n):
            def body(carry, step):
                p, o = carry
                b = task_batch(jax.random.fold_in(key, step), cfg.batch_size, cfg.seq_len,
                               delay, xor)  # fmt: skip
                (loss, m), g = jax.value_and_grad(lambda q: task_loss(model, q, b), has_aux=True)(p)
                u, o = tx.update(g, o, p)
                return (optax.apply_updates(p, u), o), {
                    "loss": loss,
                    "accuracy": m["accuracy"],
                    "grad_norm": optax.tree.norm(g),
                }

            (params, opt), ms = jax.lax.scan(body, (params, opt), start + jnp.arange(n))
            return params, opt, jax.tree.map(jnp.mean, ms)

        self.train = jax.jit(
            jax.vmap(train_steps, in_axes=(0, 0, 0, None, None, None, None)),
            static_argnums=6,
            donate_argnums=(0, 1),
        )
        step = flossing.floss_step(self.layer, fl)

        def floss_steps(params, fopt, key, start, n):
            def body(carry, i):
                p, o = carry
                b = task_batch(jax.random.fold_in(key, i), cfg.floss_batch, cfg.floss_len, 1,
                               False)  # fmt: skip
                rnn_p, o, loss, lam = step(p["rnn"], o, b["x"])
                return ({**p, "rnn": rnn_p}, o), loss

            (params, fopt), losses = jax.lax.scan(body, (params, fopt), start + jnp.arange(n))
            return params, fopt, losses

        self.floss = jax.jit(jax.vmap(floss_steps, in_axes=(0, 0, 0, None, None)), static_argnums=4)

        def evaluate(params, test):
            loss, m = task_loss(model, params, test)
            return {"loss": loss, "accuracy": m["accuracy"]}

        self.evaluate = jax.jit(jax.vmap(evaluate, in_axes=(0, None)))

    def exponents(self, params, x, k: int, burn_in: int):
        """(members, k) exponents of the recurrent layer on x (B, T, 1), batch-averaged."""
        return _exponents(self.layer, params["rnn"], x, k, burn_in)


def _exponents(layer, rnn_params, x, k, burn_in):
    f = jax.vmap(
        lambda p: flossing.lyapunov_exponents(layer, {"params": p}, x, k, burn_in=burn_in).mean(0)
    )
    return np.asarray(jax.device_get(f(rnn_params)))


_PROGRAMS: dict = {}


def programs(cfg: Config, arm: str) -> Programs:
    key = (cfg, arm)
    if key not in _PROGRAMS:
        _PROGRAMS.clear() if len(_PROGRAMS) > 8 else None
        _PROGRAMS[key] = Programs(cfg, arm)
    return _PROGRAMS[key]


def member_keys(cfg: Config, salt: int):
    return jax.vmap(lambda m: jax.random.fold_in(jax.random.key(cfg.seed), 1000 * m + salt))(
        jnp.arange(cfg.seeds)
    )


def test_set(cfg: Config, task: str, delay: int) -> dict:
    key = jax.random.fold_in(jax.random.key(cfg.seed + 10_000), 97 * delay + (task == "xor"))
    return task_batch(key, cfg.n_test, cfg.seq_len, delay, task == "xor")


def spectrum_batch(cfg: Config) -> tuple[jax.Array, int]:
    """Sequences on which exponents are reported: 8 task-input streams of seq_len steps,
    the first quarter left out."""
    b = task_batch(jax.random.key(cfg.seed + 20_000), 8, cfg.seq_len, 1, False)
    return b["x"], cfg.seq_len // 4


def train_arm(cfg: Config, task: str, delay: int, arm: str, sub: runs.RunDir) -> dict:
    """Train every seed of one arm at one (task, delay); log to ``sub``/metrics.jsonl."""
    if sub.metrics_path.exists():  # an interrupted sub-run restarts from scratch
        sub.metrics_path.unlink()
    pr = programs(cfg, arm)
    xor = task == "xor"
    init_keys = member_keys(cfg, 1)  # same init for every RNN arm, task and delay
    data_keys = member_keys(cfg, 2 + 17 * delay + 5 * xor)  # same batches for every arm
    floss_keys = member_keys(cfg, 3 + 17 * delay + 5 * xor)
    params = jax.jit(jax.vmap(lambda k: init_params(cfg, arm, k)))(init_keys)
    opt = jax.vmap(pr.tx.init)(params)
    test = test_set(cfg, task, delay)
    sx, s_burn = spectrum_batch(cfg)
    is_rnn = arm in RNN_ARMS
    episodes = dict(pr.floss_cfg.episodes(cfg.steps)) if arm in ("preflossing", "pre_inter") else {}
    out: dict = {"params_per_member": train.count_params(params) // cfg.seeds}
    if is_rnn:
        out["exponents_init"] = pr.exponents(params, sx, cfg.spectrum_k, s_burn).tolist()
    fopt = jax.vmap(pr.floss_cfg.tx().init)(params["rnn"]) if episodes else None
    floss_done = 0
    chunk = math.gcd(cfg.eval_every, cfg.inter_every) if cfg.inter_every else cfg.eval_every

    def log_eval(step, extra=None):
        m = jax.device_get(pr.evaluate(params, test))
        rec = {"step": step, "eval_accuracy": float(np.mean(m["accuracy"])),
               "eval_loss": float(np.mean(m["loss"]))}  # fmt: skip
        for i, a in enumerate(np.asarray(m["accuracy"])):
            rec[f"eval_accuracy_{i}"] = float(a)
        if cfg.track_lyapunov:
            lam = pr.exponents(params, sx, cfg.track_k, s_burn)
            for i in range(cfg.track_k):
                rec[f"lyapunov_{i + 1}"] = float(lam[:, i].mean())
            rec["lyapunov_1_members"] = lam[:, 0].tolist()
        rec.update(extra or {})
        sub.log(rec)
        return m

    log_eval(0)
    step = 0
    while step < cfg.steps:
        if step in episodes:
            n = episodes[step]
            params, fopt, losses = pr.floss(params, fopt, floss_keys, floss_done, n)
            floss_done += n
            losses = np.asarray(jax.device_get(losses))
            rec = {"step": step, "event": "preflossing" if step == 0 else "interflossing",
                   "floss_loss_first": float(losses[:, 0].mean()),
                   "floss_loss_last": float(losses[:, -1].mean())}  # fmt: skip
            if step == 0:
                lam = pr.exponents(params, sx, cfg.spectrum_k, s_burn)
                out["exponents_after_preflossing"] = lam.tolist()
                rec["max_abs_exponent_after"] = float(np.abs(lam[:, : cfg.floss_k]).max())
            sub.log(rec)
            if step == 0:
                log_eval(0, {"after": "preflossing"})
        n = min(chunk, cfg.steps - step)
        params, opt, ms = pr.train(params, opt, data_keys, step, delay, xor, n)
        step += n
        ms = jax.device_get(ms)
        if not np.all(np.isfinite(ms["loss"])):
            raise train.NonFiniteError(step, {"loss": ms["loss"].tolist()}, None)
        sub.log({"step": step, "loss": float(np.mean(ms["loss"])),
                 "accuracy": float(np.mean(ms["accuracy"])),
                 "grad_norm": float(np.mean(ms["grad_norm"]))})  # fmt: skip
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = log_eval(step)
    acc = np.asarray(m["accuracy"])
    out["test_accuracy"] = acc.tolist()
    out["success"] = [bool(a >= cfg.threshold) for a in acc]
    out["successes"] = int(sum(out["success"]))
    if is_rnn:
        out["exponents_after_training"] = pr.exponents(params, sx, cfg.spectrum_k, s_burn).tolist()
    if task == cfg.figure_task and delay == _figure_delay(cfg) and is_rnn:
        out["lag_curves"] = _lag_curves(cfg, arm, task, delay, params, init_keys)
    return out


def _figure_delay(cfg: Config) -> int:
    """``figure_delay`` if the figure task runs it, else that task's longest delay."""
    ds = delays(cfg, cfg.figure_task) if cfg.figure_task in cfg.tasks else ()
    return cfg.figure_delay if cfg.figure_delay in ds else max(ds or (0,))


def _member0(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _lag_curve(cfg, model, params, batch) -> list[float]:
    """||dL/dh_{T-lag}|| (batch mean) of the task loss, seed 0, lag 0..T."""
    layer, lv, _ = readout_parts(model, params)
    res = bptt.state_gradients(
        layer, lv, batch["x"], _lag_loss,
        loss_args=(params["head"]["kernel"], params["head"]["bias"], batch["y"], batch["mask"]),
    )  # fmt: skip
    return np.asarray(bptt.lag_curve(res.state_grads)[0]).tolist()


def _lag_loss(outputs, final, kernel, bias, y, mask):
    logits = (outputs @ kernel)[..., 0] + bias[0]
    ce = optax.sigmoid_binary_cross_entropy(logits, y)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _lag_curves(cfg, arm, task, delay, params, init_keys) -> dict:
    pr = programs(cfg, arm)
    test = test_set(cfg, task, delay)
    batch = {k: v[:16] for k, v in test.items()}
    p0 = _member0(jax.vmap(lambda k: init_params(cfg, arm, k))(init_keys))
    out = {"init": _lag_curve(cfg, pr.model, p0, batch)}
    if arm != "plain":
        fl = flossing_cfg(cfg, arm)
        key = member_keys(cfg, 3 + 17 * delay + 5 * (task == "xor"))
        p1, _, _ = pr.floss(
            jax.tree.map(lambda a: a[None], p0), jax.vmap(fl.tx().init)(
                jax.tree.map(lambda a: a[None], p0["rnn"])), key[:1], 0, cfg.pre_steps
        )  # fmt: skip
        out["after_preflossing"] = _lag_curve(cfg, pr.model, _member0(p1), batch)
    out["after_training"] = _lag_curve(cfg, pr.model, _member0(params), batch)
    return out


# ---------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------


def run(cfg: Config, run_dir: runs.RunDir) -> dict:
    check_config(cfg)
    per: dict = {}
    for task in cfg.tasks:
        per[task] = {}
        for d in delays(cfg, task):
            for arm in cfg.arms:
                name = f"{task}-d{d}-{arm}"
                per[task][(arm, d)] = run_dir.sub_run(
                    name, lambda sub, task=task, d=d, arm=arm: train_arm(cfg, task, d, arm, sub)
                )
    results = {"tasks": {}, "config": {"threshold": cfg.threshold, "steps": cfg.steps}}
    for task in cfg.tasks:
        ds = list(delays(cfg, task))
        entry: dict = {"delays": ds, "seeds": cfg.seeds}
        for arm in cfg.arms:
            entry[arm] = [per[task][(arm, d)]["successes"] for d in ds]
            entry[f"{arm}_accuracy"] = [per[task][(arm, d)]["test_accuracy"] for d in ds]
        results["tasks"][task] = entry
    results["exponents"] = _exponent_summary(cfg, per)
    results["bar"] = bar_checks(results, cfg)
    _plots(cfg, per, results, run_dir)
    return results


def _exponent_summary(cfg: Config, per: dict) -> dict:
    """Exponents (seed 0, top spectrum_k) of the pre_inter arm at the figure (task, delay):
    at init, after preflossing, after training; plus the worst |lambda_i - target| over
    i <= floss_k after preflossing across every seed, task and delay."""
    task, d = cfg.figure_task, _figure_delay(cfg)
    out: dict = {"target": cfg.floss_target, "k": cfg.floss_k, "task": task, "delay": d}
    arm = "pre_inter" if "pre_inter" in cfg.arms else "preflossing"
    r = per.get(task, {}).get((arm, d))
    if r is None:
        return out
    out["init"] = r["exponents_init"][0]
    out["after_preflossing"] = r["exponents_after_preflossing"][0]
    out["after_training"] = r["exponents_after_training"][0]
    worst = [
        float(np.max(np.abs(np.asarray(v["exponents_after_preflossing"])[:, : cfg.floss_k]
                            - cfg.floss_target)))
        for t in per.values() for (a, _), v in t.items() if "exponents_after_preflossing" in v
    ]  # fmt: skip
    out["max_abs_deviation_after_preflossing"] = max(worst)
    return out


def bar_checks(results: dict, cfg: Config) -> dict:
    """The issue's bars on what was run."""
    out = {}
    dev = results["exponents"].get("max_abs_deviation_after_preflossing")
    if dev is not None:
        out["top-k exponents within 0.05 of the target after preflossing"] = bool(dev <= 0.05)
    n = cfg.seeds
    for task, e in results["tasks"].items():
        if "plain" in e and "pre_inter" in e:
            hit = [d for d, p, q in zip(e["delays"], e["plain"], e["pre_inter"], strict=True)
                   if p <= n // 5 and q >= math.ceil(3 * n / 5)]  # fmt: skip
            out[f"{task}: a delay with plain <= 1/5 and pre_inter >= 3/5 of seeds"] = hit
    return out


TOPIC = "Gradient flossing (beyond the notes)"


def claims(results: dict, cfg: Config) -> list[runs.Claim]:
    """(1) After preflossing the top-k exponents are within 0.05 of the target (every seed,
    task and delay); (2) per task, at its longest delay: preflossing + interflossing beats
    plain training on per-seed test accuracy (paired: both arms start from the same RNN per
    seed), with the success counts beside it."""
    out = []
    dev = results.get("exponents", {}).get("max_abs_deviation_after_preflossing")
    if dev is not None:
        out.append(runs.Claim(
            TOPIC, f"after {cfg.pre_steps} preflossing updates (Adam {cfg.floss_lr:g}) the top "
            f"{cfg.floss_k} Lyapunov exponents of the {cfg.hidden}-unit tanh RNN are within 0.05 "
            f"of {cfg.floss_target:g}", dev <= 0.05,
            f"worst |lambda_i - {cfg.floss_target:g}| over every seed, task and delay: {dev:.3f}"
            + (f" (seed 0 at init: {max(abs(x - cfg.floss_target) for x in results['exponents']['init'][: cfg.floss_k]):.3f})"  # noqa: E501
               if "init" in results.get("exponents", {}) else ""),
            cfg.seeds))  # fmt: skip
    for task, e in results["tasks"].items():
        if "plain" not in e or "pre_inter" not in e:
            continue
        i = int(np.argmax(e["delays"]))
        d = e["delays"][i]
        holds, ev = runs.compare(e["pre_inter_accuracy"][i], e["plain_accuracy"][i],
                                 names=("pre + inter", "plain"), paired=cfg.seeds > 1,
                                 min_seeds=min(3, cfg.seeds))  # fmt: skip
        out.append(runs.Claim(
            TOPIC, f"delayed {task}, delay {d} (T = {cfg.seq_len}, {cfg.steps} steps, Adam "
            f"{cfg.lr:g}): pre + interflossing beats plain BPTT training on test accuracy",
            holds, f"{ev}; successes (accuracy >= {cfg.threshold:g}) {e['pre_inter'][i]}/"
            f"{cfg.seeds} vs {e['plain'][i]}/{cfg.seeds}", cfg.seeds))  # fmt: skip
    return out


def _plots(cfg: Config, per: dict, results: dict, run_dir: runs.RunDir) -> None:
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), layout="constrained",
                             squeeze=False)  # fmt: skip
    for ax, task in zip(axes[0], tasks, strict=True):
        e = results["tasks"][task]
        for arm in cfg.arms:
            ax.plot(e["delays"], np.asarray(e[arm]) / cfg.seeds, "o-", label=arm)
        ax.set_xlabel("delay d (steps)")
        ax.set_ylabel(f"success rate (test acc >= {cfg.threshold})")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"delayed {task}, {cfg.seeds} seeds, {cfg.steps} steps")
        ax.legend(fontsize=8)
    fig.savefig(run_dir.plot_path("success_vs_delay"), dpi=110)
    plt.close(fig)

    ex = results["exponents"]
    if "init" in ex:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
        for key in ("init", "after_preflossing", "after_training"):
            ax.plot(np.arange(1, len(ex[key]) + 1), ex[key], ".-", label=key.replace("_", " "))
        ax.axhline(cfg.floss_target, color="k", lw=1, ls="--")
        ax.axvline(cfg.floss_k + 0.5, color="gray", lw=1, ls=":", label=f"k = {cfg.floss_k}")
        ax.set_xlabel("i")
        ax.set_ylabel("lambda_i (per step)")
        ax.set_title(f"Lyapunov spectrum, pre_inter arm, {ex['task']} d={ex['delay']}, seed 0")
        ax.legend(fontsize=8)
        fig.savefig(run_dir.plot_path("spectrum"), dpi=110)
        plt.close(fig)

    task, d = cfg.figure_task, _figure_delay(cfg)
    curves = {a: per.get(task, {}).get((a, d), {}).get("lag_curves") for a in RNN_ARMS}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
        shown = set()
        for arm, c in curves.items():
            for key, v in (c or {}).items():
                label = key if key != "after_training" else f"{arm}: after training"
                if key in ("init", "after_preflossing") and key in shown:
                    continue
                shown.add(key)
                ax.semilogy(np.arange(len(v)), v, label=label)
        ax.set_xlabel("lag T - t")
        ax.set_ylabel("||dL/dh_t|| (batch mean)")
        ax.set_title(f"gradient vs lag, {task} d={d}, seed 0")
        ax.legend(fontsize=8)
        fig.savefig(run_dir.plot_path("lag_curves"), dpi=110)
        plt.close(fig)

    for task in tasks:
        dd = max(delays(cfg, task))
        recs = {a: run_dir.sub(f"{task}-d{dd}-{a}").metrics() for a in cfg.arms}
        keys = ("loss", "eval_accuracy") + (("lyapunov_1",) if cfg.track_lyapunov else ())
        plots.metric_curves(recs, run_dir.plot_path(f"curves_{task}_d{dd}"), keys=keys,
                            title=f"delayed {task}, d={dd} (mean over seeds)")  # fmt: skip


def report(results: dict, run_dir: runs.RunDir) -> str:
    cfg = runs.read_json(run_dir.config_path) if run_dir.config_path.exists() else {}
    lines = [
        f"Successes out of {cfg.get('seeds', '?')} seeds (test accuracy >= "
        f"{cfg.get('threshold', '?')} after {cfg.get('steps', '?')} steps, batch "
        f"{cfg.get('batch_size', '?')}, T = {cfg.get('seq_len', '?')}, hidden "
        f"{cfg.get('hidden', '?')}, Adam lr {cfg.get('lr', '?')}):",
        "",
    ]
    for task, e in results["tasks"].items():
        arms = [a for a in ARMS if a in e]
        lines += [f"**delayed {task}**", "", "| delay | " + " | ".join(arms) + " |",
                  "|---" * (len(arms) + 1) + "|"]  # fmt: skip
        for i, d in enumerate(e["delays"]):
            lines.append(f"| {d} | " + " | ".join(str(e[a][i]) for a in arms) + " |")
        lines.append("")
    ex = results.get("exponents", {})
    if "init" in ex:
        fmt = lambda v: ", ".join(f"{x:.3f}" for x in v[:5])  # noqa: E731
        lines += [
            f"Exponents (seed 0, {ex['task']} d={ex['delay']}, first 5 of the top "
            f"{len(ex['init'])}): init {fmt(ex['init'])}; after preflossing "
            f"{fmt(ex['after_preflossing'])}; after training {fmt(ex['after_training'])}. "
            f"Worst |lambda_i - {ex['target']}| over i <= {ex['k']} after preflossing, every "
            f"seed/task/delay: {ex['max_abs_deviation_after_preflossing']:.4f}.",
            "",
        ]
    lines += ["| bar | measured |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v)} |" for k, v in results.get("bar", {}).items()]
    lines += ["", "![success](success_vs_delay.png)", "", "![spectrum](spectrum.png)", "",
              "![lag curves](lag_curves.png)"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    runs.main(__name__)
