"""`python -m experiments` lists experiments; the tour runs them and writes REPORT.md."""

import dataclasses
import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from experiments import tour
from jaxnets import runs

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


def test_parallel_tour_forks_workers_and_reports_their_runs(tmp_path):
    out = tmp_path / "tour"
    cmd = [sys.executable, "-m", "experiments.tour", "--quick", "--only", "demo,cifar10",
           "--out", str(out), "--no-progress", "--jobs", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[tour] demo: finished in" in r.stderr and "[tour] cifar10: finished in" in r.stderr
    report = (out / "REPORT.md").read_text()
    assert "| [demo](#demo) | ok |" in report and "| [cifar10](#cifar10) | skipped |" in report
    assert "reused from an earlier tour" not in report
    assert (out / "demo" / "DONE").exists() and "demo" in (out / "logs" / "demo.log").read_text()


def test_parallel_tour_without_fork_starts_worker_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(tour, "_can_fork", lambda: False)
    out = tmp_path / "tour"
    report, entries = tour.run_tour(out, quick=True, only=["demo"], jobs=2, progress=False)
    assert entries[0]["status"] == "ok" and not entries[0]["reused"]
    assert "--worker" not in (out / "logs" / "demo.log").read_text()  # its output, not an error
    assert (out / "demo" / "DONE").exists()
    with pytest.raises(ValueError, match="jobs: expected an integer >= 1, got 0"):
        tour.run_tour(out, quick=True, only=["demo"], jobs=0)


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


def _claiming(name, verdicts):
    """A fake experiment whose claims() returns one claim per (topic index, holds)."""
    mod = _fake(name, False)

    @dataclasses.dataclass(frozen=True)
    class Config:
        seed: int = 0
        steps: int = 10
        sizes: tuple = (1, 2)

    def claims(results, cfg):
        return [
            runs.Claim(tour.NOTES_TOPICS[i], f"claim {i} at {cfg.steps} steps", ok, f"x={i}", 3)
            for i, ok in verdicts
        ]

    mod.Config, mod.claims = Config, claims
    return mod


def test_claims_table_lists_every_topic_with_tour_and_full_verdicts(tmp_path, monkeypatch):
    full = tmp_path / "full_runs.json"
    full.write_text(json.dumps({"good": {
        "command": "python -m experiments.good --steps 99", "date": "2026-01-02",
        "runtime_s": 125.0, "source": "results.json of runs/good/x",
        "claims": [{"topic": tour.NOTES_TOPICS[0], "claim": "claim 0 at 99 steps",
                    "holds": True, "evidence": "x=full", "seeds": 1},
                   {"topic": tour.NOTES_TOPICS[0], "claim": "trained claim at 99 steps",
                    "holds": False, "evidence": "y=full", "seeds": 3}],
    }}))  # fmt: skip
    monkeypatch.setattr(tour, "FULL_RUNS", full)
    mod = _claiming("good", [(0, True), (1, False)])
    mod.TOUR = {"steps": 4}
    report, entries = tour.run_tour(tmp_path / "t", modules=[mod], progress=False)
    text = report.read_text()
    assert "## The notes' claims: 1 of 2 checks pass at tour size" in text
    rows = [r for r in text.splitlines() if "| claim 0 " in r or "| claim 1 " in r]
    assert rows[0].startswith(
        f"| {tour.NOTES_TOPICS[0]} | claim 0 at 4 steps | [good](#good) | pass"
    )
    assert rows[0].endswith("| pass: x=full |")
    # a claim only the full run checks gets its own row, not counted at tour size
    assert (
        f"| {tour.NOTES_TOPICS[0]} | trained claim at 99 steps | [good](#good) | full size only "
        "| | FAIL: y=full |"
    ) in text
    assert rows[1].startswith(f"| {tour.NOTES_TOPICS[1]} | claim 1 at 4 steps |")
    assert "**FAIL**" in rows[1] and rows[1].endswith("| not recorded |")
    for topic in tour.NOTES_TOPICS[2:]:  # every topic of the notes has a row
        assert f"| {topic} | no experiment checked this topic in this tour |" in text
    # the section says which size the reader looks at, and quotes the full run
    assert "**You are reading the tour-size run**: `python -m experiments.good --steps 4`" in text
    assert "**Full-size run** (recorded 2026-01-02, 2.1 min" in text
    assert "`python -m experiments.good --steps 99`" in text


def test_keyed_claims_meet_the_full_claim_with_the_same_key(tmp_path, monkeypatch):
    topic = tour.NOTES_TOPICS[2]
    full = tmp_path / "full_runs.json"
    full.write_text(json.dumps({"keyed": {
        "command": "python -m experiments.keyed", "date": "2026-01-02", "runtime_s": 5.0,
        "claims": [{"topic": topic, "claim": f"cell {n} at full size", "holds": n != 2,
                    "evidence": f"full-{n}", "seeds": 5, "key": f"cell/{n}"} for n in (1, 2, 5)],
    }}))  # fmt: skip
    monkeypatch.setattr(tour, "FULL_RUNS", full)
    mod = _fake("keyed", False)
    mod.claims = lambda results, cfg: [runs.Claim(topic, "cell 2 at tour size", True,
                                                  "tour-2 ||g||", 3, key="cell/2")]  # fmt: skip
    report, _ = tour.run_tour(tmp_path / "t", modules=[mod], progress=False)
    text = report.read_text()
    # the tour's cell 2 sits beside the full run's cell 2 (not its first claim, cell 1)
    row = next(r for r in text.splitlines() if "| cell 2 at tour size |" in r)
    assert row == (  # a "|" in a figure is escaped, so that the row keeps its 6 cells
        f"| {topic} | cell 2 at tour size | [keyed](#keyed) | pass | tour-2 "
        r"\|\|g\|\| | FAIL: full-2 |"
    )
    for n in (1, 5):  # the cells the tour did not run are listed as full-size only
        assert (
            f"| cell {n} at full size | [keyed](#keyed) | full size only | | pass: full-{n} |"
            in text
        )
    assert text.count("full-2") == 2  # its table row and the section's full-run list


def test_a_claims_error_is_a_failed_check(tmp_path, monkeypatch):
    monkeypatch.setattr(tour, "FULL_RUNS", tmp_path / "none.json")
    mod = _claiming("broken", [])

    def bad(results, cfg):
        raise KeyError("no_such_metric")

    mod.claims = bad
    report, entries = tour.run_tour(tmp_path / "t", modules=[mod], progress=False)
    text = report.read_text()
    assert "| (broken) | its checks could not run |" in text and "no_such_metric" in text


def test_record_full_run_writes_the_modules_own_claims(tmp_path):
    mod = _claiming("rec", [(3, True)])
    work = tmp_path / "run"
    runs.run_experiment(mod, {"steps": 7, "sizes": (3,)}, work, progress=False)
    path = tmp_path / "full.json"
    path.write_text(json.dumps({"other": {"command": "keep me", "claims": []}}))
    entry = tour.record_full_run(mod, work, path=path)
    saved = json.loads(path.read_text())
    assert saved["other"] == {"command": "keep me", "claims": []}  # other entries are kept
    assert saved["rec"] == entry
    assert entry["command"] == "python -m experiments.rec --steps 7 --sizes 3"
    assert entry["runtime_s"] == runs.RunDir(work).info()["runtime_s"]
    assert entry["date"] == runs.RunDir(work).info()["finished"][:10]
    assert entry["claims"] == [
        {"topic": tour.NOTES_TOPICS[3], "claim": "claim 3 at 7 steps", "holds": True,
         "evidence": "x=3", "seeds": 3}
    ]  # fmt: skip
    with pytest.raises(runs.RunError, match="no finished run"):
        tour.record_full_run(mod, tmp_path / "empty", path=path)


def test_recorded_full_runs_are_well_formed():
    """experiments/full_runs.json: every entry names a real experiment, a command that
    runs it, and claims on the notes' topics (or the experiment's own extra topic)."""
    known = {runs.experiment_name(m): m for m in listing.discover()}
    for name, e in tour.read_full_runs().items():
        assert name in known, name
        assert e["command"].startswith(f"python -m experiments.{name}")
        assert e["claims"], name
        topics = set(tour.NOTES_TOPICS) | {getattr(known[name], "TOPIC", None)}
        for c in e["claims"]:
            claim = runs.Claim.from_json(c)
            assert claim.topic in topics and isinstance(claim.holds, bool), (name, c)


def test_every_experiment_that_runs_in_the_tour_checks_claims():
    for mod in listing.discover():
        if runs.experiment_name(mod) != "cifar10":  # skipped without its data set
            assert callable(getattr(mod, "claims", None)), mod.__name__
