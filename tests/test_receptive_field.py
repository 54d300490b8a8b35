"""experiments.receptive_field: the QUICK run end to end, checked against closed forms."""

import pytest

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
    from experiments.receptive_field import Config, claims

    cfg = Config(width=c, steps=10, blocks=1, seeds=1)
    out = claims(results, cfg)
    assert [cl.holds for cl in out[:2]] == [True, True]  # closed forms: deterministic
    assert out[0].claim.startswith("2 stacked 3x3 convs see the same 5x5 receptive field")
    assert "18 C^2 < 25 C^2 weights (C = 8)" in out[0].claim
    assert "27 C^2 < 49 C^2" in out[1].claim
    # one seed (a quick run): the accuracy claims are on the means, and say so
    assert all("no standard error" in cl.evidence and cl.seeds == 1 for cl in out[2:])
    assert "10 adam steps, width 8, 1 seed)" in out[2].claim
    assert (tmp_path / "r" / "receptive_fields.png").exists()
    assert (tmp_path / "r" / "accuracy.png").exists()


def test_tour_configuration_checks_the_untrained_claims_only(tmp_path):
    from experiments.receptive_field import TOUR, Config, claims, report

    c = 8
    results = runs.run_experiment(
        "receptive_field", {**TOUR, "width": c}, tmp_path / "r", progress=False
    )
    assert results["training"] == {} and "claims" not in results
    rf = results["receptive_field"]
    assert rf["3x3x3"]["extent"] == rf["7x7"]["extent"] == [7, 7]
    out = claims(results, Config(**TOUR, width=c))
    assert len(out) == 2 and all(cl.holds and cl.seeds is None for cl in out)
    md = report(results, runs.RunDir(tmp_path / "r"))
    assert "No training in this run (`--no-train`)" in md and "accuracy.png" not in md
    assert (tmp_path / "r" / "receptive_fields.png").exists()
    assert not (tmp_path / "r" / "accuracy.png").exists()


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


def test_closed_forms_of_the_notes():
    from experiments.receptive_field import closed_form

    # The notes: two 3x3 = one 5x5 receptive field with 2*9*C^2 vs 25*C^2 weights; three 3x3
    # = 7x7 with 27*C^2 vs 49*C^2 (h -> h-2 -> h-4 is h -> h-4).
    c = 16
    assert closed_form(2, 3, c) == (5, 2 * 9 * c * c) and closed_form(1, 5, c) == (5, 25 * c * c)
    assert closed_form(3, 3, c) == (7, 27 * c * c) and closed_form(1, 7, c) == (7, 49 * c * c)


def _results(accs: dict, c: int = 16, extents=None) -> dict:
    from experiments.receptive_field import VARIANTS

    extents = extents or {"3x3x2": 5, "5x5": 5, "3x3x3": 7, "7x7": 7}
    rf = {
        n: {"extent": [extents[n]] * 2, "kernel_weights": layers * k * k * c * c}
        for n, (layers, k) in VARIANTS.items()
    }
    params = {"3x3x2": 37_962, "5x5": 52_106, "3x3x3": 47_000, "7x7": 101_258}
    training = {n: {"test_accuracies": a, "params": params[n]} for n, a in accs.items()}
    return {"width": c, "train_examples": 200, "receptive_field": rf, "training": training}


def test_claims_pass_and_fail_on_hand_made_results():
    from experiments.receptive_field import Config, claims

    cfg = Config(seeds=3, width=16, steps=150, train_examples=200)
    good = _results({
        "3x3x2": [0.89, 0.90, 0.88], "5x5": [0.88, 0.89, 0.885],  # the stack ahead
        "3x3x3": [0.85, 0.87, 0.89], "7x7": [0.88, 0.89, 0.885],  # behind, within 2 SE
    })  # fmt: skip
    out = claims(good, cfg)
    assert [c.holds for c in out] == [True, True, True, True]
    assert all(c.topic == "VGG: stacked 3x3 convolutions" for c in out)
    assert [c.seeds for c in out] == [None, None, 3, 3]
    assert "200 training images, 150 adam steps, width 16, 3 seeds" in out[3].claim
    # 7x7 0.885 ± 0.0029 vs 3x3x3 0.870 ± 0.0115: its lead 0.015 is within 2 SE = 0.024
    assert "difference 0.015, 2 SE 0.024" in out[3].evidence
    bad = _results({
        "3x3x2": [0.80, 0.81, 0.79], "5x5": [0.88, 0.89, 0.885],  # clearly less accurate
        "3x3x3": [0.85, 0.87, 0.89], "7x7": [0.88, 0.89, 0.885],
    }, extents={"3x3x2": 5, "5x5": 5, "3x3x3": 7, "7x7": 5})  # fmt: skip
    # 7x7's receptive field measured as 5x5: the deterministic claim fails
    assert [c.holds for c in claims(bad, cfg)] == [True, False, False, True]
    assert "5x5 0.885 ± 0.003 vs 3x3x2 0.800 ± 0.006" in claims(bad, cfg)[2].evidence
    with pytest.raises(ValueError, match="needs >= 3 seeds"):  # 2 seeds: no claim either way
        claims(_results({n: [0.9, 0.8] for n in ("3x3x2", "5x5", "3x3x3", "7x7")}), cfg)
