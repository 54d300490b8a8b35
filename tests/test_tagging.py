"""experiments.tagging: one short end-to-end run; results.json has the issue's layout; claims()."""

import json

import pytest

from experiments import tagging
from jaxnets import runs


def test_quick_run_reports_both_directions(tmp_path):
    runs.run_experiment("tagging", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    seeds = tagging.QUICK["seeds"]
    assert on_disk["seeds"] == list(range(seeds))
    assert {"unidirectional_f1", "bidirectional_f1"} <= set(on_disk)
    for name in ("unidirectional", "bidirectional"):
        r = on_disk["details"][name]
        assert len(r["word_f1"]) == len(r["boundary_f1"]) == seeds
        assert all(0.0 <= f <= 1.0 for f in r["word_f1"] + r["boundary_f1"])
        assert r["word_f1"] == on_disk[f"{name}_f1"]
        # the segmented examples keep the letters of the reference, only spaces differ
        for ref, seg in zip(on_disk["reference"], r["examples"], strict=True):
            assert ref.replace(" ", "") == seg.replace(" ", "")
        for s in range(seeds):
            assert (tmp_path / "r" / f"{name}-seed{s}" / "DONE").exists()
    assert on_disk["test_lines"] == 300
    assert (tmp_path / "r" / "f1.png").exists()


def _results(bi, uni):
    return {
        "seeds": list(range(len(bi))),
        "bidirectional_f1": bi,
        "unidirectional_f1": uni,
        "train_lines": 5000,
        "test_lines": 1000,
    }


def test_claims_pass_and_fail_on_hand_made_results():
    cfg = tagging.Config(**tagging.TOUR)
    (c,) = tagging.claims(_results([0.80, 0.82, 0.81], [0.70, 0.71, 0.69]), cfg)
    assert c.holds and c.seeds == 3 and c.topic == "Bidirectional vs unidirectional"
    assert f"{cfg.steps} Adam steps" in c.claim and "5,000 training lines" in c.claim
    assert "bidirectional 0.810 ± 0.006 vs unidirectional 0.700 ± 0.006" in c.evidence
    # ahead by less than 2 standard errors of the difference: not a win
    (c,) = tagging.claims(_results([0.72, 0.80, 0.76], [0.70, 0.74, 0.72]), cfg)
    assert not c.holds
    with pytest.raises(ValueError, match="3 seeds"):
        tagging.claims(_results([0.8, 0.8], [0.7, 0.7]), cfg)


def test_claims_on_a_one_seed_full_run():
    (c,) = tagging.claims(_results([0.879], [0.728]), tagging.Config())
    assert c.holds and "no standard error" in c.evidence and "3000 Adam steps" in c.claim
    (c,) = tagging.claims(_results([0.70], [0.728]), tagging.Config())
    assert not c.holds
