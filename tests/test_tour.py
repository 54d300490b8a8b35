"""`python -m experiments` lists experiments; the tour runs them and writes REPORT.md."""

import dataclasses
import importlib
import json
import types

import pytest

from experiments import tour

listing = importlib.import_module("experiments.__main__")


def test_listing_names_demo_with_its_description(capsys):
    listing.main()
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("demo "))
    assert "GRU learns the sign of a noisy running sum" in line
    names = [m.__name__ for m in listing.discover()]
    assert "experiments.tour" not in names and "experiments.__main__" not in names


def test_demo_quick_end_to_end_and_tour_report(tmp_path):
    out = tmp_path / "tour"
    assert tour.main(["--quick", "--only", "demo", "--out", str(out), "--no-progress"]) == 0
    report = (out / "REPORT.md").read_text()
    assert "| [demo](#demo) | ok |" in report
    assert "![loss](demo/loss.png)" in report and (out / "demo" / "loss.png").exists()
    results = json.loads((out / "demo" / "results.json").read_text())
    assert 0.8 <= results["test_accuracy"] <= 1.0  # chance is 0.5; QUICK reaches ~0.95
    for f in ("config.json", "metrics.jsonl", "DONE"):
        assert (out / "demo" / f).exists()
    assert (out / "demo" / "checkpoints" / "60").is_dir()
    # a second tour reuses the finished run instead of training again
    _, entries = tour.run_tour(out, quick=True, only=["demo"], progress=False)
    assert entries[0]["reused"] and entries[0]["results"] == results


def _fake(name, fail):
    mod = types.ModuleType(f"experiments.{name}", f"Fake {name}.")

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 0

    def run(cfg, run_dir):
        if fail:
            raise ValueError("boom from " + name)
        return {"x": 1}

    mod.Config, mod.run, mod.QUICK, mod.TOUR = Config, run, {}, {}
    mod.report = lambda r, d: f"x = {r['x']}"
    return mod


def test_a_failing_experiment_does_not_stop_the_tour(tmp_path):
    mods = [_fake("bad", True), _fake("good", False)]
    report, entries = tour.run_tour(tmp_path, modules=mods, progress=False)
    assert [e["status"] for e in entries] == ["failed", "ok"]
    text = report.read_text()
    assert "**FAILED**" in text and "boom from bad" in text and "x = 1" in text


def test_unknown_only_name_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tour.main(["--only", "nosuch", "--out", str(tmp_path)])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err


def test_plot_helpers_write_pngs_and_check_shapes(tmp_path):
    import numpy as np

    from jaxnets import plots

    recs = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}, {"step": 3, "loss": 1.0}]
    steps, vals = plots.series(recs, "loss")
    assert steps.tolist() == [1, 3] and vals.tolist() == [2.0, 1.0]
    paths = [
        plots.metric_curves({"a": recs, "b": recs}, tmp_path / "m.png"),
        plots.lines([1, 2, 3], {"x": [1, 2, 3]}, tmp_path / "l.png", bands={"x": [0.1] * 3}),
        plots.bars({"cnn": 0.9, "gru": 0.8}, tmp_path / "b.png", reference={"cnn": 0.94}),
        plots.heatmap(np.arange(6.0).reshape(2, 3), tmp_path / "h.png", log=True),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="series 'x' has shape"):
        plots.lines([1, 2], {"x": [1, 2, 3]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="2-D"):
        plots.heatmap(np.zeros(3), tmp_path / "bad.png")


def test_a_skipped_experiment_is_reported_and_rechecked_next_tour(tmp_path):
    calls = []
    mod = _fake("needs_data", False)

    def run(cfg, run_dir):
        calls.append(1)
        return {"skipped": "the data set is not on disk"} if len(calls) == 1 else {"x": 2}

    mod.run = run
    report, entries = tour.run_tour(tmp_path, modules=[mod], progress=False)
    assert entries[0]["status"] == "skipped"
    text = report.read_text()
    assert "| skipped |" in text and "Skipped: the data set is not on disk" in text
    # the data appeared: the next tour runs the experiment instead of reusing the skip
    report, entries = tour.run_tour(tmp_path, modules=[mod], progress=False)
    assert entries[0]["status"] == "ok" and entries[0]["results"] == {"x": 2} and len(calls) == 2
    assert "x = 2" in report.read_text()
