"""The `expert` mesh axis (issue 14): expert parallelism on 8 fake CPU devices (tests/moe_sharding_cases.py, run in a
subprocess with XLA_FLAGS set before JAX starts), and the checks that need no extra devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.models.families import config_from_hf
from jaxpeft.train import sharding
from tests.hf_tiny import FAMILY_CASES, tiny_hf_config

ROOT = Path(__file__).resolve().parents[1]


def run_cases(*args: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {os.environ.get('XLA_FLAGS', '')}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.moe_sharding_cases", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_expert_axis_parses_and_refuses_an_expert_count_it_does_not_divide():
    assert sharding.parse_mesh("expert:4", 8) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}
    assert sharding.parse_mesh("expert:2,fsdp:2,data:2", 8) == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2}
    case = dict(FAMILY_CASES["mixtral"])
    config = config_from_hf(tiny_hf_config(case.pop("model_type"), **case).to_dict())
    assert config.num_experts == 7
    with pytest.raises(ConfigError) as err:
        sharding.check_model_fits({"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}, config, micro_rows=8)
    assert "expert:4 does not divide the 7 experts" in str(err.value), str(err.value)
    with pytest.raises(ConfigError) as err:
        sharding.check_model_fits({"data": 1, "fsdp": 1, "tensor": 1, "expert": 7}, config, micro_rows=8)
    assert "data x fsdp x expert = 1 x 1 x 7 = 7 devices share each micro-batch, which has 8 rows" in str(err.value)
    sharding.check_model_fits({"data": 1, "fsdp": 1, "tensor": 1, "expert": 7}, config, micro_rows=7)  # fits


def test_expert_parallel_step_sends_tokens_by_all_to_all_and_gathers_no_expert_weight():
    out = run_cases("qwen3_moe", "--hlo")
    e = out["experts"]
    assert out["collectives"]["all_to_all"] >= 2, out
    # Expert stacks (E, 2I, H), (E, H, I) and their LoRA factors (E, R, I), (E, O, R): every one is 3-D with E first;
    # the router's (H, E) kernel and token-side arrays may be gathered, no 3-D stack may.
    stacks = [s for s in out["collectives"]["all_gather_shapes"]
              if s.count(",") == 2 and s.split("[")[1].split(",")[0] == str(e)]
    assert not stacks, out["collectives"]


@pytest.mark.slow  # two 8-device subprocesses, three layouts each: ~40 s each on 2 loaded cores
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_axis_losses_equal_one_device(family):
    out = run_cases(family)
    one = out["curves"]["one_device"]
    for name in ("expert4", "mixed"):
        for key in ("loss", "grad_norm"):
            for a, b in zip(out["curves"][name][key], one[key]):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, key, out["curves"][name][key], one[key])
    assert out["specs"]["weight"] == ["expert", None, None] and out["specs"]["lora_a"] == ["expert", None, None]
    assert out["specs"]["lora_b"] == ["expert", None, None]
    assert out["specs"]["weight_shard"][0] == out["experts"] // 2  # expert:2 in the mixed layout
