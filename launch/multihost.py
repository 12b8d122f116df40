"""Multi-host launcher: one process per host (or per GPU), joined by `jax.distributed.initialize`, each
running the same entry point in-process.

    python -m launch.multihost [--coordinator_address=HOST:PORT --num_processes=N --process_id=I] \\
        -- python -m experiments.lora --mesh=data:2,fsdp:8

Unset settings come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then from SLURM
(srun sets SLURM_NTASKS, SLURM_PROCID and the node list; see launch/slurm.sbatch). Every process runs
the whole entry point: the mesh spans every device of every process (launch/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from launch import distributed


def parse(argv: list[str]) -> tuple[distributed.DistributedConfig, list[str]]:
    own, target = distributed.split_target(argv)
    p = argparse.ArgumentParser(prog="python -m launch.multihost", description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator_address", help="host:port of process 0 (default: env / SLURM's first node)")
    p.add_argument("--port", type=int, help=f"coordinator port when the address has none (default "
                                            f"{distributed.DEFAULT_PORT} + SLURM_JOB_ID %% 10000)")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    p.add_argument("--local_device_ids", help="comma-separated device ids this process owns (default: all)")
    p.add_argument("--initialization_timeout", type=int, default=300, help="seconds to wait for every process")
    args = p.parse_args(own)
    ids = [int(i) for i in args.local_device_ids.split(",")] if args.local_device_ids else None
    cfg = distributed.resolve(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                              process_id=args.process_id, local_device_ids=ids, port=args.port,
                              initialization_timeout=args.initialization_timeout)
    return cfg, target


def main(argv: list[str]) -> None:
    from jaxpeft.core.errors import ConfigError

    try:
        cfg, target = parse(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    distributed.initialize(cfg)
    import jax

    sys.stderr.write(f"[launch.multihost] process {jax.process_index()}/{jax.process_count()}: "
                     f"{jax.local_device_count()} local of {jax.device_count()} devices; running {' '.join(target)}\n")
    try:
        distributed.run_target(target)
    except SystemExit as e:
        if e.code not in (None, 0):
            if not isinstance(e.code, int):
                sys.stderr.write(f"{e.code}\n")
            _exit_now(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:
        traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    """Exits at once: a normal exit would wait in jax.distributed's shutdown barrier for the healthy
    processes (up to its 5-minute timeout), so the launcher could not see the failure and stop them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
