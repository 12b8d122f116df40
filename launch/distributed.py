"""What the launchers share: the distributed settings (from flags, JAX_* or SLURM environment variables),
`jax.distributed.initialize`, and running an entry point in this process.

A target is what follows `--` on a launcher's command line: `-m experiments.lora --mesh=...`,
`path/to/script.py args...`, or either with a leading `python` (dropped), so a command that runs on
one machine runs under the launcher by prefixing it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import runpy
import sys
from typing import Mapping, Sequence

from jaxpeft.core.errors import ConfigError

DEFAULT_PORT = 12321


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Arguments of `jax.distributed.initialize` (see its docstring)."""

    coordinator_address: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None  # None: every local device (JAX's default)
    initialization_timeout: int = 300  # seconds to wait for every process to join

    def __post_init__(self) -> None:
        problems = []
        if not re.fullmatch(r"[^:\s]+:\d+", self.coordinator_address):
            problems.append(f"coordinator address {self.coordinator_address!r}: expected host:port")
        if self.num_processes < 1:
            problems.append(f"num_processes={self.num_processes}: must be at least 1")
        if not 0 <= self.process_id < max(self.num_processes, 1):
            problems.append(f"process_id={self.process_id}: must be in [0, {self.num_processes})")
        if problems:
            raise ConfigError("bad distributed settings:\n" + "\n".join(f"  - {p}" for p in problems))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    m = re.match(r"([^\[,]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}; pass --coordinator_address=host:port")
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix or ''}"


def resolve(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    port: int | None = None,
    initialization_timeout: int = 300,
    env: Mapping[str, str] | None = None,
) -> DistributedConfig:
    """Flags first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then SLURM's variables
    (SLURM_NTASKS, SLURM_PROCID, the first host of SLURM_STEP_NODELIST or SLURM_JOB_NODELIST). Under SLURM
    with one task per node, every GPU of the node is this process's (SLURM_GPUS_ON_NODE); with several
    tasks per node JAX gives each task one GPU (its SLURM_LOCALID). The port is `port`, else 12321 +
    SLURM_JOB_ID % 10000 (jobs sharing a node do not collide), else 12321."""
    env = os.environ if env is None else env
    slurm = "SLURM_JOB_ID" in env or "SLURM_PROCID" in env
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _int(env, "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _int(env, "JAX_PROCESS_ID")
    if slurm:
        n = n if n is not None else _int(env, "SLURM_NTASKS", "SLURM_NPROCS")
        pid = pid if pid is not None else _int(env, "SLURM_PROCID")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if address is None and nodes:
            job = _int(env, "SLURM_JOB_ID")
            address = f"{first_host(nodes)}:{port or DEFAULT_PORT + (job or 0) % 10000}"
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        gpus = _int(env, "SLURM_GPUS_ON_NODE")
        if local_device_ids is None and per_node == "1" and gpus:
            local_device_ids = tuple(range(gpus))
    if address is not None and ":" not in address:
        address = f"{address}:{port or DEFAULT_PORT}"
    missing = [what for what, value in (("--coordinator_address (or JAX_COORDINATOR_ADDRESS)", address),
                                        ("--num_processes (or JAX_NUM_PROCESSES)", n),
                                        ("--process_id (or JAX_PROCESS_ID)", pid)) if value is None]
    if missing:
        raise ConfigError("the multi-host launcher needs " + ", ".join(missing) + "; pass them as flags, or "
                          "start it under SLURM (srun), which sets them.")
    return DistributedConfig(coordinator_address=address, num_processes=n, process_id=pid,
                             local_device_ids=tuple(local_device_ids) if local_device_ids is not None else None,
                             initialization_timeout=initialization_timeout)


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value.split("(")[0])
            except ValueError as e:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from e
    return None


def initialize(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` with `cfg`; CPU collectives go through gloo (no effect on GPU runs)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id,
                               local_device_ids=list(cfg.local_device_ids) if cfg.local_device_ids else None,
                               initialization_timeout=cfg.initialization_timeout)


def split_target(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, target) split at the first `--`; a leading `python` in the target is dropped."""
    argv = list(argv)
    if "--" not in argv:
        raise ConfigError("no target: put the entry point after `--`, e.g. `-- -m experiments.lora --mesh=fsdp:8`")
    i = argv.index("--")
    own, target = argv[:i], argv[i + 1:]
    if target and (os.path.basename(target[0]).startswith("python") or target[0] == sys.executable):
        target = target[1:]
    if not target or (target[0] == "-m" and len(target) < 2):
        raise ConfigError("empty target after `--`: give `-m <module> [args]` or `<script.py> [args]`")
    return own, target


def run_target(target: Sequence[str]) -> None:
    """Runs `-m module args...` or `script.py args...` in this process as `__main__` (sys.argv set to it)."""
    target = list(target)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")
