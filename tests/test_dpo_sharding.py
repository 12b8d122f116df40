"""8 fake CPU devices give one device's DPO losses and reward margins within 1e-5, on every mesh layout
(tests/dpo_sharding_cases.py in its own process: this one started JAX with one device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_sharding import FAKE_DEVICES, ROOT

pytestmark = pytest.mark.slow  # reason: a subprocess compiling the DPO step on four meshes (about 30 s here)


@pytest.fixture(scope="module")
def curves():
    env = {**os.environ, "XLA_FLAGS": FAKE_DEVICES, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.dpo_sharding_cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"tests.dpo_sharding_cases failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["data", "fsdp", "mixed"])
def test_eight_devices_give_the_one_device_dpo_losses(curves, layout):
    ref, got = curves["one_device"], curves[layout]
    assert len(got["loss"]) == 3 and got["loss"][0] != got["loss"][-1] and ref["margins"][-1] != 0.0
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["margins"], ref["margins"], atol=1e-5, rtol=0)
