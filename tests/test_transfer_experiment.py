"""experiments.transfer: the quick run end to end, the settings, and the bar check."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import runs, transfer

exp = importlib.import_module("experiments.transfer")


def test_quick_run_end_to_end(tmp_path):
    results = runs.run_experiment("transfer", workdir=tmp_path / "r", quick=True, progress=False)
    r = results["digits"]
    assert r["labels_per_class"] == [5] and r["train_sizes"] == [25]
    for m in transfer.METHODS:
        assert len(r[m]) == 1 and 0.0 <= r[m][0] <= 1.0
        assert r[f"{m}_std"] == [0.0]  # one seed
    assert r["new_groups"] == ["stage3", "head"]
    assert sum(g["params"] for g in r["groups"]) == r["params"]
    # the pretraining checkpoint is a real orbax checkpoint that load_checkpoint reads
    pre = transfer.load_checkpoint(tmp_path / "r" / "digits-pretrain-seed0")
    assert set(pre) == {"params", "batch_stats"}
    assert (tmp_path / "r" / "accuracy_digits.png").stat().st_size > 0
    md = exp.report(results, runs.RunDir(tmp_path / "r"))
    assert "| freeze |" in md and "accuracy_digits.png" in md and "Bar" in md


def test_settings_and_models():
    for name, shape in (("digits", (8, 8, 1)), ("mnist1d", (40, 1))):
        source, target = exp.load_setting(name)
        assert set(np.unique(source.y_train)) == set(range(5))
        assert set(np.unique(target.y_train)) == set(range(5))  # 5-9 relabelled
        assert source.x_train.shape[1:] == target.x_test.shape[1:] == shape
        model = exp.make_model(exp.Config(), name)
        logits = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.key(0), x)[0],
                                jnp.zeros((2, *shape)))  # fmt: skip
        assert logits.shape == (2, 5)
    with pytest.raises(ValueError, match="dataset"):
        exp.load_setting("cifar")
    with pytest.raises(ValueError, match="new_stages"):
        exp.make_groups(exp.Config(new_stages=3))


def test_bar_check_closed_form():
    def entry(scratch, finetune, freeze, sd):
        r = {"labels_per_class": [5, 20, 50, "all"]}
        for m, v in (("scratch", scratch), ("finetune", finetune), ("freeze", freeze),
                     ("per_group_lr", finetune)):  # fmt: skip
            r[m], r[f"{m}_std"] = [v] * 4, [sd] * 4
        return r

    # gain 0.15 > 2 * hypot(0.03, 0.03) = 0.085 and >= 0.10: passes; label counts > 20 ignored
    bar = exp.check_bar({"digits": entry(0.6, 0.75, 0.75, 0.03)})
    assert bar["passed"] and [c["labels_per_class"] for c in bar["digits"]["freeze"]] == [5, 20]
    np.testing.assert_allclose(bar["digits"]["finetune"][0]["std"], np.hypot(0.03, 0.03))
    # big gain but too noisy (2 std = 0.17 > 0.15), or significant but under 10 points
    assert not exp.check_bar({"digits": entry(0.6, 0.75, 0.75, 0.06)})["passed"]
    assert not exp.check_bar({"digits": entry(0.6, 0.69, 0.75, 0.0)})["passed"]
    # only digits decides; MNIST-1D is reported alongside
    assert not exp.check_bar({"mnist1d": entry(0.6, 0.75, 0.75, 0.0)})["passed"]
