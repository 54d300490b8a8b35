"""experiments.gradient_flossing: the tasks against loops written from their definitions,
the arms' shared initialisation, and the quick end-to-end run with the issue's schema."""

import importlib
import json

import jax
import numpy as np
import pytest

from experiments import gradient_flossing as gf
from jaxnets import runs


@pytest.mark.parametrize("task", ["copy", "xor"])
@pytest.mark.parametrize("delay", [1, 3, 7])
def test_task_targets_follow_the_definitions(task, delay):
    b = gf.task_batch(jax.random.key(0), 4, 30, delay, task == "xor")
    s = np.asarray(b["x"])[..., 0]
    y, mask = np.asarray(b["y"]), np.asarray(b["mask"])
    assert set(np.unique(s)) <= {0.0, 1.0} and s.shape == (4, 30)
    start = 2 * delay if task == "xor" else delay
    for n in range(4):
        for t in range(30):
            assert mask[n, t] == (t >= start)
            if t >= start:
                want = s[n, t - delay] if task == "copy" else float(
                    int(s[n, t - delay]) ^ int(s[n, t - 2 * delay])
                )  # fmt: skip
                assert y[n, t] == want


def test_rnn_arms_share_the_papers_initialisation():
    cfg = gf.Config(hidden=80)
    key = jax.random.key(3)
    ps = [gf.init_params(cfg, arm, key) for arm in gf.RNN_ARMS]
    for p in ps[1:]:
        for a, b in zip(jax.tree.leaves(ps[0]), jax.tree.leaves(p), strict=True):
            np.testing.assert_array_equal(a, b)
    w = np.asarray(ps[0]["rnn"]["l0"]["weight_hh"])
    assert abs(w.std() * np.sqrt(80) - cfg.g) < 0.05  # W_hh ~ N(0, g^2 / N)
    lstm = gf.init_params(cfg, "lstm", key)["rnn"]["l0"]["bias_ih"]
    assert float(lstm[80:160].mean()) > 0.9  # forget-gate bias + 1


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="arms"):
        gf.check_config(gf.Config(arms=("plain", "nosuch")))
    with pytest.raises(ValueError, match="xor_delays: delay 60"):
        gf.check_config(gf.Config(xor_delays=(60,)))
    with pytest.raises(ValueError, match="floss_k"):
        gf.check_config(gf.Config(floss_k=81))


def test_quick_run_writes_the_issue_schema(tmp_path):
    res = runs.run_experiment(gf, {}, tmp_path / "run", quick=True, progress=False)
    cfg = runs.config_from_args(gf, {}, quick=True)
    for task in cfg.tasks:
        e = res["tasks"][task]
        assert e["delays"] == list(gf.delays(cfg, task)) and e["seeds"] == cfg.seeds
        for arm in cfg.arms:
            assert len(e[arm]) == len(e["delays"])
            assert all(isinstance(c, int) and 0 <= c <= cfg.seeds for c in e[arm])
    ex = res["exponents"]
    assert ex["target"] == cfg.floss_target
    for key in ("init", "after_preflossing", "after_training"):
        assert len(ex[key]) == cfg.spectrum_k and all(np.isfinite(ex[key]))
    for png in ("success_vs_delay", "spectrum", "lag_curves"):
        assert (tmp_path / "run" / f"{png}.png").exists()
    # --track-lyapunov: the leading exponents at every eval, in metrics.jsonl
    sub = runs.RunDir(tmp_path / "run" / f"copy-d{cfg.copy_delays[0]}-pre_inter")
    evals = [r for r in sub.metrics() if "eval_accuracy" in r]
    assert evals and all("lyapunov_1" in r and np.isfinite(r["lyapunov_1"]) for r in evals)
    events = [r["event"] for r in sub.metrics() if "event" in r]
    assert events[0] == "preflossing" and "interflossing" in events
    json.dumps(res)


def test_registered_in_the_tour():
    listing = importlib.import_module("experiments.__main__")
    assert "experiments.gradient_flossing" in [m.__name__ for m in listing.discover()]
    assert runs.config_from_args(gf, gf.TOUR).steps <= 1000


def test_claims_exponent_bar_and_flossing_against_plain_at_the_longest_delay():
    cfg = runs.config_from_args(gf, gf.TOUR)
    res = {
        "exponents": {"max_abs_deviation_after_preflossing": 0.04, "init": [-0.3, -0.9]},
        "tasks": {"copy": {"delays": [5, 20], "plain": [5, 0], "pre_inter": [5, 3],
                           "plain_accuracy": [[1.0] * 5, [0.70, 0.72, 0.74, 0.76, 0.78]],
                           "pre_inter_accuracy": [[1.0] * 5, [0.90, 0.93, 0.88, 0.95, 0.91]]}},
    }  # fmt: skip
    bar, copy = gf.claims(res, cfg)
    assert bar.holds and "0.040" in bar.evidence and "0.900" in bar.evidence  # init |-0.9|
    assert copy.holds and "delay 20" in copy.claim and "successes" in copy.evidence
    assert "3/5 vs 0/5" in copy.evidence
    res["exponents"]["max_abs_deviation_after_preflossing"] = 0.06
    res["tasks"]["copy"]["pre_inter_accuracy"][1] = [0.71, 0.72, 0.75, 0.75, 0.79]
    assert [c.holds for c in gf.claims(res, cfg)] == [False, False]
