"""The tour: run every experiment at laptop size, then write runs/tour/REPORT.md.

``python -m experiments.tour`` (what ``make run`` runs) runs each experiment module found
by ``python -m experiments`` with its ``TOUR`` overrides (``--quick``: its ``QUICK`` ones)
into ``runs/tour/NAME/``, in ``TOUR_ORDER``. A finished experiment is not rerun, an
unfinished one resumes from its checkpoints, so an interrupted tour continues where it
stopped. A failing experiment is reported and the tour goes on. The report holds each
experiment's table (``report()``), runtime and plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import re
import shutil
import sys
import time
import traceback
import types
from pathlib import Path

from jaxnets import runs


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


def write_report(entries: list[dict], out: Path, *, quick: bool, wall_s: float) -> Path:
    head = [
        "# jaxnets tour",
        "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by "
        f"`python -m experiments.tour{' --quick' if quick else ''}` "
        f"({'QUICK' if quick else 'TOUR'} configurations); tour wall time {wall_s:.0f} s.",
        "",
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


def run_tour(
    out: str | Path = "runs/tour",
    *,
    quick: bool = False,
    only: list[str] | None = None,
    devices: int = 1,
    progress: bool = True,
    modules: list[types.ModuleType] | None = None,
) -> tuple[Path, list[dict]]:
    """Run the tour into ``out``; returns (REPORT.md path, entries)."""
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
    entries = [run_one(m, out, quick=quick, devices=devices, progress=progress) for m in mods]
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
    a = p.parse_args(argv)
    out = Path(a.out or ("runs/tour-quick" if a.quick else "runs/tour"))
    only = [s.strip() for s in a.only.split(",") if s.strip()] or None
    try:
        report, entries = run_tour(
            out, quick=a.quick, only=only, devices=a.devices, progress=not a.no_progress
        )
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    failed = [e["name"] for e in entries if e["status"] == "failed"]
    print(f"[tour] report: {report}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
