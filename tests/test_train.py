"""jaxnets.train: steps against closed forms, overfitting, BatchNorm, freezing, NaN stop,
determinism, resume after SIGKILL, no retracing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import data, train
from jaxnets.models import BatchNorm
from jaxnets.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    classes: int = 3
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(4)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        return nn.Dense(2)(nn.relu(h))


def _toy(n=64, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return {"x": x, "y": y}


# --- one step against closed forms ---------------------------------------------------------


def test_sgd_step_matches_closed_form_linear_regression():
    """Linear model, MSE, plain SGD: W' = W - lr * 2/(N*D) X^T (XW + b - Y), by hand."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    y = rng.standard_normal((8, 2)).astype(np.float32)
    model = nn.Dense(2)
    lr = 0.1
    tx = train.make_optimizer("sgd", lr, momentum=0.0)
    batch = {"x": x, "y": y}
    state = train.init_state(model, tx, jax.random.key(0), batch)
    w = np.asarray(state.params["kernel"], np.float64)
    b = np.asarray(state.params["bias"], np.float64)
    resid = x @ w + b[None, :] - y
    gw = 2.0 / resid.size * x.T @ resid
    gb = 2.0 / resid.size * resid.sum(0)
    step = train.make_train_step(model, train.mse_loss, tx)
    new, m = step(state, batch)
    np.testing.assert_allclose(new.params["kernel"], w - lr * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.params["bias"], b - lr * gb, rtol=1e-5, atol=1e-6)
    gnorm = np.sqrt((gw**2).sum() + (gb**2).sum())
    np.testing.assert_allclose(m["loss"], (resid**2).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], gnorm, rtol=1e-5)
    np.testing.assert_allclose(m["update_norm"], lr * gnorm, rtol=1e-5)
    pnorm = np.sqrt(
        (np.asarray(new.params["kernel"]) ** 2).sum() + (np.asarray(new.params["bias"]) ** 2).sum()
    )
    np.testing.assert_allclose(m["param_norm"], pnorm, rtol=1e-5)
    assert int(new.step) == 1 and float(m["finite"]) == 1.0


def test_clip_by_global_norm_bounds_the_update():
    """With SGD lr=1 and clip c < |g|, the update is g * c/|g|: its norm is exactly c."""
    batch = _toy()
    tx = train.make_optimizer("sgd", 1.0, momentum=0.0, clip_norm=1e-3)
    state = train.init_state(MLP(), tx, jax.random.key(0), batch)
    _, m = train.make_train_step(MLP(), train.cross_entropy_loss, tx)(state, batch)
    assert float(m["grad_norm"]) > 1e-2
    np.testing.assert_allclose(m["update_norm"], 1e-3, rtol=1e-4)


def test_per_member_optimizer_updates_each_member_as_alone():
    """per_member(clip + Adam) on parameters stacked over 3 members equals the plain
    optimizer run on each member by itself, while a global clip would couple them."""
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(3, 4, 2)).astype(np.float32),
        "b": rng.normal(size=(3, 2)).astype(np.float32),
    }
    grads = [
        {
            "w": np.float32(s) * rng.normal(size=(3, 4, 2)).astype(np.float32),
            "b": np.float32(s) * rng.normal(size=(3, 2)).astype(np.float32),
        }
        for s in (5.0, 0.01, 3.0)
    ]
    tx = train.make_optimizer("adam", 0.1, clip_norm=1.0)
    ens = train.per_member(tx)
    p, st = params, ens.init(params)
    for g in grads:
        u, st = ens.update(g, st, p)
        p = optax.apply_updates(p, u)
    for k in range(3):
        pk = jax.tree.map(lambda a, k=k: a[k], params)
        sk = tx.init(pk)
        for g in grads:
            u, sk = tx.update(jax.tree.map(lambda a, k=k: a[k], g), sk, pk)
            pk = optax.apply_updates(pk, u)
        for name in ("w", "b"):
            np.testing.assert_allclose(p[name][k], pk[name], rtol=1e-6)
    coupled, cst = params, tx.init(params)
    for g in grads:
        u, cst = tx.update(g, cst, coupled)
        coupled = optax.apply_updates(coupled, u)
    assert not np.allclose(coupled["w"], p["w"], rtol=1e-3)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_weight_decay_first_step_matches_the_closed_form(name):
    """Step 1 by hand: Adam's first update is -lr * g/(|g| + eps) (bias-corrected moments);
    "adam" and "sgd" add wd * p to g first (L2, as torch's optimizers do), "adamw" subtracts
    lr * wd * p after (decoupled). The numbers make L2 flip the first gradient's sign, so an
    ignored weight decay fails."""
    lr, wd = 0.1, 0.1
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([-0.05, 0.3])}
    tx = train.make_optimizer(name, lr, weight_decay=wd, momentum=0.0)
    updates, _ = tx.update(g, tx.init(p), p)
    g_np, p_np = np.asarray(g["w"]), np.asarray(p["w"])
    if name == "sgd":
        want = -lr * (g_np + wd * p_np)
    elif name == "adam":
        l2 = g_np + wd * p_np
        want = -lr * l2 / (np.abs(l2) + 1e-8)
    else:
        want = -lr * (g_np / (np.abs(g_np) + 1e-8) + wd * p_np)
    np.testing.assert_allclose(updates["w"], want, rtol=1e-5)


def test_negative_weight_decay_is_refused():
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
        train.make_optimizer("adamw", 1e-3, weight_decay=-0.1)


def test_overfit_one_batch():
    batch = _toy(n=16, classes=4)
    model = MLP(classes=4)
    tx = optax.adam(1e-2)
    state = train.init_state(model, tx, jax.random.key(0), batch)
    step = train.make_train_step(model, train.cross_entropy_loss, tx)
    _, m0 = step(jax.tree.map(jnp.array, state), batch)
    np.testing.assert_allclose(m0["loss"], np.log(4.0), atol=0.5)  # near chance at init
    for _ in range(300):
        state, m = step(state, batch)
    assert float(m["loss"]) < 0.05
    assert float(m["accuracy"]) == 1.0


def test_batchnorm_running_stats_follow_flax_momentum():
    """After one step: mean' = 0.9 * 0 + 0.1 * mean_b(h), var' = 0.9 * 1 + 0.1 * var_b(h)."""
    rng = np.random.default_rng(2)
    batch = {
        "x": rng.standard_normal((32, 3)).astype(np.float32),
        "y": rng.integers(0, 2, 32).astype(np.int32),
    }
    model = BNNet()
    tx = optax.sgd(0.1)
    state = train.init_state(model, tx, jax.random.key(0), batch)
    assert set(state.batch_stats) == {"BatchNorm_0"}
    d0 = state.params["Dense_0"]
    h = batch["x"].astype(np.float64) @ np.asarray(d0["kernel"]) + np.asarray(d0["bias"])[None]
    new, _ = train.make_train_step(model, train.cross_entropy_loss, tx)(state, batch)
    bs = new.batch_stats["BatchNorm_0"]
    np.testing.assert_allclose(bs["mean"], 0.1 * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bs["var"], 0.9 + 0.1 * h.var(0), rtol=1e-4)
    # eval uses the running statistics: output equals the module applied by hand.
    ev = train.make_eval_step(model, train.cross_entropy_loss)(new, batch)
    logits = model.apply(new.variables, batch["x"], train=False)
    want, _ = train.cross_entropy(logits, jnp.asarray(batch["y"]))
    np.testing.assert_allclose(ev["loss"], want, rtol=1e-6)


def test_dropout_key_is_fold_in_of_step():
    batch = _toy()
    model = MLP(dropout=0.5)
    tx = optax.sgd(0.0)
    state = train.init_state(model, tx, jax.random.key(3), batch)
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    y = jnp.asarray(batch["y"])

    def loss_with_key(k):
        logits = model.apply(
            {"params": state.params},
            batch["x"],
            train=True,
            rngs={"dropout": jax.random.fold_in(state.rng, k)},
        )
        return float(train.cross_entropy(logits, y)[0])

    want, at_step0 = loss_with_key(7), loss_with_key(0)
    assert abs(at_step0 - want) > 1e-4  # the masks differ, so the check below can fail
    _, m = train.make_train_step(model, train.cross_entropy_loss, tx)(state, batch)
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)


@pytest.mark.parametrize(
    "trainable",
    [lambda path: path.startswith("Dense_1"), {"Dense_0": False, "Dense_1": True}],
    ids=["callable", "prefix-tree"],
)
def test_trainable_partition_freezes_bitwise(trainable):
    batch = _toy()
    model = MLP()
    tx = optax.adamw(1e-2, weight_decay=0.5)  # decay would move frozen weights if applied
    state = train.init_state(model, tx, jax.random.key(0), batch)
    p0 = jax.tree.map(np.array, state.params)
    # independent: full gradient, restricted to the head
    g_full = jax.grad(
        lambda p: train.cross_entropy_loss(model.apply({"params": p}, batch["x"]), batch)[0]
    )(state.params)
    step = train.make_train_step(model, train.cross_entropy_loss, tx, trainable=trainable)
    state, m = step(state, batch)
    np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(g_full["Dense_1"]), rtol=1e-5)
    for _ in range(3):
        state, m = step(state, batch)
    assert train.tree_equal(state.params["Dense_0"], p0["Dense_0"])
    assert not np.allclose(state.params["Dense_1"]["kernel"], p0["Dense_1"]["kernel"])


def test_trainable_mask_errors():
    params = {"a": jnp.ones(2), "b": {"c": jnp.ones(1)}}
    assert train.trainable_mask(params, lambda p: p == "b/c") == {"a": False, "b": {"c": True}}
    with pytest.raises(ValueError, match="trainable"):
        train.trainable_mask(params, {"a": True, "x": False})


def test_cross_entropy_masked_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 3)).astype(np.int32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    nll = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == labels
    loss, acc = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(acc, correct[mask].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="labels of shape"):
        train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:, :2]))
    with pytest.raises(TypeError, match="integers"):
        train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.float32))


def test_evaluate_weights_padded_batches_by_mask():
    """Mean over real examples, matching one un-batched evaluation."""
    d = _toy(n=37)
    model = MLP()
    state = train.init_state(model, optax.sgd(0.1), jax.random.key(0), d)
    ev = train.make_eval_step(model, train.cross_entropy_loss)
    got = train.evaluate(ev, state, data.eval_batches(d, 16))
    want = ev(state, d)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-6)


# --- non-finite ----------------------------------------------------------------------------


def test_nonfinite_gradient_with_finite_loss_is_rejected():
    """sqrt(|w|) at w = 0: loss 0, gradient NaN. The update is skipped, finite = 0."""

    def apply_fn(variables, batch, *, train, rngs):
        return jnp.sqrt(jnp.abs(variables["params"]["w"]))[None, :] * batch["x"]

    params = {"w": jnp.zeros(2)}
    tx = optax.sgd(0.1)
    batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 2))}
    state = train.init_state(apply_fn, tx, jax.random.key(0), batch, params=params)
    new, m = train.make_train_step(apply_fn, train.mse_loss, tx)(state, batch)
    assert float(m["loss"]) == 0.0 and not np.isfinite(float(m["grad_norm"]))
    assert float(m["finite"]) == 0.0
    assert int(new.step) == 0 and np.array_equal(new.params["w"], np.zeros(2))


def test_fit_stops_on_nan_and_keeps_last_good_checkpoint(tmp_path):
    d = _toy()
    batches = data.Batches(d, 16, seed=0)

    def batch_fn(step):
        b = dict(batches(step))
        if step == 7:
            b["x"] = np.full_like(b["x"], np.nan)
        return b

    trainer = train.Trainer(MLP(), train.cross_entropy_loss, optax.adam(1e-2))
    state = trainer.init(jax.random.key(0), batches(0))
    rd = RunDir(tmp_path / "run", progress=False)
    with pytest.raises(train.NonFiniteError, match="step 7.*last good checkpoint is step 6") as e:
        trainer.fit(state, batch_fn, 20, run_dir=rd, checkpoint_every=3, log_every=2)
    assert e.value.step == 7 and e.value.checkpoint_step == 6
    steps = sorted(int(p.name) for p in rd.checkpoint_dir.iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    last = rd.metrics()[-1]
    assert last["event"] == "nonfinite" and last["step"] == 8 and np.isnan(last["loss"])
    # resuming restores the finite step-6 state (and would hit the same bad batch at step 7)
    with pytest.raises(train.NonFiniteError):
        trainer.fit(state, batch_fn, 20, run_dir=rd, checkpoint_every=3)
    restored = train._restore(train._checkpoint_manager(rd.checkpoint_dir), state)
    assert int(restored.step) == 6
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


# --- loop: determinism, resume, traces -----------------------------------------------------


def _fit(tmp, steps=16, seed=0, **kw):
    d = _toy(n=96)
    batches = data.Batches(d, 16, seed=seed)
    sched = optax.cosine_decay_schedule(1e-2, 24)
    trainer = train.Trainer(
        MLP(dropout=0.2), train.cross_entropy_loss, optax.adam(sched), schedule=sched
    )
    state = trainer.init(jax.random.key(seed), batches(0))
    rd = RunDir(tmp, progress=False)
    res = trainer.fit(
        state,
        batches,
        steps,
        run_dir=rd,
        log_every=4,
        eval_every=8,
        checkpoint_every=10,
        eval_batches=lambda: data.eval_batches(d, 32),
        **kw,
    )
    return trainer, res, rd


def test_same_seed_gives_identical_metrics_and_params(tmp_path):
    trainer, r1, d1 = _fit(tmp_path / "a")
    _, r2, d2 = _fit(tmp_path / "b")
    m1, m2 = d1.metrics(), d2.metrics()
    assert train.strip_timing(m1) == train.strip_timing(m2)
    assert train.tree_equal(r1.state.params, r2.state.params)
    keys = set(m1[0])
    assert {
        "step",
        "loss",
        "accuracy",
        "grad_norm",
        "param_norm",
        "update_norm",
        "lr",
        "steps_per_sec",
    } <= keys
    assert [r["step"] for r in m1 if "loss" in r] == [4, 8, 12, 16]
    assert [r["step"] for r in m1 if "eval_loss" in r] == [8, 16]
    np.testing.assert_allclose(m1[0]["lr"], optax.cosine_decay_schedule(1e-2, 24)(3), rtol=1e-6)
    assert sorted(int(p.name) for p in d1.checkpoint_dir.iterdir()) == [10, 16]
    assert r1.eval.keys() == {"loss", "accuracy"}
    # the loop's jitted step compiled once for all steps
    assert trainer.steps(1)[1]._cache_size() == 1


def test_train_step_traces_once():
    d = _toy()
    tx = optax.adam(1e-3)
    raw = train.make_train_step(MLP(), train.cross_entropy_loss, tx, jit=False)
    step = jax.jit(chex.assert_max_traces(raw, n=1), donate_argnums=0)
    state = train.init_state(MLP(), tx, jax.random.key(0), d)
    batches = data.Batches(d, 16, seed=0)
    for k in range(4):
        state, _ = step(state, batches(k))
    assert int(state.step) == 4


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time
    import flax.linen as nn, jax, numpy as np, optax
    from jaxnets import data, train

    STEPS = 40

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(16)(x)))
            return nn.Dense(2)(x)

    def setup():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 6)).astype(np.float32)
        d = {"x": x, "y": (x.sum(1) > 0).astype(np.int32)}
        batches = data.Batches(d, 16, seed=3)
        trainer = train.Trainer(Net(), train.cross_entropy_loss, optax.adam(3e-3))
        return trainer, trainer.init(jax.random.key(5), batches(0)), batches, d

    def fit(run_dir, delay=0.0):
        trainer, state, batches, d = setup()
        def batch_fn(step):
            time.sleep(delay)
            return batches(step)
        return trainer.fit(state, batch_fn, STEPS, run_dir=run_dir, checkpoint_every=5,
                           log_every=5, eval_every=10,
                           eval_batches=lambda: data.eval_batches(d, 64), progress=False)

    if __name__ == "__main__":
        fit(sys.argv[1], float(sys.argv[2]))
""")


def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    script = tmp_path / "resume_script.py"
    script.write_text(RESUME_SCRIPT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed), "0.04"], cwd=ROOT, env=os.environ.copy()
    )
    ckpt = killed / "checkpoints"
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and any(
                p.name.isdigit() and int(p.name) >= 10 for p in ckpt.iterdir()
            ):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished (or died) before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()]
    assert 10 <= max(done_steps) < 40

    sys.path.insert(0, str(tmp_path))
    try:
        import resume_script
    finally:
        sys.path.remove(str(tmp_path))
    resumed = resume_script.fit(killed)
    straight = resume_script.fit(tmp_path / "straight")
    assert int(resumed.state.step) == 40
    assert train.tree_equal(resumed.state.params, straight.state.params)
    assert train.tree_equal(resumed.state.opt_state, straight.state.opt_state)
    a = [json.loads(s) for s in (killed / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(s) for s in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert train.strip_timing(a) == train.strip_timing(b)


# --- the experiments' shared glue ------------------------------------------------------------


def test_warmup_fraction_is_a_floored_fraction_of_the_total_capped():
    """warmup_fraction=0.1, warmup_steps=cap warms up for min(cap, total // 10) steps (the
    experiments' rule, by integer arithmetic), and the learning rate reaches its value then."""
    for total in (0, 7, 10, 95, 300, 1999, 2000, 2001, 5000, 12345):
        for cap in (0, 100, 200):
            want = total // 10 if cap == 0 else min(cap, total // 10)
            assert train._warmup_from_fraction(0.1, total, cap) == want, (total, cap)
    # sgd, lr 1, gradient 1 on one weight: the update at step t is -lr(t), t/W while warming
    tx = train.make_optimizer(
        "sgd", 1.0, momentum=0.0, warmup_fraction=0.1, warmup_steps=200, total_steps=40
    )
    p = {"w": jnp.zeros(())}
    opt, lrs = tx.init(p), []
    for _ in range(6):
        u, opt = tx.update({"w": jnp.ones(())}, opt, p)
        lrs.append(-float(u["w"]))
    np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-7)  # W = 4
    with pytest.raises(ValueError, match="warmup_fraction needs total_steps"):
        train.make_optimizer("adam", warmup_fraction=0.1)


def test_fit_result_carries_timing_and_parameter_count(tmp_path):
    batch = _toy(n=8, d=5, classes=3)
    trainer = train.Trainer(MLP(classes=3), train.cross_entropy_loss, optax.sgd(0.1))
    state = trainer.init(jax.random.key(0), batch)
    res = trainer.fit(state, lambda step: batch, 3, run_dir=RunDir(tmp_path / "r"), log_every=1)
    assert res.num_params == (5 * 16 + 16) + (16 * 3 + 3)  # Dense(16), Dense(3)
    assert res.wall_s > 0 and res.cpu_s > 0
    assert res.minutes == res.wall_s / 60 and res.cpu_minutes == res.cpu_s / 60


def test_loop_settings_mixin_gives_the_fit_keywords():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Config(train.LoopSettings):
        steps: int = 10
        log_every: int = 7  # an experiment's own default

    cfg = Config(eval_every=3)
    assert cfg.loop() == {"log_every": 7, "eval_every": 3, "checkpoint_every": 500}
    assert [f.name for f in dataclasses.fields(Config)] == [
        "log_every",
        "eval_every",
        "checkpoint_every",
        "steps",
    ]


def test_masked_cross_entropy_sum_and_count_closed_form():
    """Sum of -log softmax at the targets over the mask, and the mask's count (numpy)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 7)).astype(np.float32)
    y = rng.integers(0, 7, (3, 5))
    mask = rng.random((3, 5)) < 0.6
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    total, count = train.masked_cross_entropy(
        jnp.asarray(logits), jnp.asarray(y), jnp.asarray(mask)
    )
    np.testing.assert_allclose(float(total), nll[mask].sum(), rtol=1e-5)
    assert float(count) == mask.sum()
    total, count = train.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(y))
    np.testing.assert_allclose(float(total), nll.sum(), rtol=1e-5)
    assert float(count) == y.size
    with pytest.raises(ValueError, match="targets: expected shape"):
        train.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(y[:, :4]))


class _TwoBN(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dense -> BatchNorm: the second layer's input depends on
    how the first normalised each batch."""

    @nn.compact
    def __call__(self, x, train):
        x = BatchNorm(name="bn1")(nn.Dense(4, name="d1")(x), train)
        return BatchNorm(name="bn2")(nn.Dense(3, name="d2")(jnp.tanh(x)), train)


def test_recalibrate_batch_stats_equals_numpy_pooled_moments():
    """Every layer's new statistics are the mean and unbiased variance, over all examples of
    unequal batches, of its training-mode input: a NumPy loop from the definitions."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 5)) * 3 + 1).astype(np.float32)
    model = _TwoBN()
    v = model.init(jax.random.key(1), x[:2], train=True)
    v = {"params": v["params"], "batch_stats": v["batch_stats"]}
    sizes = [10, 10, 10, 7]
    batches = np.split(x, np.cumsum(sizes)[:-1])
    got = train.recalibrate_batch_stats(model, v, [{"x": b} for b in batches])

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    h1 = [b @ p["d1"]["kernel"] + p["d1"]["bias"] for b in batches]
    h2 = []
    for h in h1:  # training mode: each batch normalised by its own (biased) statistics
        z = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
        h2.append(np.tanh(z) @ p["d2"]["kernel"] + p["d2"]["bias"])
    for name, h in (("bn1", np.concatenate(h1)), ("bn2", np.concatenate(h2))):
        np.testing.assert_allclose(got[name]["mean"], h.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[name]["var"], h.var(0, ddof=1), rtol=1e-4, atol=1e-6)
    # the parameters are untouched and the input variables are not modified
    np.testing.assert_array_equal(v["batch_stats"]["bn1"]["mean"], np.zeros(4))
    # moments left in the variables by an earlier apply(mutable=True) do not count
    _, upd = model.apply(v, x[:3] * 100, train=True, mutable=True)
    again = train.recalibrate_batch_stats(model, {**v, **upd}, [{"x": b} for b in batches])
    np.testing.assert_allclose(again["bn1"]["var"], got["bn1"]["var"], rtol=1e-6)


def test_recalibrate_batch_stats_errors():
    model = _TwoBN()
    x = np.ones((4, 5), np.float32)
    v = model.init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        train.recalibrate_batch_stats(model, {"params": v["params"]}, [{"x": x}])
    with pytest.raises(ValueError, match="no BatchNorm layer ran in training mode"):
        train.recalibrate_batch_stats(model, v, [])
