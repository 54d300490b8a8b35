"""Start one experiment as several local processes joined by jax.distributed (try multi-host here).

    python -m experiments.launch --processes 2 --local-devices 2 experiments.demo --quick

starts ``--processes`` copies of ``python -m experiments.NAME [experiment flags]`` on this
machine, each with ``--coordinator 127.0.0.1:PORT --num-processes N --process-id I`` (a free
port) and, with ``--local-devices D``, D simulated CPU devices (``JAX_PLATFORMS=cpu``): the
global mesh then has N x D devices and the run equals ``--devices N*D`` in one process.
Process 0's output is streamed; the others print only errors (prefixed ``[process I]``).
If any process fails, the others are stopped and the launcher exits with its status.

On a real cluster no launcher is needed: the scheduler starts one process per host and
``--distributed`` reads the rest from it (see the README, "Several devices").
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

# Connection chatter the gloo library prints to stdout in every process (its threads can
# interleave two messages, so a line may lose its "[Gloo] " prefix).
NOISE = ("[Gloo] ",)
_NOISE_RE = re.compile(r"(\[Gloo\] )?(Rank )?\d+ is connected to \d+ peer ranks")


def is_noise(line: str) -> bool:
    """True for gloo's connection messages."""
    return line.startswith(NOISE) or bool(_NOISE_RE.match(line))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the coordinator binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(local_devices: int | None, environ: dict | None = None) -> dict:
    """The environment of a launched process: CPU only with simulated devices when asked.

    XLA_FLAGS' ``--xla_force_host_platform_device_count`` is dropped (the device count comes
    from ``--local-devices``).
    """
    env = dict(os.environ if environ is None else environ)
    if local_devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        if flags:
            env["XLA_FLAGS"] = " ".join(flags)
        else:
            env.pop("XLA_FLAGS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(
    module: str,
    args: Sequence[str],
    *,
    processes: int,
    process_id: int,
    port: int,
    local_devices: int | None = None,
    heartbeat_timeout: int | None = None,
) -> list[str]:
    """``python -m MODULE ARGS --coordinator 127.0.0.1:PORT --num-processes N --process-id I``."""
    if "." not in module:
        module = f"experiments.{module}"
    cmd = [sys.executable, "-m", module, *args]
    cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    cmd += ["--process-id", str(process_id)]
    if local_devices is not None:
        cmd += ["--local-devices", str(local_devices)]
    if heartbeat_timeout is not None:
        cmd += ["--heartbeat-timeout", str(heartbeat_timeout)]
    return cmd


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        if is_noise(text):
            continue
        out.write(prefix + text)
        out.flush()
    stream.close()


def start(
    module: str,
    args: Sequence[str] = (),
    *,
    processes: int = 2,
    local_devices: int | None = None,
    port: int | None = None,
    heartbeat_timeout: int | None = None,
    env: dict | None = None,
    stream: bool = True,
) -> list[subprocess.Popen]:
    """Start the processes (process 0 first); returns their `subprocess.Popen` objects.

    ``stream``: forward output (process 0's stderr as is, so progress bars work; every
    other stream line by line without gloo's connection messages, ``[process I]`` before the
    lines of process I > 0). Without it, stdout and stderr are pipes for the caller.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if local_devices is not None and local_devices < 1:
        raise ValueError(f"local_devices must be >= 1, got {local_devices}")
    port = port or free_port()
    env = child_env(local_devices, env)
    procs = []
    for i in range(processes):
        cmd = command(
            module,
            args,
            processes=processes,
            process_id=i,
            port=port,
            local_devices=local_devices,
            heartbeat_timeout=heartbeat_timeout,
        )
        if not stream:
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
            continue
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=None if i == 0 else subprocess.PIPE,
        )
        prefix = "" if i == 0 else f"[process {i}] "
        pipes = [(p.stdout, sys.stdout)] + ([(p.stderr, sys.stderr)] if i else [])
        p.pumps = [
            threading.Thread(target=_pump, args=(src, dst, prefix), daemon=True)
            for src, dst in pipes
        ]
        for t in p.pumps:
            t.start()
        procs.append(p)
    return procs


def stop(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every running process, then SIGKILL those still alive after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait(procs: Sequence[subprocess.Popen], timeout: float | None = None) -> tuple[int, str]:
    """Wait for all; on the first failure (or ``timeout`` s) stop the rest.

    Returns (exit status, message): 0 and "" when every process exited 0; the failed
    process's status (124 for the timeout) and a sentence naming it otherwise.
    """
    t0 = time.monotonic()
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, c = failed[0]
            stop(procs)
            why = f"signal {-c}" if c < 0 else f"status {c}"
            return (c if c > 0 else 128 - c), (
                f"process {i} of {len(procs)} exited with {why}; stopped the others"
            )
        if all(c == 0 for c in codes):
            return 0, ""
        if timeout is not None and time.monotonic() - t0 > timeout:
            stop(procs)
            return 124, f"timed out after {timeout:g} s; stopped every process"
        time.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--processes", type=int, default=2, help="number of processes (default 2)")
    p.add_argument(
        "--local-devices",
        type=int,
        default=None,
        help="simulated CPU devices per process (sets JAX_PLATFORMS=cpu); default: the "
        "devices the process finds",
    )
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop every process after this many seconds (exit status 124)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=None,
        help="passed on: seconds before a silent process is declared dead (jax default 100)",
    )
    p.add_argument(
        "module",
        help="experiment module, e.g. experiments.demo (or demo); the launcher's flags go "
        "before it, everything after it is passed to the experiment",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the experiment's own flags")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.processes < 1:
        parser.error(f"--processes must be >= 1, got {a.processes}")
    if a.local_devices is not None and a.local_devices < 1:
        parser.error(f"--local-devices must be >= 1, got {a.local_devices}")
    taken = {"--coordinator", "--num-processes", "--process-id", "--local-devices"}
    clash = sorted({x.split("=")[0] for x in a.args} & taken)
    if clash:
        parser.error(f"{', '.join(clash)}: set by the launcher, do not pass them to the module")
    procs = start(
        a.module,
        a.args,
        processes=a.processes,
        local_devices=a.local_devices,
        port=a.port,
        heartbeat_timeout=a.heartbeat_timeout,
    )
    try:
        code, msg = wait(procs, a.timeout)
    except KeyboardInterrupt:
        stop(procs)
        return 130
    for p in procs:  # the last lines of output
        for t in getattr(p, "pumps", []):
            t.join(timeout=5)
    if msg:
        print(f"[launch] {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
