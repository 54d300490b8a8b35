"""experiments.text_classification: one short end-to-end run, the seeds, and claims()."""

import json

import pytest

from experiments import text_classification as tc
from jaxnets import runs


def test_quick_run_reports_models_and_baseline(tmp_path):
    runs.run_experiment("text_classification", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["class_names"] == ["fortunes", "limerick", "murphy", "zippy", "startrek"]
    assert set(on_disk["models"]) == {"bag_of_chars", "rnn", "bilstm"}
    seeds = tc.QUICK["seeds"]
    assert on_disk["seeds"] == list(range(seeds))
    for name, r in on_disk["models"].items():
        n = 1 if name == "bag_of_chars" else seeds  # the baseline is deterministic
        assert len(r["accuracy"]) == len(r["macro_f1"]) == n
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"] + r["macro_f1"])
    # one resumable sub-run per (model, seed)
    assert {p.name for p in (tmp_path / "r").iterdir() if p.is_dir()} == {
        f"{m}-seed{s}" for m in ("rnn", "bilstm") for s in range(seeds)
    }
    # 60 entries per class, 10% of each in test
    assert on_disk["test_size"] == 30
    # the order-free baseline already beats chance (0.2) on this small sample
    assert on_disk["models"]["bag_of_chars"]["accuracy"][0] > 0.3
    for plot in ("macro_f1", "confusion", "loss"):
        assert (tmp_path / "r" / f"{plot}.png").exists()


def test_seed_k_of_a_multi_seed_run_is_the_single_seed_run(tmp_path):
    """The seeds share one compiled trainer; seed 0's numbers must not depend on whether
    seeds 1.. follow (or on the sub-run layout), and the second seed must differ."""
    tiny = {"models": ("gru",), "steps": 6, "checkpoint_every": 6, "log_every": 3}
    one = runs.run_experiment(
        "text_classification", {**tiny, "seeds": 1}, tmp_path / "one", quick=True, progress=False
    )
    two = runs.run_experiment(
        "text_classification", {**tiny, "seeds": 2}, tmp_path / "two", quick=True, progress=False
    )
    a, b = one["models"]["gru"], two["models"]["gru"]
    assert b["accuracy"][0] == a["accuracy"][0] and b["macro_f1"][0] == a["macro_f1"][0]
    m1 = runs.read_jsonl(tmp_path / "one" / "gru" / "metrics.jsonl")
    m2 = runs.read_jsonl(tmp_path / "two" / "gru-seed0" / "metrics.jsonl")
    m3 = runs.read_jsonl(tmp_path / "two" / "gru-seed1" / "metrics.jsonl")
    losses = [[r["loss"] for r in m] for m in (m1, m2, m3)]
    assert losses[0] == losses[1]  # bitwise the same training
    assert losses[2] != losses[0]  # another seed trains another model


def _results(gru, lstm, rnn, bag, seeds):
    def model(accs):
        return {"accuracy": accs, "macro_f1": accs}

    return {
        "seeds": list(range(seeds)),
        "models": {
            "bag_of_chars": {**model([bag]), "deterministic": True},
            "rnn": model(rnn),
            "lstm": model(lstm),
            "gru": model(gru),
        },
    }


def test_claims_pass_and_fail_on_hand_made_results():
    cfg = tc.Config(**tc.TOUR)
    ok = _results([0.90, 0.91, 0.92], [0.86, 0.87, 0.88], [0.70, 0.72, 0.71], 0.85, 3)
    claims = tc.claims(ok, cfg)
    assert [c.holds for c in claims] == [True, True]
    assert {c.topic for c in claims} == {"RNN: many-to-one classification"}
    assert all(c.seeds == 3 for c in claims)
    # the sentence states the size that ran
    assert f"{cfg.steps} Adam steps" in claims[0].claim
    assert f"{cfg.max_chars} characters" in claims[0].claim
    # GRU 0.91 ± 0.006 vs bag 0.85: difference 0.06 > 2 SE 0.012
    assert "GRU 0.910 ± 0.006 vs bag of characters 0.850 ± 0.000" in claims[0].evidence

    # within 2 standard errors is not a win; one gated cell losing fails the second claim
    bad = _results([0.84, 0.86, 0.88], [0.70, 0.71, 0.72], [0.70, 0.72, 0.71], 0.85, 3)
    assert [c.holds for c in tc.claims(bad, cfg)] == [False, False]

    # a comparison needs 3 seeds
    with pytest.raises(ValueError, match="3 seeds"):
        tc.claims(_results([0.9, 0.9], [0.9, 0.9], [0.7, 0.7], 0.8, 2), cfg)


def test_claims_on_a_one_seed_full_run():
    cfg = tc.Config()
    full = _results([0.883], [0.832], [0.706], 0.848, 1)
    claims = tc.claims(full, cfg)
    assert [c.holds for c in claims] == [True, True]
    assert "no standard error" in claims[0].evidence
    assert "256 characters" in claims[0].claim
    # the LSTM below the tanh RNN fails the gated-vs-tanh claim
    assert not tc.claims(_results([0.883], [0.70], [0.706], 0.848, 1), cfg)[1].holds
