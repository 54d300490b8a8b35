"""experiments.degradation: one short end-to-end run; results.json has the issue's layout."""

import json

from jaxnets import runs


def test_quick_run_writes_errors_and_gradient_norms(tmp_path):
    results = runs.run_experiment(
        "degradation", {"depths": (8,), "steps": 10, "warmup_steps": 2}, tmp_path / "r",
        quick=True, progress=False,
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(on_disk) == {"plain8", "resnet8", "claims"}
    for name in ("plain8", "resnet8"):
        r = on_disk[name]
        assert 0.0 <= r["train_error"] <= 1.0 and 0.0 <= r["test_error"] <= 1.0
        # depth 8 = stem + 3 stages x 1 block x 2 convs + the Linear head: 7 convs
        assert r["conv_layers"] == 7 and len(r["grad_norms_at_init"]) == 7
        assert all(g > 0 for g in r["grad_norms_at_init"])
        no_bn = r["grad_norms_at_init_no_bn"]  # inference-mode BN at init: no normalisation
        assert len(no_bn) == 7 and all(g > 0 for g in no_bn) and no_bn != r["grad_norms_at_init"]
    # Option A shortcuts are parameter-free: the twins have the same parameter count.
    assert on_disk["plain8"]["params"] == on_disk["resnet8"]["params"]
    assert results["claims"]["dataset"] == "mnist1d"
    for plot in ("train_error", "grad_norms", "errors"):
        assert (tmp_path / "r" / f"{plot}.png").exists()


def test_data_options():
    from experiments.degradation import Config, load

    digits = load(Config(dataset="digits", train_examples=100))
    assert digits.x_train.shape == (100, 16, 16, 1) and digits.num_classes == 10
    mnist1d = load(Config())
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)


def test_train_examples_beyond_the_training_set_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"train_examples must be in \[1, 4000\].*got 5000"):
        runs.run_experiment(
            "degradation", {"train_examples": 5000}, tmp_path / "r", quick=True, progress=False
        )
