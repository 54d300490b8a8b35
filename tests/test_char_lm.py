"""experiments.char_lm: one short end-to-end run; results.json has the issue's layout."""

import json

from jaxnets import runs


def test_quick_run_compares_lstm_with_ngrams(tmp_path):
    results = runs.run_experiment("char_lm", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {"lstm_bpc", "best_ngram_bpc", "best_n"} <= set(on_disk)
    val = {int(n): b for n, b in on_disk["ngram_validation_bpc"].items()}
    assert sorted(val) == [1, 2, 3, 4]
    assert on_disk["best_n"] == min(val, key=val.get)
    # more context helps a smoothed n-gram on English text, at least up to trigrams
    assert val[1] > val[2] > val[3]
    # a uniform guess over the vocabulary is the ceiling for any trained model here
    assert 0 < on_disk["best_ngram_bpc"] < 7.0 and 0 < on_disk["lstm_bpc"] < 7.0
    assert on_disk["improvement"] == 1 - on_disk["lstm_bpc"] / on_disk["best_ngram_bpc"]
    assert set(on_disk["samples"]) == {"0.5", "0.8", "1.0"}
    assert all(s.startswith("The ") and len(s) > 4 for s in on_disk["samples"].values())
    assert results["best_n"] == on_disk["best_n"]
    for plot in ("bpc", "loss"):
        assert (tmp_path / "r" / f"{plot}.png").exists()
