"""``python -m experiments.bench``: jaxnets vs PyTorch vs Flax, timed side by side.

Prints a markdown table (median seconds per training step, min-max over rounds, and each
reference's time over jaxnets': above 1.00x jaxnets is faster; for the CNNs,
"jaxnets-xla" is jaxnets on XLA's convolutions, i.e. without the oneDNN extension) and writes
``bench-results.json``::

    {"lstm": {"jaxnets": s, "torch": s, "flax": s}, "gru": {...}, "rnn": {...},
     "vgg": {...}, "resnet20": {...}, "jacobians": {...}, "memory": {...},
     "details": {workload: {candidate: {median, min, max, n, ratio, ratio_range}}},
     "meta": {machine, versions, load, options}}

Options: ``--quick`` (tiny shapes, 2 rounds: a smoke test, the numbers mean nothing),
``--only lstm,gru`` (a subset of lstm, gru, rnn, vgg, resnet20, jacobians, memory),
``--rounds N``, ``--threads N`` (XLA and PyTorch intra-op threads; set before JAX starts),
``--clock cpu`` (process CPU time instead of wall time; steadier on a loaded machine,
meaningful with ``--threads 1``), ``--hugepages`` (restart with glibc's malloc on
transparent huge pages, for every framework alike: fewer page faults; on the 2-core
development machine it sped PyTorch up more than jaxnets), ``--out PATH``.

PyTorch is optional: without it the torch column says "not installed" (``pip install
torch==2.13.0`` gets the CPU build where it is available; ``make bench`` tries that).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

ALL = ("lstm", "gru", "rnn", "vgg", "resnet20", "jacobians", "memory")
RNN_WORKLOADS = ("lstm", "gru", "rnn")
CNN_WORKLOADS = ("vgg", "resnet20")
REFERENCES = ("torch", "flax", "jaxnets-xla")  # the last: CNNs without oneDNN
ROOT = str(Path(__file__).resolve().parents[2])  # the repository: run from anywhere


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds (smoke test)")
    p.add_argument(
        "--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (default 15 RNN, 7 CNN)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument(
        "--hugepages",
        action="store_true",
        help="restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (Linux/glibc; all frameworks)",
    )
    p.add_argument("--out", default="bench-results.json", help="where to write the JSON")
    args = p.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(args.only) - set(ALL))
    if unknown:
        p.error(f"--only: unknown workload(s) {unknown}; choose from {', '.join(ALL)}")
    if args.rounds < 0 or args.threads < 0:
        p.error("--rounds and --threads must be >= 0")
    return args


def set_threads(n: int) -> None:
    """Run on ``n`` cores: pin the process (Linux) and XLA's and PyTorch's intra-op
    parallelism (before JAX starts). Pinning matters for ``--clock cpu``: unpinned, JAX's
    idle helper threads spin on the other core and bill their time to the step."""
    if n <= 0:
        return
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[-n:])
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1:
        flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


HUGETLB = "glibc.malloc.hugetlb=1"


def hugepages_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to restart with for ``--hugepages``, or None when ``environ``
    already asks glibc for huge pages. glibc reads ``GLIBC_TUNABLES`` only at process
    start, so the setting cannot be applied in place; other tunables are kept."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGETLB) if t)}


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def machine() -> dict:
    """Where the numbers came from."""
    import flax
    import jax

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if hasattr(os, "getloadavg"):
        info["load_before"] = list(os.getloadavg())
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def time_workload(name: str, args) -> dict:
    """Build the candidates of one workload and time them interleaved."""
    from experiments.bench import cnn, rnn, timing  # after set_threads: imports JAX

    if name in RNN_WORKLOADS:
        mod, shape, rounds = rnn, (rnn.QUICK if args.quick else rnn.Shape()), 15
    else:
        mod, shape, rounds = cnn, (cnn.QUICK if args.quick else cnn.Shape()), 7
    rounds = 2 if args.quick else (args.rounds or rounds)
    steps = {"jaxnets": mod.jaxnets_step(name, shape)}
    missing = {}
    if torch_available():
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        steps["torch"] = mod.torch_step(name, shape)
    else:
        missing["torch"] = "not installed"
    steps["flax"] = mod.flax_step(name, shape)
    if name in CNN_WORKLOADS and (xla := cnn.jaxnets_xla_step(name, shape)) is not None:
        steps["jaxnets-xla"] = xla
    if name in RNN_WORKLOADS and (cudnn := rnn.cudnn_step(name, shape)) is not None:
        steps["cudnn"] = cudnn  # jax.experimental.rnn, GPU only
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = timing.interleaved(steps, rounds, warmup=1, clock=clock)
    stats = timing.summary(times)
    for ref, why in missing.items():
        stats[ref] = {"missing": why}
    return {"shape": vars(shape) if hasattr(shape, "__dict__") else str(shape), **stats}


def fmt_time(s: dict) -> str:
    if "missing" in s:
        return s["missing"]
    return f"{s['median'] * 1e3:.1f} ms ({s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f})"


def fmt_ratio(s: dict) -> str:
    if "ratio" not in s:
        return "-"
    lo, hi = s["ratio_range"]
    return f"{s['ratio']:.2f}x ({lo:.2f}-{hi:.2f})"


def table(details: dict) -> str:
    """Markdown table of the timed workloads: times, then each reference over jaxnets."""
    refs = [r for r in REFERENCES + ("cudnn",) if any(r in d for d in details.values())]
    head = ["workload", "jaxnets"] + refs + [f"{r} / jaxnets" for r in refs]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in details.items():
        missing = {"missing": "-"}
        cells = [name, fmt_time(d["jaxnets"])] + [fmt_time(d.get(r, missing)) for r in refs]
        cells += [fmt_ratio(d.get(r, {})) for r in refs]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.hugepages:
        env = hugepages_env(dict(os.environ))
        if env is not None and not sys.platform.startswith("linux"):
            print("--hugepages: a glibc (Linux) setting; running without it", flush=True)
        elif env is not None and argv is not None:
            raise ValueError(
                "--hugepages restarts the process, so it works from the command line only; "
                "from Python, set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting it"
            )
        elif env is not None:  # restart this command with the setting (same arguments)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
            cmd = [sys.executable, "-m", "experiments.bench", *sys.argv[1:]]
            os.execve(sys.executable, cmd, env)
    set_threads(args.threads)
    sys.path.insert(0, ROOT)

    results: dict = {"meta": machine(), "details": {}}
    results["meta"]["options"] = {k: v for k, v in vars(args).items()}
    print(f"# jaxnets benchmark ({'quick smoke test' if args.quick else 'full'})")
    print(f"machine: {results['meta']['cpu']}, {results['meta']['cpu_count']} cores, "
          f"load {results['meta'].get('load_before')}, jax {results['meta']['jax']}, "
          f"torch {results['meta'].get('torch', 'not installed')}", flush=True)  # fmt: skip
    for name in args.only:
        t0 = time.perf_counter()
        if name in RNN_WORKLOADS + CNN_WORKLOADS:
            d = time_workload(name, args)
            results["details"][name] = d
            cands = ("jaxnets",) + tuple(r for r in REFERENCES + ("cudnn",) if r in d)
            results[name] = {c: d[c].get("median") for c in cands}
        elif name == "jacobians":
            results[name] = jacobians(args)
        elif name == "memory":
            from experiments.bench import memory

            results[name] = memory.measure(quick=args.quick)
        print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    if hasattr(os, "getloadavg"):
        results["meta"]["load_after"] = list(os.getloadavg())
    print()
    print(table(results["details"]))
    if "jacobians" in results:
        print()
        if "missing" in results["jacobians"]:
            print("jacobians:", results["jacobians"]["missing"])
        else:
            from experiments.bench import jacobians as jac

            print(jac.markdown(results["jacobians"]))
    if "memory" in results:
        from experiments.bench import memory

        print()
        print(memory.table(results["memory"]))
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return results


def jacobians(args) -> dict:
    """The BPTT toolkit's measurement (``experiments/bench/jacobians.py``), when present."""
    if importlib.util.find_spec("experiments.bench.jacobians") is None:
        return {"missing": "experiments/bench/jacobians.py not present"}
    from experiments.bench import jacobians as jac

    return jac.measure(quick=args.quick)


if __name__ == "__main__":
    main()
