"""experiments.translation: one short end-to-end run; results.json has the issue's layout;
claims() on hand-made results; a seed of a several-seed run equals that seed run alone."""

import json
import math

import numpy as np
import pytest

from experiments import translation
from experiments.tour import NOTES_TOPICS
from jaxnets import runs, train


def test_quick_run_reports_g2p_and_korean(tmp_path):
    runs.run_experiment("translation", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(on_disk["g2p"]) == {"attention", "no_attention"}
    for r in on_disk["g2p"].values():
        assert r["seeds"] == [0] and len(r["wer"]) == len(r["per"]) == 1
        assert 0.0 <= r["wer"][0] <= 1.0 and 0.0 <= r["per"][0]
        assert r["test_words"] == 200
    # the attention examples carry their weights: one row per output step (+ EOS) over
    # the letters of the word, each row a distribution
    for e in on_disk["g2p"]["attention"]["examples"]:
        w = np.asarray(e["weights"])
        assert w.shape == (min(len(e["output"].split()) + 1, 29), len(e["word"]))
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-3)
    assert all("weights" not in e for e in on_disk["g2p"]["no_attention"]["examples"])
    ko = on_disk["num2words_ko"]
    assert 0.0 <= ko["accuracy"] <= 1.0 and ko["test_numbers"] == 100
    assert all(e["reference"] for e in ko["examples"])
    for plot in ("attention", "g2p_error_rates", "g2p_loss"):
        assert (tmp_path / "r" / f"{plot}.png").exists()


# three seq2seq compilations and trainings: about 3 min at load 12 (char_lm's test of the
# same seed threading runs in the default suite)
@pytest.mark.slow
def test_seeds_run_one_after_another_equal_one_seed_runs(tmp_path):
    tiny = {"steps": 12, "max_train_words": 600, "max_eval_words": 40, "korean": False}
    tiny |= {"compare_no_attention": False, "checkpoint_every": 12, "log_every": 4}
    both = runs.run_experiment(
        "translation", tiny | {"seeds": 2}, workdir=tmp_path / "two", quick=True, progress=False
    )
    alone = runs.run_experiment(
        "translation", tiny | {"seed": 1}, workdir=tmp_path / "one", quick=True, progress=False
    )
    assert "num2words_ko" not in both and set(both["g2p"]) == {"attention"}
    two, one = both["g2p"]["attention"], alone["g2p"]["attention"]
    assert two["seeds"] == [0, 1] and one["seeds"] == [1]
    assert two["wer"][1] == one["wer"][0] and two["per"][1] == one["per"][0]
    a = runs.RunDir(tmp_path / "two").sub("g2p-attention-seed1").metrics()
    b = runs.RunDir(tmp_path / "one").sub("g2p-attention").metrics()
    assert train.strip_timing(a) == train.strip_timing(b)
    # and seed 0 is another network (its loss curve differs)
    c = runs.RunDir(tmp_path / "two").sub("g2p-attention").metrics()
    assert train.strip_timing(c) != train.strip_timing(a)
    report = translation.report(both, runs.RunDir(tmp_path / "two"))
    assert "not run in this configuration" in report and "2 seeds)" in report


def _results(att, none):
    arm = lambda wer: {"wer": wer, "seeds": list(range(len(wer)))}  # noqa: E731
    return {
        "g2p": {"attention": arm(att), "no_attention": arm(none)},
        "train_words": 30_000,
        "test_words": 1_000,
    }


def test_claims_attention_beats_no_attention_by_two_standard_errors():
    cfg = translation.Config(**translation.TOUR)
    (c,) = translation.claims(_results([0.40, 0.42, 0.41], [0.50, 0.52, 0.51]), cfg)
    assert c.topic in NOTES_TOPICS and c.holds and c.seeds == 3
    assert f"{cfg.steps} Adam steps" in c.claim and "1,000 test words, 3 seeds" in c.claim
    assert "of at most 8 letters" in c.claim
    se = math.sqrt(2) * 1.0 / math.sqrt(3)  # each side: sd 1 point over 3 seeds
    assert "41.0 ± 0.6" in c.evidence and f"2 SE {2 * se:.1f}" in c.evidence
    # better means that overlap within 2 SE do not count: 45 vs 47, SE of the difference 1.6
    (close,) = translation.claims(_results([0.43, 0.45, 0.47], [0.45, 0.47, 0.49]), cfg)
    assert not close.holds
    # the other way round fails
    (worse,) = translation.claims(_results([0.50, 0.52, 0.51], [0.40, 0.42, 0.41]), cfg)
    assert not worse.holds


def test_claims_on_a_one_seed_full_run():
    cfg = translation.Config()
    res = _results([0.258], [0.297])  # the README's full run
    res["test_words"] = 6246
    (c,) = translation.claims(res, cfg)
    assert c.holds and c.seeds == 1 and "no standard error" in c.evidence
    assert "12000 Adam steps" in c.claim and "hidden 256" in c.claim and "1 seed" in c.claim
    assert not translation.claims(_results([0.30], [0.297]), cfg)[0].holds
