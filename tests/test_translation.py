"""experiments.translation: one short end-to-end run; results.json has the issue's layout."""

import json

import numpy as np

from jaxnets import runs


def test_quick_run_reports_g2p_and_korean(tmp_path):
    runs.run_experiment("translation", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(on_disk["g2p"]) == {"attention", "no_attention"}
    for r in on_disk["g2p"].values():
        assert 0.0 <= r["wer"] <= 1.0 and 0.0 <= r["per"]
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
