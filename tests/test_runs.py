"""jaxnets.runs: the Config command line, run directories, overwrite refusal, resume checks."""

import dataclasses
import json
import types
from typing import Literal

import pytest

from jaxnets import runs


def make_module(name="fake", crash_once=False):
    """A minimal experiment module (protocol: docstring, Config, QUICK, run, report)."""
    mod = types.ModuleType(name, "A fake experiment.\n\nLonger text.")

    @dataclasses.dataclass(frozen=True)
    class Config:
        """Fake config. Command line: python -m experiments.fake"""

        seed: int = 0
        lr: float = 0.1
        model: Literal["a", "b"] = "a"
        use_bn: bool = True
        widths: tuple[int, ...] = (4, 8)
        clip: float | None = None
        steps: int = 100

    calls = []

    def run(cfg, run_dir):
        calls.append(cfg)
        out = {}
        for s in range(2):
            out[f"s{s}"] = run_dir.sub_run(f"seed{s}", lambda sub, s=s: sub_body(cfg, sub, s))
        return {"lr": cfg.lr, "subs": out, "steps": cfg.steps}

    sub_calls = []

    def sub_body(cfg, sub, s):
        sub_calls.append(s)
        if crash_once and s == 1 and sub_calls.count(1) == 1:
            raise RuntimeError("simulated crash")
        return {"seed": s}

    mod.Config = Config
    mod.QUICK = {"steps": 3, "lr": 0.5}
    mod.TOUR = {"steps": 10}
    mod.run = run
    mod.report = lambda results, run_dir: f"lr={results['lr']}"
    mod.calls = calls
    mod.sub_calls = sub_calls
    return mod


def test_parser_has_a_typed_flag_per_field():
    mod = make_module()
    p = runs.build_parser(mod)
    args = vars(
        p.parse_args(
            [
                "--lr",
                "0.3",
                "--model",
                "b",
                "--no-use-bn",
                "--widths",
                "1",
                "2",
                "3",
                "--clip",
                "none",
                "--seed",
                "7",
            ]
        )
    )
    cfg = runs.config_from_args(mod, args)
    assert cfg == mod.Config(seed=7, lr=0.3, model="b", use_bn=False, widths=(1, 2, 3), clip=None)
    assert runs.config_from_args(mod, vars(p.parse_args(["--clip", "2.5"]))).clip == 2.5
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "c"])
    with pytest.raises(SystemExit):
        p.parse_args(["--lr", "fast"])
    help_text = p.format_help()
    assert "--use-bn, --no-use-bn" in help_text and "python -m experiments.fake" in help_text


def test_quick_applies_before_explicit_flags():
    mod = make_module()
    assert runs.config_from_args(mod, {}, quick=True) == mod.Config(steps=3, lr=0.5)
    assert runs.config_from_args(mod, {"lr": 0.2}, quick=True) == mod.Config(steps=3, lr=0.2)
    with pytest.raises(ValueError, match=r"no field\(s\) \['nope'\]"):
        runs.config_from_args(mod, {"nope": 1})


def test_protocol_violations_are_named():
    mod = make_module()

    @dataclasses.dataclass
    class NotFrozen:
        seed: int = 0

    mod.Config = NotFrozen
    with pytest.raises(TypeError, match="frozen dataclass"):
        runs.build_parser(mod)


def test_main_writes_the_run_directory(tmp_path, capsys):
    mod = make_module()
    wd = tmp_path / "run"
    results = runs.main(mod, ["--quick", "--workdir", str(wd), "--lr", "0.25"])
    assert results == {"lr": 0.25, "subs": {"s0": {"seed": 0}, "s1": {"seed": 1}}, "steps": 3}
    assert json.loads((wd / "config.json").read_text())["lr"] == 0.25
    assert json.loads((wd / "results.json").read_text()) == results
    assert runs.RunDir(wd).done and runs.RunDir(wd).info()["runtime_s"] >= 0
    assert (wd / "seed0" / "DONE").exists()
    assert "lr=0.25" in capsys.readouterr().out


def test_finished_run_is_refused_unless_overwrite(tmp_path, capsys):
    mod = make_module()
    wd = tmp_path / "run"
    runs.main(mod, ["--workdir", str(wd)])
    (wd / "user-notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        runs.main(mod, ["--workdir", str(wd)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err
    assert (wd / "user-notes.txt").exists() and len(mod.calls) == 1
    with pytest.raises(runs.RunError, match="finished run"):
        runs.run_experiment(mod, {}, wd)
    assert runs.run_experiment(mod, {}, wd, if_done="load")["lr"] == 0.1
    runs.main(mod, ["--workdir", str(wd), "--overwrite", "--lr", "0.3"])
    assert len(mod.calls) == 2 and not (wd / "user-notes.txt").exists()
    assert runs.RunDir(wd).results()["lr"] == 0.3


def test_unfinished_run_resumes_only_with_the_same_config(tmp_path):
    mod = make_module(crash_once=True)
    wd = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        runs.run_experiment(mod, {"lr": 0.1}, wd)
    assert not runs.RunDir(wd).done and runs.RunDir(wd / "seed0").done
    with pytest.raises(runs.RunError, match=r"another config \(lr: 0.1 -> 0.2\)"):
        runs.run_experiment(mod, {"lr": 0.2}, wd)
    res = runs.run_experiment(mod, {"lr": 0.1}, wd)
    assert res["subs"]["s1"] == {"seed": 1}
    assert mod.sub_calls == [0, 1, 1]  # the finished sub-run seed0 was not redone


def test_non_run_directory_is_refused(tmp_path):
    wd = tmp_path / "somewhere"
    wd.mkdir()
    (wd / "data.bin").write_bytes(b"x")
    with pytest.raises(runs.RunError, match="not a run directory"):
        runs.run_experiment(make_module(), {}, wd)


def test_default_workdir_is_runs_name_timestamp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs.main(make_module(), ["--quick"])
    (stamp,) = (tmp_path / "runs" / "fake").iterdir()
    assert (stamp / "DONE").exists() and stamp.name[:2] == "20"


def test_rundir_helpers(tmp_path):
    rd = runs.RunDir(tmp_path / "r")
    assert rd.plot_path("loss") == rd.path / "loss.png"
    rd.log({"step": 1, "loss": 0.5})
    with open(rd.metrics_path, "a") as f:
        f.write('{"step": 2, "lo')  # a line torn by a kill
    assert rd.metrics() == [{"step": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match="plain directory name"):
        rd.sub("../x")
    with pytest.raises(runs.RunError, match="has not finished"):
        rd.results()


def test_mean_se_and_compare_closed_form():
    m, se = runs.mean_se([1.0, 2.0, 3.0, 6.0])  # mean 3, sample var 14/3
    assert m == 3.0 and abs(se - (14 / 3) ** 0.5 / 2) < 1e-12
    with pytest.raises(ValueError, match="needs >= 2 values"):
        runs.mean_se([1.0])
    # unpaired: diff 0.9, se sqrt(0.1^2/3*... ) computed by hand
    a, b = [1.0, 1.1, 1.2], [0.1, 0.2, 0.3]
    holds, ev = runs.compare(a, b, names=("a", "b"))
    assert holds and "a 1.100 ± 0.058 vs b 0.200 ± 0.058 (3 seeds" in ev
    holds, _ = runs.compare(a, b, higher_is_better=False)
    assert not holds
    # within noise: means differ by less than 2 SE -> no claim
    assert not runs.compare([0.0, 1.0, 2.0], [0.5, 1.5, 0.0])[0]
    # paired: per-seed differences identical -> SE 0, the same shift is a clear win
    holds, ev = runs.compare([0.5, 0.9, 0.1], [0.4, 0.8, 0.0], paired=True)
    assert holds and "2 SE 0.000 paired" in ev
    assert not runs.compare([0.5, 0.9, 0.1], [0.4, 0.8, 0.0])[0]  # unpaired: lost in the spread
    with pytest.raises(ValueError, match="needs >= 3 seeds"):
        runs.compare([1.0, 2.0], [0.0, 0.1])
    holds, ev = runs.compare([1.0], [0.5], min_seeds=1, names=("x", "y"))
    assert holds and ev == "x 1.000 vs y 0.500 (1 seed: no standard error)"


def test_pm_and_seeds_text():
    # mean 0.5, sample std 0.1 * sqrt(2), SE 0.1
    assert runs.pm([0.4, 0.6]) == "0.500 ± 0.100"
    assert runs.pm([0.4, 0.6], 1, scale=100, unit="%") == "50.0 ± 10.0%"
    assert runs.pm([0.123456], 4) == "0.1235" and runs.pm(0.25, 2) == "0.25"
    with pytest.raises(ValueError, match="pm: values is empty"):
        runs.pm([])
    assert runs.seeds_text(1) == "1 seed" and runs.seeds_text(5) == "5 seeds"
