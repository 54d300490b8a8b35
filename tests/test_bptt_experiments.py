"""The BPTT experiments end to end at their QUICK sizes: protocol, results, bounds, plots."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import adding_problem, vanishing_gradients
from jaxnets import bptt, runs


def test_vanishing_gradients_quick(tmp_path):
    res = runs.run_experiment(
        "vanishing_gradients", workdir=tmp_path / "r", quick=True, progress=False
    )
    cfg = runs.config_from_args(vanishing_gradients, quick=True)
    T = cfg.seq_len
    for cell in ("rnn", "lstm", "gru"):
        r = res["cells"][cell]
        for when in ("init", "trained"):
            curve = np.asarray(r[when]["grad_norm"])
            assert curve.shape == (T + 1,) and np.all(np.isfinite(curve))
            assert r[when]["slope"] < 0  # many-to-one at init: the gradient decays with lag
        assert math.isfinite(r["test_mse"])
    # the Pascanu bound: slope of the curve <= log sigma_max for sigma_max < 1
    for key, r in res["sigmas"].items():
        sigma = float(key)
        if sigma < 1:
            assert r["slope_within_bound"] is True
            assert r["slope"] <= math.log(sigma)
            assert r["product_slope"] <= math.log(sigma) + 1e-9
            prod = np.asarray(r["product_norm"])
            assert np.all(prod <= sigma ** np.arange(T + 1) * (1 + 1e-5))
    assert set(res["spikes"]) == {"no_clip", "clip"}
    for r in res["spikes"].values():
        assert isinstance(r["spiked"], bool)
    run_dir = runs.RunDir(tmp_path / "r")
    for name in ("lag_curves", "sigma_sweep", "jacobian_singular_values", "spikes"):
        assert run_dir.plot_path(name).exists()
    md = vanishing_gradients.report(res, run_dir)
    assert "sigma_max" in md and "lag_curves.png" in md


def test_readout_mse_is_the_models_loss(key):
    """The experiment's analysis loss equals the trained model's own MSE."""
    model = bptt.RecurrentReadout("gru", 5)
    x = jax.random.normal(key, (3, 7, 2))
    y = jnp.arange(3.0)
    params = jax.jit(model.init)(key, x)["params"]
    layer, lv, head = bptt.readout_parts(model, params)

    @jax.jit
    def both(params, x):
        out, final = layer.apply({"params": params["rnn"]}, x)
        pred = model.apply({"params": params}, x)
        h = params["head"]
        mse = vanishing_gradients.readout_mse(out, final, h["kernel"], h["bias"], y)
        return head(out), pred, mse, jnp.mean((pred - y) ** 2)

    via_head, pred, mse, ref = both(params, x)
    assert lv["params"] is params["rnn"]
    np.testing.assert_allclose(via_head, pred, rtol=1e-6)
    np.testing.assert_allclose(mse, ref, rtol=1e-6)


def test_adding_problem_quick(tmp_path):
    res = runs.run_experiment("adding_problem", workdir=tmp_path / "r", quick=True, progress=False)
    cfg = runs.config_from_args(adding_problem, quick=True)
    (T,) = cfg.lengths
    assert set(res[f"T{T}"]) == set(cfg.cells)
    for mse in res[f"T{T}"].values():
        assert len(mse) == cfg.seeds  # one test MSE per seed
        assert all(math.isfinite(m) and 0 <= m < 1.0 for m in mse)  # targets lie in [0, 2]
    copy = res[f"copy{cfg.copy_delay}"]
    assert copy["baseline_ce"] == pytest.approx(10 * math.log(8) / (cfg.copy_delay + 20))
    for cell in cfg.cells:
        assert all(0 <= a <= 1 for a in copy[cell]["copy_accuracy"])
    run_dir = runs.RunDir(tmp_path / "r")
    assert run_dir.plot_path("adding_mse").exists()
    md = adding_problem.report(res, run_dir)
    assert f"| {T} | lstm |" in md
    assert len(adding_problem.claims(res, cfg)) == 4  # adding: 1 + 1 compare; copy: 1 + 1


def test_copy_loss_masks_padded_examples():
    """Eval batches mask whole examples; the loss must ignore them at every token."""
    loss_fn = jax.jit(adding_problem.copy_loss(2))
    y = jnp.array([[1, 2, 3], [4, 5, 6]])[:, None]  # (batch 2, members 1, time 3)
    logits = jax.nn.one_hot(y, 10) * 5.0
    bad = logits.at[1].set(0.0)  # the padded example is wrong everywhere
    mask = jnp.array([True, False])
    l_masked, m = loss_fn(bad, {"y": y, "mask": mask})
    l_one, _ = loss_fn(logits[:1], {"y": y[:1]})
    np.testing.assert_allclose(l_masked, l_one, rtol=1e-6)
    assert float(m["copy_accuracy"]) == 1.0


def test_tbptt_option_is_wired(key):
    """RecurrentReadout(tbptt=...) keeps values and parameters, cuts the gradient."""
    x = jax.random.normal(key, (2, 12, 2))
    full = bptt.RecurrentReadout("lstm", 4)
    cut = bptt.RecurrentReadout("lstm", 4, tbptt=(2, 3))
    params = jax.jit(full.init)(key, x)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(cut.init, key, x)["params"]
    )
    np.testing.assert_allclose(
        jax.jit(cut.apply)({"params": params}, x),
        jax.jit(full.apply)({"params": params}, x),
        rtol=1e-5,
        atol=1e-6,
    )
    gx = jax.jit(jax.grad(lambda x: cut.apply({"params": params}, x).sum()))(x)
    np.testing.assert_array_equal(gx[:, : 12 - 3], 0.0)
    with pytest.raises(ValueError, match="tbptt"):
        adding_problem._tbptt(adding_problem.Config(tbptt=(3,)))
