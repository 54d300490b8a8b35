"""The tour: run every experiment at laptop size, then write runs/tour/REPORT.md.

``python -m experiments.tour`` (what ``make run`` runs) runs each experiment module found
by ``python -m experiments`` with its ``TOUR`` overrides (``--quick``: its ``QUICK`` ones)
into ``runs/tour/NAME/``, in ``TOUR_ORDER``. A finished experiment is not rerun, an
unfinished one resumes from its checkpoints, so an interrupted tour continues where it
stopped. A failing experiment is reported and the tour goes on. ``--jobs N`` (``make run``:
2) runs N experiments at a time, each in its own process, their output in
``runs/tour/logs/NAME.log``.

The report opens with one table of the notes' claims (`NOTES_TOPICS`): what each
experiment's ``claims(results, cfg)`` checked at tour size, pass or fail, and beside it the
same claim as the experiment's full-size run measured it. Those full-run figures live in
one file, ``experiments/full_runs.json``, written from a full run's directory by
``python -m experiments.tour --record NAME RUN_DIR`` (the module's own ``claims`` applied
to the run's results.json). Then each experiment's table (``report()``), runtime and plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

from jaxnets import runs

FULL_RUNS = Path(__file__).with_name("full_runs.json")

# The notes' topics, in the notes' order (the claims table has a row for each, and says
# so when no experiment checks one).
NOTES_TOPICS = (
    "VGG: stacked 3x3 convolutions",
    "ResNet: residual vs plain depth",
    "Transfer learning",
    "RNN: many-to-one classification",
    "RNN: generation (char LM)",
    "BPTT: vanishing gradients",
    "LSTM/GRU vs RNN on long memory",
    "Bidirectional vs unidirectional",
    "Attention vs no attention",
)


def _discover():
    return importlib.import_module("experiments.__main__")


def _fix_links(markdown: str, prefix: str) -> str:
    """Make relative links of a run's report relative to the tour directory."""

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z]+:|/|#)", target):
            return m.group(0)
        return f"{m.group(1)}({prefix}/{target})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, markdown)


def run_one(mod: types.ModuleType, out: Path, *, quick: bool, devices: int, progress: bool):
    """Run (or resume, or reuse) one experiment; returns an entry for the report."""
    name = runs.experiment_name(mod)
    overrides = {} if quick else dict(getattr(mod, "TOUR", {}))
    workdir = out / name
    entry = {"name": name, "module": mod, "workdir": workdir, "status": "ok"}
    t0 = time.perf_counter()
    try:
        cfg = runs.config_from_args(mod, overrides, quick)
        cfg_json = runs._config_json(cfg)
        cfg_path = workdir / "config.json"
        if cfg_path.exists() and runs.read_json(cfg_path) != cfg_json:
            print(
                f"[tour] {name}: config changed since the last tour; rerunning from scratch",
                file=sys.stderr,
            )
            shutil.rmtree(workdir)
        res_path = workdir / "results.json"
        if (
            (workdir / "DONE").exists()
            and res_path.exists()
            and "skipped" in runs.read_json(res_path)
        ):
            shutil.rmtree(workdir)  # a skip (e.g. data not on disk) is re-checked every tour
        reused = (workdir / "DONE").exists()
        print(
            f"[tour] {name}: {'reusing finished run' if reused else 'running'} in {workdir}",
            file=sys.stderr,
        )
        results = runs.run_experiment(
            mod,
            overrides,
            workdir,
            quick=quick,
            if_done="load",
            devices=devices,
            progress=progress,
        )
        entry["results"] = results
        if isinstance(results, dict) and "skipped" in results:
            entry["status"] = "skipped"
        entry["reused"] = reused
        info = runs.RunDir(workdir).info()
        entry["runtime_s"] = info.get("runtime_s", time.perf_counter() - t0)
        entry["config"] = cfg
        if entry["status"] == "ok" and hasattr(mod, "claims"):
            try:
                entry["claims"] = list(mod.claims(results, cfg))
            except Exception:  # noqa: BLE001 - a broken check is a failed check, reported
                entry["claims_error"] = traceback.format_exc()
    except Exception:  # noqa: BLE001 - a failing experiment must not stop the tour
        entry["status"] = "failed"
        entry["error"] = traceback.format_exc()
        entry["runtime_s"] = time.perf_counter() - t0
        print(f"[tour] {name}: FAILED\n{entry['error']}", file=sys.stderr)
    return entry


def _section(entry: dict, out: Path) -> str:
    mod, name = entry["module"], entry["name"]
    lines = [f"## {name}", "", f"_{_discover().describe(mod)}_", ""]
    lines.append(
        f"Run directory: `{entry['workdir']}` · runtime {entry['runtime_s']:.1f} s"
        + (" (reused from an earlier tour)" if entry.get("reused") else "")
    )
    lines.append("")
    if entry["status"] == "skipped":
        return "\n".join(lines + [f"Skipped: {entry['results']['skipped']}", ""])
    if entry["status"] != "ok":
        tail = "\n".join(entry["error"].strip().splitlines()[-15:])
        lines += ["**FAILED**", "", "```", tail, "```", ""]
        return "\n".join(lines)
    lines += _claims_block(entry)
    run_dir = runs.RunDir(entry["workdir"])
    if hasattr(mod, "report"):
        try:
            md = mod.report(entry["results"], run_dir).strip()
        except Exception:  # noqa: BLE001
            md = "report() failed:\n\n```\n" + traceback.format_exc()[-2000:] + "\n```"
    else:
        md = "```json\n" + json.dumps(entry["results"], indent=2)[:4000] + "\n```"
    lines += [_fix_links(md, name), ""]
    linked = set(re.findall(r"\(([^)\s]+\.png)\)", md))
    extra = sorted(p for p in run_dir.path.glob("*.png") if p.name not in linked)
    for p in extra:
        lines += [f"![{p.stem}]({name}/{p.name})", ""]
    return "\n".join(lines)


def read_full_runs(path: str | Path | None = None) -> dict:
    """The recorded full-size runs: ``{name: {"command", "date", "runtime_s", "claims", ...}}``
    (``path`` default: `FULL_RUNS`)."""
    path = Path(FULL_RUNS if path is None else path)
    return runs.read_json(path) if path.exists() else {}


def _config_overrides(mod: types.ModuleType, cfg) -> dict:
    """Fields of ``cfg`` that differ from the module's ``Config()`` defaults."""
    default = runs._config_json(mod.Config())
    return {k: v for k, v in runs._config_json(cfg).items() if default.get(k) != v}


def _command(name: str, overrides: dict) -> str:
    parts = [f"python -m experiments.{name}"]
    for k, v in overrides.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif isinstance(v, list):
            parts.append(" ".join([flag, *map(str, v)]))
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def record_full_run(
    name, run_dir: str | Path, path: str | Path | None = None, note: str = ""
) -> dict:
    """Write one experiment's full-size run into ``full_runs.json`` from its run directory.

    The claims are the module's own ``claims(results, cfg)`` on the run's results.json and
    config.json; the command is rebuilt from the config fields that differ from the
    defaults; runtime and date come from the run's DONE marker; ``note`` says anything the
    reader needs about how it ran (e.g. a machine shared with other jobs). Other entries
    are kept.
    """
    mod = runs.load_module(name)
    name = runs.experiment_name(mod)
    rd = runs.RunDir(run_dir)
    if not rd.done:
        raise runs.RunError(f"--record: {run_dir} holds no finished run (no DONE marker)")
    if not hasattr(mod, "claims"):
        raise ValueError(f"--record: experiments.{name} has no claims(results, cfg)")
    cfg = runs.config_from_args(mod, runs.read_json(rd.config_path))
    info = rd.info()
    entry = {
        "command": _command(name, _config_overrides(mod, cfg)),
        "date": str(info.get("finished", ""))[:10],
        "runtime_s": info.get("runtime_s"),
        "source": f"results.json of {rd.path.as_posix()}",
        "claims": [c.to_json() for c in mod.claims(rd.results(), cfg)],
    }
    if note:
        entry["note"] = note
    recorded = read_full_runs(path)
    recorded[name] = entry
    runs.write_json(FULL_RUNS if path is None else path, dict(sorted(recorded.items())))
    return entry


def _fmt_runtime(s) -> str:
    if s is None:
        return "runtime not recorded"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _matching_full_claim(full: dict | None, claim: runs.Claim, index: int) -> runs.Claim | None:
    """The full run's claim that a tour claim stands for: the one with the same topic and
    ``key`` when the tour claim has a key, else the ``index``-th keyless one on the same
    topic (claims() lists them in the same order)."""
    same = [runs.Claim.from_json(c) for c in (full or {}).get("claims", [])]
    same = [c for c in same if c.topic == claim.topic]
    if claim.key is not None:
        return next((c for c in same if c.key == claim.key), None)
    same = [c for c in same if c.key is None]
    return same[index] if index < len(same) else None


def _claims_block(entry: dict) -> list[str]:
    """Per-section: which size the reader is looking at, its checks, and the full run."""
    name = entry["name"]
    full = read_full_runs().get(name)
    over = _config_overrides(entry["module"], entry["config"]) if "config" in entry else {}
    lines = [
        "**You are reading the tour-size run**: "
        + (f"`{_command(name, over)}`" if over else "the full configuration itself")
        + ".",
        "",
    ]
    for c in entry.get("claims", []):
        lines.append(f"- {'pass' if c.holds else '**FAIL**'}: {c.claim}. {c.evidence}")
    if "claims_error" in entry:
        tail = entry["claims_error"].strip().splitlines()[-1]
        lines.append(f"- **FAIL**: claims() raised `{tail}`")
    if full:
        lines += [
            "",
            f"**Full-size run** (recorded {full.get('date') or 'undated'}, "
            f"{_fmt_runtime(full.get('runtime_s'))} on this 2-core machine; "
            f"{full.get('source', '')}): `{full['command']}`"
            + (f" ({full['note']})" if full.get("note") else ""),
        ]
        lines += [
            f"- {'pass' if c['holds'] else '**FAIL**'}: {c['claim']}. {c['evidence']}"
            for c in full["claims"]
        ]
    else:
        lines += ["", "**Full-size run**: not recorded in `experiments/full_runs.json`."]
    return lines + [""]


def _cell(text: str) -> str:
    """Text for one markdown table cell: a ``|`` (as in ``||dL/ds_k||``) would end the cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_table(entries: list[dict]) -> list[str]:
    """The notes' claims at a glance: one row per claim, every topic of the notes listed."""
    full_runs = read_full_runs()
    rows = []
    covered = set()

    def order(topic: str) -> int:
        return NOTES_TOPICS.index(topic) if topic in NOTES_TOPICS else len(NOTES_TOPICS)

    for e in entries:
        full = full_runs.get(e["name"])
        seen: dict[str, int] = {}
        matched = []
        for c in e.get("claims", []):
            covered.add(c.topic)
            index = seen.get(c.topic, -1) + (c.key is None)
            seen[c.topic] = index
            f = _matching_full_claim(full, c, index)
            matched.append(f)
            rows.append(
                (
                    order(c.topic),
                    f"| {_cell(c.topic)} | {_cell(c.claim)} | [{e['name']}](#{e['name']}) | "
                    f"{'pass' if c.holds else '**FAIL**'} | {_cell(c.evidence)} | "
                    + (
                        "not recorded"
                        if f is None
                        else f"{'pass' if f.holds else 'FAIL'}: {_cell(f.evidence)}"
                    )
                    + " |",
                )
            )
        if e["status"] == "ok" and "claims_error" not in e:
            for c in [runs.Claim.from_json(c) for c in (full or {}).get("claims", [])]:
                if c not in matched:  # a claim only the full-size run checks
                    rows.append(
                        (
                            order(c.topic),
                            f"| {_cell(c.topic)} | {_cell(c.claim)} | [{e['name']}](#{e['name']}) "
                            f"| full size only | | {'pass' if c.holds else 'FAIL'}: "
                            f"{_cell(c.evidence)} |",
                        )
                    )
        if "claims_error" in e or (e["status"] == "failed" and hasattr(e["module"], "claims")):
            rows.append(
                (
                    len(NOTES_TOPICS),
                    f"| ({e['name']}) | its checks could not run | "
                    f"[{e['name']}](#{e['name']}) | **FAIL** | {e['status']} | |",
                )
            )
    for i, topic in enumerate(NOTES_TOPICS):
        if topic not in covered:
            rows.append(
                (i, f"| {topic} | no experiment checked this topic in this tour | | **FAIL** | | |")
            )
    rows.sort(key=lambda r: r[0])
    n_pass = sum(c.holds for e in entries for c in e.get("claims", []))
    n_all = sum(len(e.get("claims", [])) for e in entries)
    return [
        f"## The notes' claims: {n_pass} of {n_all} checks pass at tour size",
        "",
        "| topic | claim checked at tour size | experiment | tour | tour figures "
        "(mean ± standard error) | full-size run |",
        "|---|---|---|---|---|---|",
        *[r[1] for r in rows],
        "",
    ]


def write_report(entries: list[dict], out: Path, *, quick: bool, wall_s: float) -> Path:
    head = [
        "# jaxnets tour",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by "
        f"`python -m experiments.tour{' --quick' if quick else ''}` "
        f"({'QUICK' if quick else 'TOUR'} configurations); tour wall time {wall_s:.0f} s.",
        "",
        *claims_table(entries),
        "| experiment | status | runtime (s) | description |",
        "|---|---|---|---|",
    ]
    for e in entries:
        head.append(
            f"| [{e['name']}](#{e['name']}) | {e['status']} | {e['runtime_s']:.1f} | "
            f"{_discover().describe(e['module'])} |"
        )
    body = [_section(e, out) for e in entries]
    path = out / "REPORT.md"
    path.write_text("\n".join(head) + "\n\n" + "\n\n".join(body) + "\n")
    return path


def _can_fork() -> bool:
    """Forking is safe while this process has not started JAX's backends (no XLA threads)."""
    from jax._src import xla_bridge

    return hasattr(os, "fork") and not xla_bridge.backends_are_initialized()


def _start_worker(
    mod: types.ModuleType, out: Path, log: Path, *, quick: bool, devices: int, fork: bool
):
    """Start one experiment in its own process; returns a poll() -> exit code | None."""
    name = runs.experiment_name(mod)
    if fork:  # the child inherits the imported modules: no second import of jax and flax
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = os.fdopen(1, "w", buffering=1, closefd=False)
                entry = run_one(mod, out, quick=quick, devices=devices, progress=False)
                code = 0 if entry["status"] != "failed" else 1
            finally:
                sys.stdout.flush()
                os._exit(code)

        def poll():
            done, status = os.waitpid(pid, os.WNOHANG)
            return os.waitstatus_to_exitcode(status) if done else None

        return poll
    cmd = [sys.executable, "-m", "experiments.tour", "--worker", "--only", name,
           "--out", str(out), "--devices", str(devices)] + (["--quick"] if quick else [])  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    return proc.poll


def _run_parallel(
    mods: list[types.ModuleType], out: Path, *, quick: bool, jobs: int, devices: int,
    fork: bool | None = None,
) -> set[str]:  # fmt: skip
    """Run experiments ``mods`` as ``jobs`` concurrent worker processes, each writing its own
    run directory and ``out/logs/NAME.log``; returns the names that finished without error.

    Most tour experiments are small recurrent models whose time goes into XLA compilations
    and short scans that keep about one core busy, so two at a time use a 2-core machine
    fully. The longest (a module's ``TOUR_SECONDS``, its measured tour time) start first.
    Workers are forked from this process when that is safe (``fork=None``: JAX's backends
    not started here), else started as ``python -m experiments.tour --worker``. Failures
    are left to the caller's in-process pass, which reports them."""
    fork = _can_fork() if fork is None else fork
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = sorted(mods, key=lambda m: -getattr(m, "TOUR_SECONDS", 60))
    running, ok = {}, set()
    while pending or running:
        while pending and len(running) < jobs:
            mod = pending.pop(0)
            name = runs.experiment_name(mod)
            log = logs / f"{name}.log"
            poll = _start_worker(mod, out, log, quick=quick, devices=devices, fork=fork)
            running[name] = (poll, time.perf_counter())
            print(f"[tour] {name}: started (log {log})", file=sys.stderr)
        time.sleep(0.2)
        for name, (poll, t0) in list(running.items()):
            code = poll()
            if code is None:
                continue
            del running[name]
            if code == 0:
                ok.add(name)
            print(
                f"[tour] {name}: {'finished' if code == 0 else 'FAILED'} in "
                f"{time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
    return ok


def run_tour(
    out: str | Path = "runs/tour",
    *,
    quick: bool = False,
    only: list[str] | None = None,
    devices: int = 1,
    progress: bool = True,
    modules: list[types.ModuleType] | None = None,
    jobs: int = 1,
) -> tuple[Path, list[dict]]:
    """Run the tour into ``out``; returns (REPORT.md path, entries).

    ``jobs > 1`` runs that many experiments at a time in worker processes, then reads
    their finished runs into the report (the experiments are independent, each in its own
    run directory); ``jobs=1`` runs them one after another in this process."""
    if jobs < 1:
        raise ValueError(f"jobs: expected an integer >= 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mods = modules if modules is not None else _discover().discover()
    if only:
        names = {runs.experiment_name(m) for m in mods}
        unknown = sorted(set(only) - names)
        if unknown:
            raise ValueError(f"--only: unknown experiment(s) {unknown}; known: {sorted(names)}")
        mods = [m for m in mods if runs.experiment_name(m) in only]
    t0 = time.perf_counter()
    ran_here: set[str] = set()
    if jobs > 1:
        done_before = {n for m in mods if (out / (n := runs.experiment_name(m)) / "DONE").exists()}
        ran_here = _run_parallel(mods, out, quick=quick, jobs=jobs, devices=devices) - done_before
    entries = [run_one(m, out, quick=quick, devices=devices, progress=progress) for m in mods]
    for e in entries:
        if e["name"] in ran_here:
            e["reused"] = False  # finished by a worker of this tour
    report = write_report(entries, out, quick=quick, wall_s=time.perf_counter() - t0)
    return report, entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.tour",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="use each experiment's QUICK config")
    p.add_argument("--only", type=str, default="", help="comma-separated experiment names")
    p.add_argument(
        "--out",
        type=str,
        default=None,
        help="tour directory (default runs/tour, runs/tour-quick with --quick)",
    )
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="experiments run at a time, each in its own process (make run: 2)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--note", type=str, default="", help="with --record: a note on how it ran")
    p.add_argument(
        "--record",
        nargs=2,
        metavar=("NAME", "RUN_DIR"),
        help="write experiment NAME's finished full-size run RUN_DIR into "
        "experiments/full_runs.json (its claims, command, runtime, date) and exit",
    )
    a = p.parse_args(argv)
    if a.record:
        try:
            entry = record_full_run(*a.record, note=a.note)
        except (ValueError, runs.RunError, ModuleNotFoundError) as e:
            p.exit(2, f"error: {e}\n")
        print(json.dumps(entry, indent=2))
        return 0
    out = Path(a.out or ("runs/tour-quick" if a.quick else "runs/tour"))
    only = [s.strip() for s in a.only.split(",") if s.strip()] or None
    if a.worker:  # one experiment for a parallel tour: its run directory, no report
        if not only or len(only) != 1:
            p.exit(2, "error: --worker runs exactly one experiment (--only NAME)\n")
        entry = run_one(runs.load_module(only[0]), out, quick=a.quick, devices=a.devices,
                        progress=False)  # fmt: skip
        return 0 if entry["status"] != "failed" else 1
    try:
        report, entries = run_tour(
            out, quick=a.quick, only=only, devices=a.devices, progress=not a.no_progress,
            jobs=a.jobs,
        )  # fmt: skip
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    failed = [e["name"] for e in entries if e["status"] == "failed"]
    checks = [c for e in entries for c in e.get("claims", [])]
    print(
        f"[tour] report: {report}; {sum(c.holds for c in checks)} of {len(checks)} checks pass"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
