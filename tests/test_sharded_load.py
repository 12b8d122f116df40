"""Sharded loading at size (slow): a 1 GB bf16 checkpoint read straight onto an fsdp:8 mesh. The loader's
own count of the bytes it asked for shows each device reading only its 1/8 of each sharded tensor, the
process holds about the checkpoint once, and with two processes each reads about half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.big_model import generate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    info = generate(folder, layers=6, shard_gb=0.4, seed=0, tokenizer=False, hidden=2048, intermediate=5632,
                    heads=16)
    assert info["bytes"] >= 1e9 and info["shards"] >= 3
    return folder


def _check_device_reads(r: dict) -> None:
    devices = r["devices"]
    for name, sizes in r["requests"].items():
        if r["ndim"][name] < 2:
            continue  # norms are replicated: every device reads the whole (tiny) vector
        limit = r["tensor_bytes"][name] / devices + r["row_bytes"][name]
        assert max(sizes) <= limit, (name, max(sizes), r["tensor_bytes"][name])
        assert len(sizes) == r["local_devices"], (name, len(sizes))


def test_fsdp8_load_reads_one_eighth_per_device(checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {os.environ.get('XLA_FLAGS', '')}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tests.sharded_load_worker", f"--model={checkpoint}",
                          f"--out={tmp_path}", "--mesh=fsdp:8"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "load_0.json").read_text())
    assert r["devices"] == 8
    _check_device_reads(r)
    assert r["requested_total"] <= 1.01 * r["checkpoint_bytes"]
    assert r["peak_rss"] - r["baseline_rss"] <= 1.2 * r["checkpoint_bytes"], (r["peak_rss"], r["baseline_rss"])


def test_two_processes_each_read_about_half(checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "launch.single_host", "--num_processes=2", "--platform=cpu",
                          "--devices_per_process=4", "--timeout=500", "--initialization_timeout=60", "--", "-m",
                          "tests.sharded_load_worker", f"--model={checkpoint}", f"--out={tmp_path}", "--mesh=fsdp:8"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for i in range(2):
        r = json.loads((tmp_path / f"load_{i}.json").read_text())
        assert (r["process_count"], r["devices"], r["local_devices"]) == (2, 8, 4)
        _check_device_reads(r)
        assert r["requested_total"] <= 0.55 * r["checkpoint_bytes"], (i, r["requested_total"], r["checkpoint_bytes"])
