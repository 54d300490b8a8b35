"""experiments.text_classification: one short end-to-end run."""

import json

from jaxnets import runs


def test_quick_run_reports_models_and_baseline(tmp_path):
    runs.run_experiment("text_classification", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["class_names"] == ["fortunes", "limerick", "murphy", "zippy", "startrek"]
    assert set(on_disk["models"]) == {"bag_of_chars", "rnn", "bilstm"}
    for r in on_disk["models"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
    # 60 entries per class, 10% of each in test
    assert on_disk["test_size"] == 30
    # the order-free baseline already beats chance (0.2) on this small sample
    assert on_disk["models"]["bag_of_chars"]["accuracy"] > 0.3
    for plot in ("macro_f1", "confusion", "loss"):
        assert (tmp_path / "r" / f"{plot}.png").exists()
