"""Run directories and the experiment command line.

A run directory holds everything one experiment run produces::

    RUN/
      config.json      the Config the run was started with (resuming checks it matches)
      metrics.jsonl    one JSON record per logged step (written by `jaxnets.train`)
      checkpoints/     orbax checkpoints, newest kept (written by `jaxnets.train`)
      results.json     the numbers the experiment exists to produce
      topology.json    multi-process runs only: processes and devices of each start
      DONE             written last: the run finished (JSON: runtime, finish time)
      *.png            plots
      SUB/             sub-runs (one model / seed each), the same layout, resumable alone

An experiment is a module ``experiments/NAME.py`` with

- a docstring whose first line is a one-line description;
- ``Config``: a frozen dataclass (with a ``seed: int`` field) whose docstring gives the
  command line, the laptop runtime and the expected result;
- ``QUICK``: dict of Config overrides for ``--quick`` (well under 2 minutes on 2 cores);
- ``TOUR``: dict of Config overrides for ``python -m experiments.tour``;
- ``run(cfg, run_dir) -> dict`` (the results, JSON-serialisable);
- ``report(results, run_dir) -> str``: markdown for the tour report;
- optional ``claims(results, cfg) -> list[Claim]``: the notes' claims this run checks, each
  with pass/fail and its figures (the tour's claims table; `Claim`, `compare`);
- optional ``TOUR_ORDER: int`` (default 100; lower runs first);
- ``if __name__ == "__main__": runs.main(__name__)``.

`main` turns ``Config`` into an argparse command line; `run_experiment` is the same thing
for programs (the tour, tests).

In a multi-process run (`jaxnets.distributed`) every process runs the experiment, but only
process 0 writes the run files (config.json, metrics.jsonl, results.json, DONE, plots) and
prints; `RunDir.log` and `RunDir.finish` are no-ops on the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import math
import os
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxnets import distributed

__all__ = [
    "Claim",
    "RunDir",
    "RunError",
    "build_parser",
    "config_from_args",
    "load_module",
    "main",
    "run_experiment",
    "experiment_name",
    "compare",
    "mean_se",
    "pm",
    "seeds_text",
]


class RunError(RuntimeError):
    """A run directory cannot be used as asked (finished, or started with another config)."""


def _json_default(obj: Any) -> Any:
    # numpy / jax scalars and arrays reach results dicts all the time.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__} ({obj!r:.80})")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file + rename), so a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class RunDir:
    """One run directory (see the module docstring for the layout).

    ``RunDir.CHECKPOINTS``: the name of the checkpoints folder in it.

    Args:
      path: the directory; created if missing.
      devices: data-parallel device count that `jaxnets.train` uses by default for runs in
        this directory (a runtime option, not part of the config).
      progress: show tqdm progress bars.
    """

    CHECKPOINTS = "checkpoints"

    def __init__(self, path: str | os.PathLike, *, devices: int = 1, progress: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.devices = int(devices)
        self.progress = bool(progress)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- files ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def plot_path(self, name: str) -> Path:
        """Path of a PNG plot in this run, e.g. ``run_dir.plot_path("loss")`` -> RUN/loss.png."""
        return self.path / (name if name.endswith(".png") else name + ".png")

    # -- state ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once `finish` has written results.json and the DONE marker."""
        return (self.path / "DONE").exists()

    def results(self) -> dict:
        """The results.json of a finished run."""
        if not self.results_path.exists():
            raise RunError(f"{self.path} has no results.json (the run has not finished)")
        return read_json(self.results_path)

    def finish(self, results: Mapping[str, Any], runtime_s: float | None = None) -> None:
        """Write results.json, then the DONE marker (in that order, each atomically).

        Multi-process: process 0 writes, the DONE marker records the topology, and every
        process waits for it (so none sees a half-finished sub-run afterwards).
        """
        if distributed.is_main():
            write_json(self.results_path, dict(results))
            info: dict[str, Any] = {"finished": _dt.datetime.now().isoformat(timespec="seconds")}
            if runtime_s is not None:
                info["runtime_s"] = float(runtime_s)
            if distributed.process_count() > 1:
                info.update(distributed.topology())
            write_json(self.path / "DONE", info)
        distributed.barrier(f"jaxnets-finish-{self.path}")

    def info(self) -> dict:
        """The DONE marker's content ({} if unfinished)."""
        return read_json(self.path / "DONE") if self.done else {}

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record to metrics.jsonl (flushed, so a kill loses at most this line).

        Only process 0 of a multi-process run writes.
        """
        if not distributed.is_main():
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(dict(record), default=_json_default) + "\n")

    def metrics(self) -> list[dict]:
        """All records of metrics.jsonl."""
        return read_jsonl(self.metrics_path)

    # -- sub-runs ------------------------------------------------------------------------
    def sub(self, name: str) -> RunDir:
        """A sub-run directory RUN/name with the same runtime options."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"sub-run name must be a plain directory name, got {name!r}")
        return RunDir(self.path / name, devices=self.devices, progress=self.progress)

    def sub_run(self, name: str, fn: Callable[[RunDir], Mapping[str, Any]]) -> dict:
        """Run ``fn(sub)`` in sub-run ``name`` unless it already finished; return its results.

        An unfinished sub-run is re-entered, so `jaxnets.train` resumes it from its checkpoint.
        """
        sub = self.sub(name)
        if sub.done:
            return sub.results()
        t0 = time.perf_counter()
        results = dict(fn(sub))
        sub.finish(results, runtime_s=time.perf_counter() - t0)
        return results


# --- experiment modules ---------------------------------------------------------------------


def load_module(module: str | types.ModuleType) -> types.ModuleType:
    """An experiment module from itself, its import name, or a short name (``"demo"``)."""
    if isinstance(module, types.ModuleType):
        return module
    if module == "__main__":
        return sys.modules["__main__"]
    if "." not in module:
        module = f"experiments.{module}"
    return importlib.import_module(module)


def experiment_name(module: types.ModuleType) -> str:
    """Short name of an experiment module: ``experiments.demo`` -> ``demo``."""
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else module.__name__
    return name.rsplit(".", 1)[-1]


def _check_protocol(module: types.ModuleType) -> None:
    missing = [a for a in ("Config", "run") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"experiment module {module.__name__} lacks {', '.join(missing)}")
    cfg_cls = module.Config
    if not (dataclasses.is_dataclass(cfg_cls) and cfg_cls.__dataclass_params__.frozen):
        raise TypeError(f"{module.__name__}.Config must be a frozen dataclass")
    if "seed" not in {f.name for f in dataclasses.fields(cfg_cls)}:
        raise TypeError(f"{module.__name__}.Config must have a `seed: int` field")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


def _parser_for(tp: Any, name: str) -> tuple[Callable[[str], Any], dict]:
    """(converter, extra argparse kwargs) for one Config field type."""
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    extra: dict = {}

    def maybe_none(conv):
        if not optional:
            return conv
        return lambda s: None if s.lower() == "none" else conv(s)

    if origin is typing.Literal:
        choices = typing.get_args(tp)
        conv = type(choices[0])
        extra["choices"] = list(choices)
        return maybe_none(conv), extra
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        elem = args[0] if args else str
        extra["nargs"] = "*"
        return maybe_none(elem), extra
    if tp in (int, float, str):
        return maybe_none(tp), extra
    raise TypeError(f"Config field {name!r}: unsupported type {tp!r} for the command line")


def build_parser(module: types.ModuleType) -> argparse.ArgumentParser:
    """argparse parser from the module's Config: one flag per field, plus the run flags."""
    _check_protocol(module)
    cfg_cls = module.Config
    name = experiment_name(module)
    desc = (module.__doc__ or name).strip()
    epilog = (cfg_cls.__doc__ or "").strip()
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description=desc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(cfg_cls)
    defaults = cfg_cls()
    g = p.add_argument_group("config (defaults shown; --quick applies QUICK first)")
    for f in dataclasses.fields(cfg_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        tp = hints[f.name]
        if _strip_optional(tp)[0] is bool:
            g.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                dest=f.name,
                help=f"(default: {default})",
            )
            continue
        conv, extra = _parser_for(tp, f.name)
        metavar = f.name.upper() if "choices" not in extra else None
        g.add_argument(
            flag, type=conv, dest=f.name, metavar=metavar, help=f"(default: {default})", **extra
        )
    r = p.add_argument_group("run")
    r.add_argument("--quick", action="store_true", help="apply the small QUICK overrides")
    r.add_argument("--workdir", type=str, help=f"run directory (default: runs/{name}/<timestamp>)")
    r.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in WORKDIR even if it holds a run (deletes that run)",
    )
    r.add_argument("--devices", type=int, help="data-parallel devices (default: 1)")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    distributed.add_flags(p)
    return p


def config_from_args(
    module: types.ModuleType, overrides: Mapping[str, Any] | None = None, quick: bool = False
):
    """``Config()`` with QUICK (if quick) then ``overrides`` applied; unknown keys raise."""
    cfg_cls = module.Config
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    merged: dict = {}
    if quick:
        merged.update(getattr(module, "QUICK", {}))
    merged.update(overrides or {})
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(
            f"{module.__name__}.Config has no field(s) {unknown}; fields: {sorted(names)}"
        )
    hints = typing.get_type_hints(cfg_cls)
    for k, v in list(merged.items()):
        if typing.get_origin(_strip_optional(hints[k])[0]) is tuple and isinstance(v, list):
            merged[k] = tuple(v)
    return cfg_cls(**merged)


def _config_json(cfg) -> dict:
    # JSON round trip, so tuples compare equal to the lists read back from config.json.
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=_json_default))


def _default_workdir(name: str, now: _dt.datetime | None = None) -> Path:
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / name / stamp


def _record_topology(run_dir: RunDir) -> None:
    """Append this start's processes/devices to RUN/topology.json (a resume may differ)."""
    path = run_dir / "topology.json"
    starts = read_json(path)["starts"] if path.exists() else []
    now = _dt.datetime.now().isoformat(timespec="seconds")
    starts.append({"started": now, **distributed.topology()})
    write_json(path, {**starts[-1], "starts": starts})


def run_experiment(
    module: str | types.ModuleType,
    overrides: Mapping[str, Any] | None = None,
    workdir: str | os.PathLike | None = None,
    *,
    quick: bool = False,
    overwrite: bool = False,
    if_done: str = "error",
    devices: int = 1,
    progress: bool = True,
) -> dict:
    """Run an experiment module into ``workdir`` and return its results dict.

    Args:
      module: the module, its import name, or its short name (``"demo"``).
      overrides: Config field values (applied after QUICK).
      workdir: run directory; default ``runs/NAME/<timestamp>``.
      quick: apply the module's QUICK overrides first.
      overwrite: delete whatever run is in ``workdir`` and start afresh.
      if_done: what to do when ``workdir`` holds a finished run: ``"error"`` (raise
        `RunError`) or ``"load"`` (return its results without running).
      devices: data-parallel device count passed to the run (``run_dir.devices``).
      progress: show progress bars.

    An unfinished run in ``workdir`` is resumed if its config.json equals this config, and
    refused with `RunError` naming the differing fields otherwise.
    """
    if if_done not in ("error", "load"):
        raise ValueError(f"if_done must be 'error' or 'load', got {if_done!r}")
    module = load_module(module)
    _check_protocol(module)
    name = experiment_name(module)
    cfg = config_from_args(module, overrides, quick)
    path = Path(workdir) if workdir is not None else _default_workdir(name)
    config = _config_json(cfg)

    # Every process checks the directory before process 0 changes it (barrier below).
    if path.exists() and any(path.iterdir()):
        if overwrite:
            pass  # process 0 deletes it after the barrier
        else:
            existing = RunDir(path)
            if existing.done:
                if if_done == "load":
                    return existing.results()
                raise RunError(
                    f"{path} holds a finished run; pass --overwrite to replace it "
                    f"or choose another --workdir"
                )
            if existing.config_path.exists():
                old = read_json(existing.config_path)
                if old != config:
                    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                    lines = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
                    raise RunError(
                        f"{path} holds an unfinished run with another config ({lines}); "
                        f"resume it with the same flags, or pass --overwrite to start afresh"
                    )
            else:
                raise RunError(
                    f"{path} is not empty and is not a run directory (no config.json); "
                    f"choose another --workdir"
                )
    distributed.barrier(f"jaxnets-checked-{path}")
    if distributed.is_main():
        if overwrite and path.exists():
            shutil.rmtree(path)
        run_dir = RunDir(path, devices=devices, progress=progress)
        if not run_dir.config_path.exists():
            write_json(run_dir.config_path, config)
        if distributed.process_count() > 1:
            _record_topology(run_dir)
    distributed.barrier(f"jaxnets-created-{path}")
    run_dir = RunDir(path, devices=devices, progress=progress and distributed.is_main())
    t0 = time.perf_counter()
    results = module.run(cfg, run_dir)
    if not isinstance(results, Mapping):
        raise TypeError(f"{module.__name__}.run must return a dict, got {type(results).__name__}")
    results = json.loads(json.dumps(dict(results), default=_json_default))
    run_dir.finish(results, runtime_s=time.perf_counter() - t0)
    return results


def main(module: str | types.ModuleType = "__main__", argv: list[str] | None = None) -> dict:
    """Command-line entry of an experiment: ``if __name__ == "__main__": runs.main(__name__)``."""
    module = load_module(module)
    parser = build_parser(module)
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick", False)
    overwrite = args.pop("overwrite", False)
    workdir = args.pop("workdir", None)
    devices = args.pop("devices", None)
    progress = not args.pop("no_progress", False)
    name = experiment_name(module)
    try:
        settings = distributed.settings_from({k: args.pop(k, None) for k in distributed.FLAG_KEYS})
    except ValueError as e:
        parser.error(str(e))
    try:
        multi = distributed.initialize(settings)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    if multi or devices not in (None, 1):
        import jax

        if multi and devices is None:
            devices = jax.device_count()
        if multi and devices != jax.device_count():
            parser.error(
                f"--devices {devices}: a multi-process run trains on every device of every "
                f"process ({jax.process_count()} processes, {jax.device_count()} devices); "
                f"leave --devices out or pass {jax.device_count()}"
            )
        if not 1 <= devices <= jax.device_count():
            parser.error(
                f"--devices {devices}: this machine has {jax.device_count()} "
                f"{jax.default_backend()} device(s); on CPU, simulate N with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=N"
            )
    devices = devices or 1
    main_process = distributed.is_main()
    if workdir:
        path = Path(workdir)
    elif multi:  # one timestamp for all processes: process 0's clock
        import numpy as np
        from jax.experimental import multihost_utils

        t = multihost_utils.broadcast_one_to_all(np.int32(time.time()))
        path = _default_workdir(name, _dt.datetime.fromtimestamp(int(t)))
    else:
        path = _default_workdir(name)
    if main_process:
        print(f"[{name}] run directory: {path}", file=sys.stderr)
    try:
        results = run_experiment(
            module,
            args,
            path,
            quick=quick,
            overwrite=overwrite,
            devices=devices,
            progress=progress and main_process,
        )
    except RunError as e:
        if multi:  # same error on every process; exit at once (see below)
            if main_process:
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        parser.exit(2, f"error: {e}\n")
    except BaseException:
        if not multi:
            raise
        # A normal exit would wait in jax.distributed's shutdown barrier for the processes
        # that are still training (up to its 300 s timeout). Exit now: the others see this
        # process's heartbeats stop and abort too, naming it.
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if main_process:
        if hasattr(module, "report"):
            print(module.report(results, RunDir(path)))
        else:
            print(json.dumps(results, indent=2))
        print(f"[{name}] results: {path / 'results.json'}", file=sys.stderr)
    return results


def fmt(x: Any, digits: int = 3) -> str:
    """Short number formatting for report tables (NaN-safe)."""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the notes as one run checks it.

    ``topic`` names the notes' topic (the tour's claims table has one row per topic and
    claim), ``claim`` says exactly what was checked at the size that ran (``"LSTM and GRU
    reach test MSE < 0.05 at T = 50, the tanh RNN does not"``), ``holds`` is the verdict,
    ``evidence`` the figures behind it (means ± standard errors, seeds). ``seeds`` is the
    number of seeds a comparison rests on (None for a deterministic check). ``key``, when
    set, names the cell a claim is about independently of the run's size (``"
    mnist_new_classes/2"``): the tour matches a tour claim to the full run's claim with the
    same topic and key (claims without a key are matched by their position in the topic).
    """

    topic: str
    claim: str
    holds: bool
    evidence: str
    seeds: int | None = None
    key: str | None = None

    def to_json(self) -> dict:
        d = {**dataclasses.asdict(self), "holds": bool(self.holds)}
        if d["key"] is None:
            del d["key"]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Claim:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of a list of numbers.

    Raises ValueError on fewer than 2 values: a standard error needs at least 2 seeds.
    """
    xs = [float(v) for v in values]
    if len(xs) < 2:
        raise ValueError(f"mean_se: a standard error needs >= 2 values, got {len(xs)}")
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def pm(values, digits: int = 3, *, scale: float = 1.0, unit: str = "") -> str:
    """``"mean ± SE"`` of per-seed values for report tables; one value prints alone.

    ``scale`` multiplies both (100 for percent), ``unit`` follows each number-pair
    (``pm([0.5, 0.52], 1, scale=100, unit="%")`` is ``"51.0 ± 1.0%"``).
    """
    xs = [float(v) * scale for v in (values if isinstance(values, list | tuple) else [values])]
    if not xs:
        raise ValueError("pm: values is empty; expected one value per seed")
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}{unit}"
    m, se = mean_se(xs)
    return f"{m:.{digits}f} ± {se:.{digits}f}{unit}"


def seeds_text(n: int) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{n} seed{'' if n == 1 else 's'}"


def compare(
    a,
    b,
    *,
    higher_is_better: bool = True,
    names: tuple[str, str] = ("A", "B"),
    digits: int = 3,
    min_seeds: int = 3,
    paired: bool = False,
) -> tuple[bool, str]:
    """Does A beat B over seeds? ``(holds, evidence)``.

    ``a``, ``b``: per-seed values of one metric. A beats B when its mean is better by more
    than two standard errors of the difference: unpaired, sqrt(se_a^2 + se_b^2); with
    ``paired=True`` (seed i of A and of B share data, initial head and batch order), the
    standard error of the per-seed differences a_i - b_i.
    Fewer than ``min_seeds`` values on either side raise ValueError: a comparison without
    an uncertainty is not a claim. ``min_seeds=1`` is for quoting a single-seed full-size
    run: with one value on a side there is no standard error, the verdict is on the means
    alone and the evidence says so.
    """
    a, b = [float(x) for x in a], [float(x) for x in b]
    for name, xs in zip(names, (a, b), strict=True):
        if len(xs) < max(min_seeds, 1):
            raise ValueError(
                f"compare: {name} has {len(xs)} value(s); a comparison needs >= {min_seeds} seeds"
            )
    f = f"{{:.{digits}f}}"
    n = f"{len(a)} seeds" if len(a) == len(b) else f"{len(a)} and {len(b)} seeds"
    if min(len(a), len(b)) < 2:
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        diff = ma - mb if higher_is_better else mb - ma
        n = n.replace("1 seeds", "1 seed")
        return diff > 0, (
            f"{names[0]} {f.format(ma)} vs {names[1]} {f.format(mb)} ({n}: no standard error)"
        )
    ma, sa = mean_se(a)
    mb, sb = mean_se(b)
    diff = ma - mb if higher_is_better else mb - ma
    if paired:
        if len(a) != len(b):
            raise ValueError(f"compare: paired needs as many A as B values, got {len(a)}, {len(b)}")
        se = mean_se([x - y for x, y in zip(a, b, strict=True)])[1]
    else:
        se = math.sqrt(sa**2 + sb**2)
    evidence = (
        f"{names[0]} {f.format(ma)} ± {f.format(sa)} vs {names[1]} {f.format(mb)} ± "
        f"{f.format(sb)} ({n}; difference {f.format(diff)}, 2 SE {f.format(2 * se)}"
        f"{' paired' if paired else ''})"
    )
    return diff > 2 * se, evidence
