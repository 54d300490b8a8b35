"""experiments.tagging: one short end-to-end run; results.json has the issue's layout."""

import json

from jaxnets import runs


def test_quick_run_reports_both_directions(tmp_path):
    runs.run_experiment("tagging", workdir=tmp_path / "r", quick=True, progress=False)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {"unidirectional_f1", "bidirectional_f1"} <= set(on_disk)
    for name in ("unidirectional", "bidirectional"):
        r = on_disk["details"][name]
        assert 0.0 <= r["word_f1"] <= 1.0 and 0.0 <= r["boundary_f1"] <= 1.0
        assert r["word_f1"] == on_disk[f"{name}_f1"]
        # the segmented examples keep the letters of the reference, only spaces differ
        for ref, seg in zip(on_disk["reference"], r["examples"], strict=True):
            assert ref.replace(" ", "") == seg.replace(" ", "")
    assert on_disk["test_lines"] == 300
    assert (tmp_path / "r" / "f1.png").exists()
