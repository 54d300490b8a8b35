"""experiments.degradation: one short end-to-end run; results.json has the issue's layout;
claims() on hand-made results; a seed of a multi-seed run is the single-seed run."""

import json

import pytest

from jaxnets import runs


def test_quick_run_writes_errors_and_gradient_norms(tmp_path):
    runs.run_experiment(
        "degradation", {"depths": (8,), "steps": 10, "warmup_steps": 2, "seeds": 2},
        tmp_path / "r", quick=True, progress=False,
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(on_disk) == {"plain8", "resnet8", "config", "train_examples"}
    assert on_disk["train_examples"] == 512
    for name in ("plain8", "resnet8"):
        r = on_disk[name]
        assert r["seeds"] == [0, 1] and len(r["train_errors"]) == 2
        assert r["train_error"] == pytest.approx(sum(r["train_errors"]) / 2)
        assert all(0.0 <= e <= 1.0 for e in r["train_errors"] + r["test_errors"])
        # depth 8 = stem + 3 stages x 1 block x 2 convs + the Linear head: 7 convs
        assert r["conv_layers"] == 7 and len(r["grad_norms_at_init"]) == 7
        assert all(g > 0 for g in r["grad_norms_at_init"])
        no_bn = r["grad_norms_at_init_no_bn"]  # inference-mode BN at init: no normalisation
        assert len(no_bn) == 7 and all(g > 0 for g in no_bn) and no_bn != r["grad_norms_at_init"]
    # Option A shortcuts are parameter-free: the twins have the same parameter count.
    assert on_disk["plain8"]["params"] == on_disk["resnet8"]["params"]
    for plot in ("train_error", "grad_norms", "errors"):
        assert (tmp_path / "r" / f"{plot}.png").exists()
    # Seed 1 of the two-seed run is exactly what a one-seed run from seed 1 computes (same
    # init key, same batch order; no probe there): the numbers do not depend on how the
    # seeds are grouped or on the probe.
    alone = runs.run_experiment(
        "degradation",
        {"depths": (8,), "steps": 10, "warmup_steps": 2, "seed": 1, "seeds": 1,
         "grad_probe": False},
        tmp_path / "one", quick=True, progress=False,
    )  # fmt: skip
    for name in ("plain8", "resnet8"):
        assert "grad_norms_at_init" not in alone[name]
        seed1 = json.loads((tmp_path / "r" / f"{name}-seed1" / "results.json").read_text())
        for key in ("train_error", "test_error", "train_loss"):
            assert alone[name][key] == seed1[key]
        assert alone[name]["train_errors"] == [on_disk[name]["train_errors"][1]]
    assert not (tmp_path / "one" / "grad_norms.png").exists()


def _results(errors: dict, depths=(20, 56)) -> dict:
    return {
        name: {"train_errors": errs, "train_error": sum(errs) / len(errs)}
        for name, errs in errors.items()
    } | {"train_examples": 1000, "config": {"depths": list(depths)}}


def test_claims_pass_and_fail_on_hand_made_results():
    from experiments.degradation import Config, claims

    cfg = Config(seeds=3, steps=250, train_examples=1000)
    good = _results({
        "plain20": [0.04, 0.05, 0.06], "plain56": [0.40, 0.45, 0.50],
        "resnet20": [0.00, 0.01, 0.02], "resnet56": [0.01, 0.02, 0.03],
    })  # fmt: skip
    out = claims(good, cfg)
    assert [c.holds for c in out] == [True, True, True]
    assert all(c.topic == "ResNet: residual vs plain depth" and c.seeds == 3 for c in out)
    assert "1000 training examples, 250 SGD steps, width 8, 3 seeds" in out[0].claim
    # plain56 0.45 ± 0.029 vs plain20 0.05 ± 0.0058: difference 0.40 > 2 SE
    assert "plain20 0.050 ± 0.006 vs plain56 0.450 ± 0.029" in out[0].evidence
    # resnet56 worse than resnet20 by 0.01, 2 SE of the difference 2 * sqrt(2) * 0.0058 = 0.016
    assert "difference 0.010, 2 SE 0.016" in out[2].evidence
    bad = _results({
        "plain20": [0.30, 0.40, 0.50], "plain56": [0.05, 0.10, 0.15],  # deeper is better
        "resnet20": [0.00, 0.00, 0.00], "resnet56": [0.10, 0.11, 0.12],  # deeper is worse
    })  # fmt: skip
    assert [c.holds for c in claims(bad, cfg)] == [False, False, False]
    two = {"plain20": [0.0, 0.1], "plain56": [0.4, 0.5], "resnet20": [0, 0], "resnet56": [0, 0]}
    with pytest.raises(ValueError, match="needs >= 3 seeds"):  # 2 seeds: no claim either way
        claims(_results(two), cfg)


def test_claims_on_a_one_seed_full_run_say_no_standard_error():
    from experiments.degradation import Config, claims

    full = _results({"plain20": [0.0], "plain56": [0.271], "resnet20": [0.0], "resnet56": [0.0]})
    out = claims(full, Config())
    assert [c.holds for c in out] == [True, True, True]
    assert all("no standard error" in c.evidence and c.seeds == 1 for c in out)
    assert "3000 SGD steps" in out[0].claim and "1 seed)" in out[0].claim
    assert claims(_results({"plain8": [0.1], "resnet8": [0.1]}), Config(depths=(8,))) == []


def test_data_options():
    from experiments.degradation import Config, load

    digits = load(Config(dataset="digits", train_examples=100))
    assert digits.x_train.shape == (100, 16, 16, 1) and digits.num_classes == 10
    mnist1d = load(Config())
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"train_examples must be in \[1, 4000\].*got 5000"):
        runs.run_experiment(
            "degradation", {"train_examples": 5000}, tmp_path / "r", quick=True, progress=False
        )
    with pytest.raises(ValueError, match=r"seeds must be an int >= 1, got 0"):
        runs.run_experiment("degradation", {"seeds": 0}, tmp_path / "s", quick=True)
