"""experiments.receptive_field: the QUICK run end to end, checked against closed forms."""

from jaxnets import runs


def test_quick_run_measures_the_vgg_claims(tmp_path):
    c = 8
    results = runs.run_experiment(
        "receptive_field", {"width": c, "steps": 10, "blocks": 1}, tmp_path / "r", quick=True,
        progress=False,
    )  # fmt: skip
    rf = results["receptive_field"]
    # Receptive fields from the gradient: 2 x 3x3 = 5x5, 3 x 3x3 = 7x7.
    assert rf["3x3x2"]["extent"] == rf["5x5"]["extent"] == [5, 5]
    assert rf["3x3x3"]["extent"] == rf["7x7"]["extent"] == [7, 7]
    # Unpadded maps shrink alike: h -> h - 4 and h -> h - 6.
    assert rf["3x3x2"]["valid_output"] == rf["5x5"]["valid_output"] == "15 -> 11"
    assert rf["3x3x3"]["valid_output"] == rf["7x7"]["valid_output"] == "15 -> 9"
    # Weights of C -> C stacks: 2*9*C^2, 25*C^2, 3*9*C^2, 49*C^2.
    assert [rf[n]["kernel_weights"] for n in ("3x3x2", "5x5", "3x3x3", "7x7")] == [
        18 * c * c, 25 * c * c, 27 * c * c, 49 * c * c,
    ]  # fmt: skip
    # Trained nets: same stem and head, so the parameter gap is the blocks' weight gap.
    t = results["training"]
    assert t["5x5"]["params"] - t["3x3x2"]["params"] == (25 - 18) * c * c - c - 2 * c
    for name in t:
        assert 0.0 <= t[name]["test_accuracy"] <= 1.0
    for claim in results["claims"].values():
        assert claim["same_receptive_field"] and claim["fewer_weights"]
    assert (tmp_path / "r" / "receptive_fields.png").exists()
    assert (tmp_path / "r" / "accuracy.png").exists()


def test_accuracy_gap_standard_error():
    from experiments.receptive_field import accuracy_gap

    gap = accuracy_gap([0.9, 0.92, 0.94], [0.95, 0.95, 0.95])
    # sample variance of (0.90, 0.92, 0.94) is 0.0004; the other has none: SE = sqrt(0.0004 / 3)
    assert abs(gap["accuracy_difference"] - (-0.03)) < 1e-12
    assert abs(gap["difference_se"] - (0.0004 / 3) ** 0.5) < 1e-12
    assert gap["within_noise"] is False  # |-0.03| > 2 * 0.0115
    assert accuracy_gap([0.9], [0.8])["within_noise"] is None


def test_train_examples_out_of_range_is_a_clear_error(tmp_path):
    import pytest

    from jaxnets import runs

    with pytest.raises(ValueError, match=r"train_examples must be in \[1, 1438\].*got 5000"):
        runs.run_experiment(
            "receptive_field", {"train_examples": 5000}, tmp_path / "r", quick=True,
            progress=False,
        )  # fmt: skip
