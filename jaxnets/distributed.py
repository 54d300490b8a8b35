"""Multi-process start-up: `jax.distributed` from flags, environment or the cluster.

One process per host (or per GPU, or per CPU simulation), all running the same program.
After `initialize` every process sees the same global device list (``jax.devices()``), the
train step is jitted over one mesh spanning them all, and XLA inserts the gradient
all-reduce (gloo between CPU processes, NCCL on GPUs, ICI/DCN on TPUs). Nothing in model
code changes; this module only starts the runtime and answers the questions the rest of
jaxnets asks about it:

- `initialize(settings)`: ``jax.distributed.initialize`` with explicit coordinator /
  process count / process id, or auto-detected (SLURM, Open MPI, Kubernetes, TPU pods) with
  ``auto=True``. Must run before any JAX computation; a run without settings is untouched.
- `process_index`, `process_count`, `is_main`: who am I (process 0 is the one writer).
- `barrier(name)`: all processes wait here (file-system hand-offs, e.g. config.json).
- `local_rows(sharding, n)`: the rows ``[start, stop)`` of a global batch of ``n`` examples
  that this process's devices hold, so a data loader can build only those.
- `topology()`: processes, devices, backend (written to ``RUN/topology.json``).

Fault behaviour (jax 0.10.2's coordination service): every process sends heartbeats to the
coordinator (process 0). When a process has been silent for ``heartbeat_timeout`` seconds
(default 100, ``--heartbeat-timeout``) the service declares it dead and every surviving
process aborts (exit status 134, SIGABRT) with ``Terminating process because the JAX
distributed service detected fatal errors ... The following tasks are unhealthy (stopped
sending heartbeats): I``, which names the lost process id ``I``; a process that is inside a
CPU all-reduce at that moment stops sooner with gloo's ``Connection closed by peer`` error. Checkpoints are written
atomically (temporary directory + rename), so the last finished one survives.

Settings come from flags (``--coordinator HOST:PORT --num-processes N --process-id I``,
``--distributed`` for auto-detection; added to every experiment by
`jaxnets.runs.build_parser`) or from the environment variables ``JAXNETS_COORDINATOR``
(or jax's own ``JAX_COORDINATOR_ADDRESS``), ``JAXNETS_NUM_PROCESSES``,
``JAXNETS_PROCESS_ID``, ``JAXNETS_LOCAL_DEVICES`` and ``JAXNETS_DISTRIBUTED=1``; a flag
wins over its variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Settings",
    "add_flags",
    "settings_from",
    "initialize",
    "is_initialized",
    "process_index",
    "process_count",
    "is_main",
    "barrier",
    "local_rows",
    "topology",
]

ENV = {
    "coordinator": "JAXNETS_COORDINATOR",
    "num_processes": "JAXNETS_NUM_PROCESSES",
    "process_id": "JAXNETS_PROCESS_ID",
    "local_devices": "JAXNETS_LOCAL_DEVICES",
    "auto": "JAXNETS_DISTRIBUTED",
    "heartbeat_timeout": "JAXNETS_HEARTBEAT_TIMEOUT",
}
FLAG_KEYS = tuple(ENV)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to start `jax.distributed` (see the module docstring).

    coordinator: ``HOST:PORT`` of process 0's coordination service; None with ``auto``.
    num_processes, process_id: the job's size and this process's id in ``0..N-1``.
    local_devices: simulated CPU devices in this process (``jax_num_cpu_devices``; CPU
      only: GPUs and TPUs are what the host has).
    auto: let ``jax.distributed.initialize()`` detect SLURM / Open MPI / Kubernetes / TPU.
    heartbeat_timeout: seconds of silence after which a process is declared dead.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_devices: int | None = None
    auto: bool = False
    heartbeat_timeout: int = 100

    def __post_init__(self):
        if self.coordinator is not None:
            host, sep, port = self.coordinator.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(
                    f"coordinator must be HOST:PORT (e.g. 10.0.0.1:12355), got {self.coordinator!r}"
                )
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None:
            n = self.num_processes
            if self.process_id < 0 or (n is not None and self.process_id >= n):
                raise ValueError(
                    f"process_id must be in 0..{(n or 1) - 1} (num_processes={n}), "
                    f"got {self.process_id}"
                )
        if self.local_devices is not None and self.local_devices < 1:
            raise ValueError(f"local_devices must be >= 1, got {self.local_devices}")
        if self.heartbeat_timeout < 1:
            raise ValueError(f"heartbeat_timeout must be >= 1 s, got {self.heartbeat_timeout}")
        explicit = [self.coordinator, self.num_processes, self.process_id]
        if not self.auto and any(v is not None for v in explicit) and None in explicit:
            missing = [
                f"--{k.replace('_', '-')}"
                for k, v in zip(
                    ("coordinator", "num_processes", "process_id"), explicit, strict=True
                )
                if v is None
            ]
            raise ValueError(
                "a multi-process run needs --coordinator, --num-processes and --process-id "
                f"together (or --distributed to detect them from the cluster); missing "
                f"{', '.join(missing)}"
            )

    @property
    def enabled(self) -> bool:
        """True when this process is part of a multi-process job."""
        return self.auto or self.coordinator is not None


def add_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The multi-process flags (defaults suppressed, so absent flags fall back to env vars)."""
    g = parser.add_argument_group(
        "multi-process (jax.distributed; without these flags nothing changes)"
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        dest="auto",
        help="initialise from the cluster (SLURM, Open MPI, Kubernetes, TPU pod slice)",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a port")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1")
    g.add_argument(
        "--local-devices",
        type=int,
        metavar="D",
        help="simulated CPU devices per process (CPU only)",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        metavar="S",
        help="seconds before a silent process is declared dead and the others stop (100)",
    )
    return g


def settings_from(
    args: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """`Settings` from parsed flags (keys `FLAG_KEYS`), falling back to the environment."""
    args = dict(args or {})
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, var in ENV.items():
        if args.get(key) is not None and args.get(key) is not False:
            values[key] = args[key]
            continue
        raw = environ.get(var)
        if key == "coordinator" and not raw:
            raw = environ.get("JAX_COORDINATOR_ADDRESS")
        if not raw:
            continue
        if key == "coordinator":
            values[key] = raw
        elif key == "auto":
            values[key] = raw.lower() not in ("0", "false", "no", "")
        else:
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"{var} must be an integer, got {raw!r}") from None
    return Settings(**values)


def initialize(settings: Settings) -> bool:
    """Start `jax.distributed` as ``settings`` say; return True if this is a multi-process run.

    With ``settings.local_devices`` and no distributed settings, only the CPU device count
    is set. Must be called before any JAX computation (the device list is fixed then).
    """
    import jax

    if settings.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", settings.local_devices)
    if not settings.enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    kw: dict[str, Any] = {"heartbeat_timeout_seconds": settings.heartbeat_timeout}
    if not settings.auto or settings.coordinator is not None:
        kw.update(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    try:
        jax.distributed.initialize(**kw)
    except ValueError as e:
        if not settings.auto:
            raise
        raise ValueError(
            f"--distributed: no cluster found to read the coordinator, process count and id "
            f"from (SLURM, Open MPI, Kubernetes, Cloud TPU are detected): {e}; outside a "
            f"cluster pass --coordinator HOST:PORT --num-processes N --process-id I"
        ) from e
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kw.items())}) "
            f"failed: {e}. It must run before any JAX computation, and every process needs "
            f"the same coordinator and num_processes."
        ) from e
    return True


def is_initialized() -> bool:
    """True once `jax.distributed` is up (never starts a JAX backend)."""
    import jax

    return jax.distributed.is_initialized()


def process_index() -> int:
    """This process's id (0 in a single-process run; never starts a backend before init)."""
    if not is_initialized():
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    """Number of processes in the job (1 without `jax.distributed`)."""
    if not is_initialized():
        return 1
    import jax

    return jax.process_count()


def is_main() -> bool:
    """True on process 0: the only process that writes run files and prints progress."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Every process waits until all reach ``barrier(name)`` (no-op in one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_rows(sharding, num_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a ``(num_rows, ...)`` global array that this process holds.

    ``sharding`` splits the leading axis (e.g. ``NamedSharding(mesh, P("data"))``); the
    rows of this process's devices must be one contiguous block (true for a 1-D mesh built
    from ``jax.devices()``, whose devices are ordered by process).
    """
    index_map = sharding.addressable_devices_indices_map((num_rows,))
    spans = sorted({(ix[0].indices(num_rows)[:2]) for ix in index_map.values()})
    start, stop = spans[0][0], spans[0][1]
    for lo, hi in spans[1:]:
        if lo != stop:
            raise ValueError(
                f"this process's devices hold rows {spans} of the batch, not one contiguous "
                f"block; build the mesh from jax.devices() in order"
            )
        stop = hi
    return start, stop


def topology() -> dict:
    """``{"processes", "devices", "local_devices", "backend"}`` of this job."""
    import jax

    return {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "backend": jax.default_backend(),
    }
