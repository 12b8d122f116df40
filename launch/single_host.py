"""Single-host launcher: every device of one machine, from one process (the default) or from several
processes joined by `jax.distributed` on loopback.

    python -m launch.single_host -- python -m experiments.lora --mesh=fsdp:4,tensor:2
    python -m launch.single_host --num_processes=8 --devices_per_process=1 -- -m experiments.lora --mesh=data:8
    python -m launch.single_host --platform=cpu --devices_per_process=8 -- -m experiments.lora --mesh=data:8

One process driving all GPUs is JAX's normal single-host mode and the fastest to start. Several
processes (one per GPU, as torchrun does) exercise the multi-host code path on one machine: each child
is `python -m launch.multihost` with a coordinator on 127.0.0.1 and its own devices (GPU ids
`--devices_per_process` at a time; on `--platform=cpu`, that many fake CPU devices each). The launcher
waits for the children, stops the others as soon as one fails, kills all of them after `--timeout`
seconds (exit code 124), and exits with the first non-zero code.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time

from launch import distributed


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, target = distributed.split_target(argv)
    p = argparse.ArgumentParser(prog="python -m launch.single_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--num_processes", type=int, default=1, help="processes to start (1: this one drives all)")
    p.add_argument("--devices_per_process", type=int, default=None,
                   help="GPUs per process (several processes), or fake CPU devices with --platform=cpu")
    p.add_argument("--platform", choices=["gpu", "cpu"], default="gpu", help="cpu: fake CPU devices (for trying)")
    p.add_argument("--timeout", type=float, default=0,
                   help="with several processes: kill them all after this many seconds (0: never)")
    p.add_argument("--initialization_timeout", type=int, default=300, help="seconds for the processes to join")
    args = p.parse_args(own)
    if args.num_processes < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
        p.error("--num_processes and --devices_per_process must be positive")
    if args.num_processes > 1 and args.platform == "gpu" and args.devices_per_process is None:
        p.error("several GPU processes need --devices_per_process (GPU ids are handed out that many at a time)")
    return args, target


def cpu_env(env: dict[str, str], devices: int) -> dict[str, str]:
    """`env` with JAX on the CPU and `devices` fake devices (any earlier device count replaced)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    return {**env, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Exit codes of a run stopped by SIGINT / SIGTERM after saving (jaxpeft.core.errors.RunStopped): not a failure.
STOPPED = (130, 143)
STOP_GRACE_S = 60.0


def spawn(args: argparse.Namespace, target: list[str]) -> int:
    """Starts the children, supervises them; returns the exit code."""
    address = f"127.0.0.1:{free_port()}"
    children = []
    for i in range(args.num_processes):
        cmd = [sys.executable, "-m", "launch.multihost", f"--coordinator_address={address}",
               f"--num_processes={args.num_processes}", f"--process_id={i}",
               f"--initialization_timeout={args.initialization_timeout}"]
        env = dict(os.environ)
        if args.platform == "cpu":
            env = cpu_env(env, args.devices_per_process or 1)
        else:
            g = args.devices_per_process
            cmd.append("--local_device_ids=" + ",".join(str(d) for d in range(i * g, (i + 1) * g)))
        children.append(subprocess.Popen([*cmd, "--", *target], env=env))
    deadline = time.monotonic() + args.timeout if args.timeout else None
    code, grace = 0, False
    while None in (codes := [c.poll() for c in children]):  # poll every child: any() would stop at the first
        failed = [c for c in codes if c not in (None, 0, *STOPPED)]
        if not grace and any(c in STOPPED for c in codes):
            # A run stopped on a signal: every process stops after the same step (train/run_guard.py);
            # the others get STOP_GRACE_S to finish saving and exit before they count as hung.
            grace, stop_by = True, time.monotonic() + STOP_GRACE_S
            deadline = min(deadline, stop_by) if deadline else stop_by
        if failed or (deadline and time.monotonic() > deadline):
            code = failed[0] if failed else 124
            sys.stderr.write(f"[launch.single_host] {'a process failed' if failed else 'timeout'}; stopping the others\n")
            _stop(children)
            break
        time.sleep(0.2)
    return code or next((c.returncode for c in children if c.returncode), 0)


def _stop(children: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL after 3 s: JAX's preemption notifier catches SIGTERM and keeps running."""
    for c in children:
        if c.poll() is None:
            c.terminate()
    for c in children:
        try:
            c.wait(timeout=3)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


def main(argv: list[str]) -> None:
    from jaxpeft.core.errors import ConfigError

    try:
        args, target = parse(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.num_processes > 1:
        sys.exit(spawn(args, target))
    import jax

    if args.platform == "cpu":
        os.environ.update(cpu_env(dict(os.environ), args.devices_per_process or 1))  # read when the backend starts
        jax.config.update("jax_platforms", "cpu")

    sys.stderr.write(f"[launch.single_host] {jax.device_count()} {jax.default_backend()} devices; "
                     f"running {' '.join(target)}\n")
    distributed.run_target(target)


if __name__ == "__main__":
    main(sys.argv[1:])
