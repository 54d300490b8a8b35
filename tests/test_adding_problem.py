"""experiments.adding_problem: the seed ensemble, its losses, and the claims it checks."""

from __future__ import annotations

import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import adding_problem as ap
from experiments.tour import NOTES_TOPICS
from jaxnets import runs

TINY = {
    "lengths": (8,),
    "cells": ("lstm",),
    "hidden": 4,
    "batch_size": 8,
    "steps": 6,
    "n_test": 20,
    "eval_every": 3,
    "clip_norm": 0.01,  # far below the gradient norm: every update is clipped
    "copy_steps": 0,  # the copy task's members come from the same seeds (test_bptt_experiments)
}


def test_member_k_of_an_ensemble_is_the_one_seed_run_with_seed_plus_k(tmp_path):
    """Member 1 of a 3-seed run from seed 0 trains exactly as a 1-seed run with seed 1:
    same initial weights, batches, test set, and (with every update clipped) its own
    gradient norm, not the ensemble's."""
    three = runs.run_experiment(ap, {**TINY, "seeds": 3}, tmp_path / "three", progress=False)
    one = runs.run_experiment(ap, {**TINY, "seed": 1}, tmp_path / "one", progress=False)
    assert three["seeds"] == [0, 1, 2] and one["seeds"] == [1]
    np.testing.assert_allclose(three["T8"]["lstm"][1], one["T8"]["lstm"][0], rtol=2e-5)
    # the eval curve too, and the members differ from each other (they are other seeds)
    curve3 = [r["eval_mse_1"] for r in runs.RunDir(tmp_path / "three/T8-lstm").metrics()
              if "eval_mse_1" in r]  # fmt: skip
    curve1 = [r["eval_mse_0"] for r in runs.RunDir(tmp_path / "one/T8-lstm").metrics()
              if "eval_mse_0" in r]  # fmt: skip
    np.testing.assert_allclose(curve3, curve1, rtol=2e-5)
    assert len(set(three["T8"]["lstm"])) == 3
    # clipping was active: the single run's gradient norm exceeds clip_norm
    grads = [r["grad_norm"] for r in runs.RunDir(tmp_path / "one/T8-lstm").metrics()
             if "grad_norm" in r]  # fmt: skip
    assert min(grads) > 10 * TINY["clip_norm"]

    # a run killed after its step-3 checkpoint resumes there and ends where it ended
    run, sub = tmp_path / "three", tmp_path / "three/T8-lstm"
    for done in (run / "DONE", run / "results.json", sub / "DONE", sub / "results.json"):
        done.unlink()
    shutil.rmtree(sub / "checkpoints/6")
    assert sorted(p.name for p in (sub / "checkpoints").iterdir()) == ["3"]
    again = runs.run_experiment(ap, {**TINY, "seeds": 3}, run, progress=False)
    assert again["T8"]["lstm"] == three["T8"]["lstm"]


def test_seeds_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="seeds: expected >= 1, got 0"):
        runs.run_experiment(ap, {**TINY, "seeds": 0}, tmp_path / "r", progress=False)


def test_ensemble_mse_matches_numpy_per_member():
    rng = np.random.default_rng(0)
    preds, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    mask = np.array([True, True, False, True, False])
    loss, m = ap.ensemble_mse(jnp.asarray(preds), {"y": jnp.asarray(y), "mask": jnp.asarray(mask)})
    ref = ((preds - y) ** 2)[mask].mean(0)
    np.testing.assert_allclose([m[f"mse_{k}"] for k in range(3)], ref, rtol=1e-5)
    np.testing.assert_allclose(loss, ref.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["mse"], ref.mean(), rtol=1e-5)


def test_copy_loss_matches_numpy_per_member():
    rng = np.random.default_rng(1)
    B, M, L, S = 4, 2, 6, 2
    logits = rng.normal(size=(B, M, L, 10)).astype(np.float32)
    y = rng.integers(0, 10, size=(B, M, L))
    mask = np.array([True, False, True, True])
    loss, m = ap.copy_loss(S)(jnp.asarray(logits), {"y": jnp.asarray(y), "mask": jnp.asarray(mask)})
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]  # (B, M, L)
    acc = (logits[:, :, -S:].argmax(-1) == y[:, :, -S:]).astype(float)
    for k in range(M):
        np.testing.assert_allclose(m[f"ce_{k}"], nll[mask, k].mean(), rtol=1e-5)
        np.testing.assert_allclose(m[f"copy_accuracy_{k}"], acc[mask, k].mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, sum(nll[mask, k].mean() for k in range(M)), rtol=1e-5)


# --- claims -------------------------------------------------------------------------------


def _tour_cfg():
    return runs.config_from_args(ap, ap.TOUR)


def _tour_results(rnn=(0.16, 0.17, 0.165), lstm=(0.01, 0.02, 0.005), gru=(0.003, 0.002, 0.004)):
    (T,) = _tour_cfg().lengths
    return {"seeds": [0, 1, 2], f"T{T}": {"rnn": list(rnn), "lstm": list(lstm), "gru": list(gru)}}


def _by_kind(claims):
    solve = [c for c in claims if "on every seed" in c.claim]
    lower = {c.claim.split(": ")[1].split("'s")[0]: c for c in claims if "lower than" in c.claim}
    return solve, lower


def test_tour_claims_pass_on_a_clear_separation():
    cfg = _tour_cfg()
    assert cfg.seeds >= 3 and cfg.copy_steps == 0
    claims = ap.claims(_tour_results(), cfg)
    assert {c.topic for c in claims} == {ap.TOPIC} and ap.TOPIC in NOTES_TOPICS
    solve, lower = _by_kind(claims)
    assert len(solve) == 1 and solve[0].holds and solve[0].seeds == 3
    (T,) = cfg.lengths
    for text in (f"T = {T}", f"{cfg.steps} steps", "3 seeds", f"hidden {cfg.hidden}"):
        assert text in solve[0].claim
    assert "LSTM 0.0117 ± 0.0044 (3/3 solved)" in solve[0].evidence
    assert set(lower) == {"LSTM", "GRU"} and all(c.holds for c in lower.values())
    assert "±" in lower["LSTM"].evidence


@pytest.mark.parametrize(
    "change, solve_holds, lstm_lower",
    [
        ({"lstm": (0.01, 0.02, 0.08)}, False, True),  # one LSTM seed unsolved
        ({"rnn": (0.16, 0.03, 0.165)}, False, True),  # the tanh RNN solves one seed
        ({"lstm": (0.16, 0.15, 0.17)}, False, False),  # LSTM no better than the RNN
    ],
)
def test_tour_claims_fail_when_the_figures_say_so(change, solve_holds, lstm_lower):
    claims = ap.claims(_tour_results(**change), _tour_cfg())
    solve, lower = _by_kind(claims)
    assert solve[0].holds is solve_holds
    assert lower["LSTM"].holds is lstm_lower
    assert lower["GRU"].holds  # untouched


def test_compare_verdict_matches_two_standard_errors_by_hand():
    """LSTM vs RNN: holds iff mean(RNN) - mean(LSTM) > 2 sqrt(se_a^2 + se_b^2)."""
    rnn, lstm = [0.10, 0.16, 0.13], [0.02, 0.14, 0.08]  # difference 0.05, 2 SE 0.077

    def se(v):
        return np.std(v, ddof=1) / math.sqrt(len(v))

    by_hand = np.mean(rnn) - np.mean(lstm) > 2 * math.hypot(se(rnn), se(lstm))
    _, lower = _by_kind(ap.claims(_tour_results(rnn=rnn, lstm=lstm), _tour_cfg()))
    assert lower["LSTM"].holds is bool(by_hand) is False
    rnn_far = [0.16, 0.17, 0.165]
    by_hand = np.mean(rnn_far) - np.mean(lstm) > 2 * math.hypot(se(rnn_far), se(lstm))
    _, lower = _by_kind(ap.claims(_tour_results(rnn=rnn_far, lstm=lstm), _tour_cfg()))
    assert lower["LSTM"].holds is bool(by_hand) is True


def test_claims_on_a_one_seed_full_run_with_the_copy_task():
    cfg = ap.Config()
    assert cfg.seeds == 1
    results = {
        "seeds": [0],
        "T100": {"rnn": [0.178], "lstm": [0.0006], "gru": [0.0001]},
        "T200": {"rnn": 0.179, "lstm": 0.0001, "gru": 0.0001},  # the earlier scalar schema
        "copy50": {
            "rnn": {"test_ce": [0.297], "copy_accuracy": [0.13]},
            "lstm": {"test_ce": [0.289], "copy_accuracy": [0.16]},
            "gru": {"test_ce": [0.224], "copy_accuracy": [0.34]},
            "baseline_ce": 0.297,
        },
    }
    claims = ap.claims(results, cfg)
    assert len(claims) == 9  # per length: solve + 2 comparisons; copy: bridge + 2 comparisons
    solve = [c for c in claims if "on every seed" in c.claim]
    assert [c.holds for c in solve] == [True, True, False]  # LSTM copies at 0.16 < 0.25
    assert "T = 100" in solve[0].claim and "T = 200" in solve[1].claim
    assert "delay 50" in solve[2].claim and "3000 steps" in solve[2].claim
    compares = [c for c in claims if c not in solve]
    assert all("no standard error" in c.evidence for c in compares)
    assert all(c.holds for c in compares)  # lower MSE / higher accuracy than the RNN
    assert all(c.seeds == 1 for c in claims)


def test_report_states_the_configuration_and_mean_se(tmp_path):
    rd = runs.RunDir(tmp_path / "r")
    runs.write_json(rd.config_path, runs._config_json(_tour_cfg()))
    md = ap.report(_tour_results(), rd)
    assert "3 seed(s) from 0; 1000 steps" in md and "hidden 32" in md
    assert "| 50 | lstm | 0.0117 ± 0.0044 | 3/3 |" in md
    assert "| 50 | rnn | 0.1650 ± 0.0029 | 0/3 |" in md
    assert "Copy task: not run" in md
