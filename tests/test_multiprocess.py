"""Multi-process training for real: two processes on the CPU joined by `jax.distributed` on loopback
(gloo collectives), started by the launchers in launch/, agree with one process; the launcher stops
hung or failed runs; SLURM's environment is read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError
from launch import distributed

ROOT = Path(__file__).resolve().parents[1]
# Backend optimisations off: both sides compile the same programs, and compiling is most of the cost here.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _launch(*args: str, timeout: float) -> tuple[int, str, float]:
    """Runs `python -m launch.single_host ARGS` in its own session; kills that session if it overruns."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST_COMPILE}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "launch.single_host", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the workers it started
        out, _ = proc.communicate()
        raise AssertionError(f"the launcher overran {timeout} s (a hung collective?):\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - start


@pytest.mark.slow  # three JAX interpreters (launcher, two workers) each compiling every layout: ~120 s of CPU; the layouts' numerics on one process are test_sharding's, the launcher's settings the tests below
def test_two_processes_over_jax_distributed_agree_with_one_process(tmp_path):
    rc, out, _ = _launch("--num_processes=2", "--platform=cpu", "--devices_per_process=2", "--timeout=420",
                         "--initialization_timeout=60", "--", "-m", "tests.multiprocess_worker", f"--out={tmp_path}",
                         timeout=480)
    assert rc == 0, out[-4000:]
    runs = [json.loads((tmp_path / f"losses_{i}.json").read_text()) for i in range(2)]
    assert runs[0] == runs[1]  # both processes saw the same global results
    assert (runs[0]["process_count"], runs[0]["device_count"], runs[0]["local_device_count"]) == (2, 4, 2)

    from tests.multiprocess_worker import LAYOUTS
    from tests.sharding_cases import adapted, batches, model_and_params, trainer

    model, _, params = model_and_params()
    tree, labels = adapted(params, False)
    single = trainer(model, tree, labels, None)
    reference = [single.train_step(b)["loss"] for b in batches()]
    assert reference[0] != reference[-1]
    for name in LAYOUTS:
        np.testing.assert_allclose(runs[0][name], reference, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.slow  # four more JAX interpreters and a timeout waited out: ~25 s wall; the settings and argv tests
# below stay in the default run
def test_a_failed_process_stops_the_others_and_a_hung_run_times_out(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import sys, time, jax\n"
                      "if jax.process_index() == 1 and sys.argv[1] == 'fail':\n    sys.exit(3)\n"
                      "time.sleep(120)\n")
    rc, out, took = _launch("--num_processes=2", "--platform=cpu", "--initialization_timeout=60", "--",
                            "python", str(script), "fail", timeout=100)
    assert rc == 3 and "a process failed" in out and took < 90, (rc, took, out[-2000:])
    rc, out, took = _launch("--num_processes=2", "--platform=cpu", "--timeout=5", "--initialization_timeout=60",
                            "--", str(script), "hang", timeout=100)
    assert rc == 124 and "timeout" in out and took < 90, (rc, took, out[-2000:])


def test_settings_come_from_flags_then_jax_then_slurm_variables():
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_JOB_NODELIST": "gpu[003-004,9],login1", "SLURM_GPUS_ON_NODE": "8"}
    cfg = distributed.resolve(env=slurm)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("gpu003:16563", 4, 2)
    assert cfg.local_device_ids == tuple(range(8))  # one task per node: all of its GPUs
    cfg = distributed.resolve(env={**slurm, "SLURM_NTASKS_PER_NODE": "8(x2)", "JAX_PROCESS_ID": "3"}, port=999)
    assert (cfg.coordinator_address, cfg.process_id, cfg.local_device_ids) == ("gpu003:999", 3, None)
    cfg = distributed.resolve(coordinator_address="10.0.0.1", num_processes=2, process_id=1, env=slurm)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:12321", 2, 1)
    assert distributed.first_host("node17") == "node17" and distributed.first_host("a[07-9]x,b") == "a07x"
    with pytest.raises(ConfigError) as err:
        distributed.resolve(num_processes=2, env={})
    assert "--coordinator_address" in str(err.value) and "--process_id" in str(err.value)
    assert "--num_processes" not in str(err.value)
    with pytest.raises(ConfigError, match=r"process_id=2: must be in \[0, 2\)"):
        distributed.resolve(coordinator_address="h:1", num_processes=2, process_id=2, env={})


def test_the_target_follows_the_double_dash():
    assert distributed.split_target(["--num_processes=2", "--", "python", "-m", "experiments.lora", "--rank=4"]) == (
        ["--num_processes=2"], ["-m", "experiments.lora", "--rank=4"])
    assert distributed.split_target(["--", "run.py", "--", "x"]) == ([], ["run.py", "--", "x"])
    for bad in (["--num_processes=2"], ["--"], ["--", "python", "-m"]):
        with pytest.raises(ConfigError):
            distributed.split_target(bad)
