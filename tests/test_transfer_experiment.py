"""experiments.transfer: the quick run end to end (selection on validation, not test), the
settings, the validation split and the bar check."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import data, runs

exp = importlib.import_module("experiments.transfer")


def test_quick_run_end_to_end(tmp_path):
    results = runs.run_experiment("transfer", workdir=tmp_path / "r", quick=True, progress=False)
    cfg = exp.Config(**exp.QUICK)
    r = results["mnist_new_classes"]
    assert r["labels_per_class"] == [2] and r["network"] == "vgg"
    assert r["validation"] == 5 * cfg.val_per_class and r["test"] == 500
    assert r["train_pool"] == 2000 - r["validation"]
    for m in exp.METHODS:
        assert len(r[m]) == 1 and 0.0 <= r[m][0] <= 1.0
        seeds = np.asarray(r[f"{m}_seeds"])  # (labels, seeds)
        assert seeds.shape == (1, cfg.seeds)
        np.testing.assert_allclose(r[m][0], seeds.mean())
        np.testing.assert_allclose(r[f"{m}_se"][0], seeds.std(ddof=1) / np.sqrt(cfg.seeds))
        # the chosen point is the argmax of the validation accuracy (mean over seeds) of the
        # cell's grid, recomputed here from the stored grid
        cell = runs.RunDir(tmp_path / "r" / f"mnist_new_classes-{m}-2").results()
        val = np.asarray(cell["val"])  # (evals, seeds, lrs)
        assert val.shape == (cfg.steps // cfg.eval_every, cfg.seeds, len(cfg.lrs))
        e, k = np.unravel_index(np.argmax(val.mean(1)), val.shape[::2])
        chosen = r["chosen"][m][0]
        assert chosen == {"lr": pytest.approx(cfg.lrs[k]), "steps": (e + 1) * cfg.eval_every,
                          "val": pytest.approx(val.mean(1).max())}  # fmt: skip
        assert cell["train_size"] == 2 * 5
    assert r["new_groups"] == ["stage3", "head"]
    assert (tmp_path / "r" / "accuracy_mnist_new_classes.png").stat().st_size > 0
    assert set(results["bar"]["passed"]) == {"mnist_new_classes"}
    md = exp.report(results, runs.RunDir(tmp_path / "r"))
    assert "| gradual |" in md and "accuracy_mnist_new_classes.png" in md
    assert "The issue's bar is judged on settings" in md  # one setting ran: no verdict here
    (claim,) = exp.claims(results, cfg)  # 2 labels per class, 2 seeds
    ft, sc = r["finetune_seeds"][0], r["scratch_seeds"][0]
    d = np.subtract(ft, sc)
    assert claim.holds == (d.mean() > 2 * d.std(ddof=1) / np.sqrt(2)) and claim.seeds == 2
    assert claim.topic == "Transfer learning" and "2 label(s) per class" in claim.claim
    assert claim.key == "mnist_new_classes/2"  # the tour meets the full run's same cell by it


def test_settings_and_models():
    cfg = exp.Config()
    for name, shape, classes in (
        ("mnist_new_classes", (28, 28, 1), (5, 5)), ("mnist_to_digits", (28, 28, 1), (10, 10)),
        ("digits_to_mnist", (28, 28, 1), (10, 10)), ("mnist1d", (40, 1), (5, 5)),
    ):  # fmt: skip
        source, target = exp.load_setting(cfg, name)
        assert (source.num_classes, target.num_classes) == classes
        assert set(np.unique(source.y_train)) == set(range(classes[0]))
        assert set(np.unique(target.y_test)) == set(range(classes[1]))
        assert source.x_train.shape[1:] == target.x_test.shape[1:] == shape
        for network in exp.NETWORKS if len(shape) == 3 else ("vgg",):
            model = exp.make_model(cfg, network, target.num_classes, len(shape) - 1)
            logits = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.key(0), x)[0],
                                    jnp.zeros((2, *shape)))  # fmt: skip
            assert logits.shape == (2, target.num_classes)
            v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
            groups, new, keep = exp.make_groups(cfg, network)
            assert groups.labels(v["params"])  # every parameter is in a group
            assert new == ("stage3", "head") and "features/stage1" in keep
    # setting 1's target is digits 5-9 relabelled, real MNIST images
    full = data.load_mnist5k()
    _, target = exp.load_setting(cfg, "mnist_new_classes")
    np.testing.assert_array_equal(target.x_test[target.y_test == 2], full.x_test[full.y_test == 7])
    with pytest.raises(ValueError, match="setting"):
        exp.load_setting(cfg, "cifar")
    with pytest.raises(ValueError, match="new_stages"):
        exp.make_groups(exp.Config(new_stages=3), "vgg")
    with pytest.raises(ValueError, match="mnist-full.*data_dir"):
        exp.load_setting(exp.Config(data="mnist-full"), "mnist_new_classes")


def test_validation_split_is_disjoint_from_few_shot_pool_and_test():
    cfg = exp.Config(val_per_class=30)
    _, target = exp.load_setting(cfg, "mnist_to_digits")
    val, pool = exp.split_validation(cfg, target)
    assert np.bincount(target.y_train[val]).tolist() == [30] * 10
    assert not set(val) & set(pool) and len(val) + len(pool) == len(target.y_train)
    again, _ = exp.split_validation(cfg, target)
    np.testing.assert_array_equal(val, again)


def test_run_rejects_bad_config(tmp_path):
    for bad, match in (({"settings": ("cifar",)}, "unknown"), ({"methods": ("magic",)}, "unknown"),
                       ({"lrs": (0.0,)}, "lrs"), ({"eval_every": 7, "steps": 5}, "eval_every"),
                       ({"data": "emnist"}, "data"), ({"labels_per_class": (0,)}, "labels")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            exp.run(exp.Config(**bad), runs.RunDir(tmp_path / "x"))


def test_bar_check_closed_form():
    def entry(scratch, finetune, freeze, se, labels=(1, 2, 5, 10)):
        r = {"labels_per_class": list(labels)}
        for m, v in (("scratch", scratch), ("finetune", finetune), ("freeze", freeze),
                     ("per_group_lr", scratch)):  # fmt: skip
            r[m], r[f"{m}_se"] = [v] * len(labels), [se] * len(labels)
        return r

    # best method freeze: gain 0.10 >= 0.05 and > 2 * hypot(0.02, 0.02) = 0.057: passes at
    # 1, 2 and 5 labels; 10 labels is not part of the bar
    bar = exp.check_bar({"mnist_new_classes": entry(0.5, 0.55, 0.6, 0.02)})
    rows = bar["mnist_new_classes"]
    assert bar["passed"] == {"mnist_new_classes": True} and [
        c["labels_per_class"] for c in rows
    ] == [1, 2, 5]
    assert rows[0]["best"] == "freeze"
    np.testing.assert_allclose(rows[0]["se"], np.hypot(0.02, 0.02))
    # a large gain that is too noisy (2 SE = 0.113 > 0.10), or significant but under 5 points
    assert not exp.check_bar({"mnist_to_digits": entry(0.5, 0.5, 0.6, 0.04)})["passed"][
        "mnist_to_digits"
    ]
    assert not exp.check_bar({"mnist_to_digits": entry(0.5, 0.54, 0.54, 0.0)})["passed"][
        "mnist_to_digits"
    ]
    # the third setting and MNIST-1D are reported, not part of the bar
    assert exp.check_bar({"digits_to_mnist": entry(0.5, 0.6, 0.6, 0.0)})["passed"] == {}
    # two networks: each against its own scratch, and the best transfer cell of either
    # against the stronger scratch (the ResNet's weak scratch 0.3 does not count there)
    vgg = {**entry(0.55, 0.58, 0.58, 0.01), "network": "vgg"}
    res = {**entry(0.30, 0.59, 0.59, 0.01), "network": "resnet"}
    bar = exp.check_bar({"mnist_new_classes": vgg, "mnist_new_classes_resnet": res})
    assert bar["passed"] == {"mnist_new_classes": False, "mnist_new_classes_resnet": True}
    assert bar["passed_any_network"] == {"mnist_new_classes": False}  # 0.59 - 0.55 < 0.05
    row = bar["mnist_new_classes_any_network"][0]
    assert row["scratch"] == "vgg" and row["best"].endswith("(resnet)")
    np.testing.assert_allclose(row["gain"], 0.04)
    np.testing.assert_allclose(row["se"], np.hypot(0.01, 0.01))
    one = exp.check_bar({"mnist_new_classes": vgg})
    assert "passed_any_network" not in one


def test_mnist_full_reads_the_idx_files(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_data import write_mnist_dir

    write_mnist_dir(tmp_path, n_train=400, n_test=50, seed=3)
    cfg = exp.Config(data="mnist-full", data_dir=str(tmp_path))
    full = data.load_mnist(tmp_path)
    source, target = exp.load_setting(cfg, "mnist_new_classes")
    assert source.num_classes == target.num_classes == 5
    low = np.isin(full.y_train, range(5))
    np.testing.assert_array_equal(source.x_train, full.x_train[low])
    np.testing.assert_array_equal(target.y_test, full.y_test[full.y_test >= 5] - 5)
    src, tgt = exp.load_setting(cfg, "digits_to_mnist")
    assert src.name == "digits" and tgt.x_train.shape == full.x_train.shape


def test_claims_fine_tune_against_scratch_paired():
    def entry(ft, sc):
        return {"labels_per_class": [1, 10], "finetune": [0, 0], "scratch": [0, 0],
                "finetune_seeds": [ft, ft], "scratch_seeds": [sc, sc]}  # fmt: skip

    cfg = exp.Config()
    # every seed gains 0.05 or 0.06: a small, consistent gain is a clear paired win
    (c,) = exp.claims({"mnist_new_classes": entry([0.45, 0.56, 0.66], [0.4, 0.5, 0.6])}, cfg)
    assert c.holds and "2 SE" in c.evidence and "paired" in c.evidence  # 10 labels: not a claim
    # the same means, but gains of +0.25, -0.1, 0.0: within noise
    (c,) = exp.claims({"mnist_to_digits": entry([0.65, 0.4, 0.6], [0.4, 0.5, 0.6])}, cfg)
    assert not c.holds and c.claim.startswith("MNIST -> 8x8 digits")


def test_bar_check_paired_standard_error():
    # per-seed accuracies: the arms differ by exactly 0.06 on every seed, while the seeds
    # spread by +-0.1: the unpaired SE is large, the paired one zero
    seeds = np.array([0.4, 0.5, 0.6, 0.7, 0.8])
    r = {"labels_per_class": [1]}
    for m, shift in (("scratch", 0.0), ("finetune", 0.06), ("freeze", 0.0), ("per_group_lr", 0.0)):
        a = seeds + shift
        r[m], r[f"{m}_se"], r[f"{m}_seeds"] = [a.mean()], [a.std(ddof=1) / np.sqrt(5)], [a.tolist()]
    bar = exp.check_bar({"mnist_new_classes": r})
    (row,) = bar["mnist_new_classes"]
    assert row["best"] == "finetune" and not row["passed"]
    np.testing.assert_allclose(row["se"], np.hypot(*[seeds.std(ddof=1) / np.sqrt(5)] * 2))
    np.testing.assert_allclose(row["se_paired"], 0.0, atol=1e-12)
    assert row["passed_paired"] and bar["passed_paired"] == {"mnist_new_classes": True}
