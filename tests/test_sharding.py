"""Multi-device training: every mesh layout and pmap give the one-device loss curve (LoRA and QLoRA),
parameters follow the axis rules, checkpoints restore onto another mesh, bad meshes fail clearly.

The multi-device cases run in ONE subprocess with 8 fake CPU devices (tests/sharding_cases.py): this
process already started JAX with one device. That subprocess compiles with XLA's backend optimisations
off (the same program on every layout, so the comparison stands) to keep its compile time, which is
most of its cost, within the test budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.quant import quantize_params
from jaxpeft.train import optim, sharding
from jaxpeft.train.loop import TrainConfig, Trainer
from tests.sharding_cases import CONFIG, DEFAULT_RUNS, LAYOUTS, model_and_init, model_and_params

ROOT = Path(__file__).resolve().parents[1]
FAKE_DEVICES = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")


def _run_cases(*args: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": FAKE_DEVICES, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_cases", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise AssertionError(f"tests.sharding_cases failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def cases():
    return _run_cases()


@pytest.fixture(scope="module")
def all_cases():
    return _run_cases("--all")


# The default run trains DEFAULT_RUNS (each layout's step compiles anew: ~25 s of CPU apiece on 2 cores);
# every other (method, layout) pair is slow, in its own subprocess with all of them.
CURVE_CASES = [pytest.param(layout, method, marks=() if layout in DEFAULT_RUNS[method] else pytest.mark.slow(
    reason="another layout's compile: the default run keeps one of each kind"))
    for method in ("lora", "qlora") for layout in LAYOUTS if layout != "one_device"]


@pytest.mark.parametrize("layout,method", CURVE_CASES)
def test_every_layout_gives_the_one_device_loss_curve(request, layout, method):
    found = request.getfixturevalue("cases" if layout in DEFAULT_RUNS[method] else "all_cases")
    ref, got = found["curves"][f"{method}/one_device"], found["curves"][f"{method}/{layout}"]
    assert len(got["loss"]) == 3 and got["loss"][0] != got["loss"][-1]  # three real, different steps
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], atol=1e-5, rtol=0)


def test_parameters_adapters_and_optimizer_state_follow_the_rules(cases):
    specs = cases["lora_mixed_specs"]  # data:2,fsdp:2,tensor:2
    assert specs["kernel"] == ["fsdp", "tensor"]  # q_proj (D, H*E): D over fsdp, heads over tensor
    assert specs["lora_a"] == ["fsdp", None]  # (I, R): I like the kernel's, rank replicated
    assert specs["lora_b"] == [None, "tensor"] == specs["mu_lora_b"]  # (R, O); Adam's mu alike
    assert specs["lora_b_shard"] == [4, 32 // 2]  # rank 4 whole, 32 outputs split in two
    assert specs["embedding"] == ["tensor", "fsdp"] and specs["lm_head"] == ["fsdp", "tensor"]


def test_nf4_codes_are_split_along_blocks_or_replicated(cases):
    # q_proj: 48 x 32 / 64 = 24 blocks; k_proj: 48 x 16 / 64 = 12 blocks.
    assert cases["qlora_mixed_specs"] == {"q_proj": [["fsdp", "tensor"], None], "k_proj": [["fsdp", "tensor"], None]}
    # fsdp:8 divides 24 blocks but not 12: k_proj's codes are replicated.
    assert cases["qlora_fsdp_specs"] == {"q_proj": ["fsdp", None], "k_proj": [None, None]}


def test_checkpoint_saved_on_one_mesh_restores_onto_another(cases):
    third = cases["curves"]["lora/one_device"]["loss"][2]
    for target in ("mixed", "pmap"):  # saved on one device after two steps, restored on data:2,fsdp:2,tensor:2 and pmap
        restored = cases[f"restored/{target}"]
        assert restored["step"] == 2
        assert restored["loss3"] == pytest.approx(third, abs=1e-5)
    assert cases["restored_spec"] == [None, "tensor"]  # up_proj's lora_b now split over tensor


def test_eval_shape_init_creates_sharded_parameters_equal_to_the_unsharded_ones(cases):
    init = cases["init"]
    assert init["max_abs_diff"] < 1e-6
    assert init["gate_spec"] == ["fsdp", "tensor"] and init["gate_shard"] == [48 // 2, 80 // 2]


# ---- in this process (one device): the rules as data, and bad input ------------------------------------

def _abstract_tree():
    _, init = model_and_init()
    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    cfg = LoraConfig(r=4, target_modules=("q_proj", "down_proj"))
    quantized = jax.eval_shape(lambda p: quantize_params(p, targets=("k_proj", "gate_proj")), params)
    return jax.eval_shape(lambda p: get_method("lora").init(jax.random.PRNGKey(1), p, cfg), quantized)


def test_axis_rules_for_every_parameter():
    specs = flatten_params(sharding.param_specs(_abstract_tree(), {"data": 2, "fsdp": 2, "tensor": 2}))
    layer = {"/".join(p[3:]): s for p, s in specs.items() if p[:3] == ("model", "layers", "0")}
    packed = lambda s: (s.packed, s.absmax, s.nested_absmax, s.offset)  # noqa: E731
    blocks = ("fsdp", "tensor")
    expected = {
        "input_layernorm/weight": P(None), "post_attention_layernorm/weight": P(None),
        "self_attn/q_proj/kernel": P("fsdp", "tensor"), "self_attn/q_proj/lora_a": P("fsdp", None),
        "self_attn/q_proj/lora_b": P(None, "tensor"), "self_attn/q_proj/lora_scale": P(),
        "self_attn/v_proj/kernel": P("fsdp", "tensor"), "self_attn/o_proj/kernel": P("tensor", "fsdp"),
        "mlp/up_proj/kernel": P("fsdp", "tensor"), "mlp/down_proj/kernel": P("tensor", "fsdp"),
        "mlp/down_proj/lora_a": P("tensor", None), "mlp/down_proj/lora_b": P(None, "fsdp"),
        "mlp/down_proj/lora_scale": P(),
    }
    quantized = {k: packed(v) for k, v in layer.items() if k in ("self_attn/k_proj/qkernel", "mlp/gate_proj/qkernel")}
    assert {k: v for k, v in layer.items() if k not in quantized} == expected
    assert quantized == {k: (P(blocks, None), P(blocks), P(), P()) for k in quantized}
    assert specs[("model", "embed_tokens", "embedding")] == P("tensor", "fsdp")
    assert specs[("model", "norm", "weight")] == P(None)
    assert specs[("lm_head", "kernel")] == P("fsdp", "tensor")


def test_vocabulary_fallback_and_soft_prompt_rules():
    leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    tree = {"model": {"embed_tokens": {"embedding": leaf(71, 48)},
                      "layers": {"0": {"self_attn": {"prefix_key": leaf(3, 16), "odd_adapter": leaf(5, 48)}}}},
            "prompt": {"embeddings": leaf(3, 48)}}
    spec = flatten_params(sharding.param_specs(tree, {"data": 1, "fsdp": 2, "tensor": 2}))
    assert spec[("model", "embed_tokens", "embedding")] == P(None, "fsdp")  # 71 words: vocab replicated
    assert spec[("model", "layers", "0", "self_attn", "prefix_key")] == P(None, "tensor")
    assert spec[("prompt", "embeddings")] == P(None, "fsdp")
    assert spec[("model", "layers", "0", "self_attn", "odd_adapter")] == P()  # no rule: replicated


def test_mesh_text_is_parsed_and_checked_against_the_device_count():
    assert sharding.parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
    assert sharding.parse_mesh("tensor:2", 8) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    assert sharding.parse_mesh("data:2,fsdp:2,tensor:2", 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    with pytest.raises(ConfigError, match=r"data:2 x fsdp:2 x tensor:3 = 12 devices, but there are 8"):
        sharding.parse_mesh("data:2,fsdp:2,tensor:3", 8)
    with pytest.raises(ConfigError, match=r"tensor:3 = 3 devices does not divide the 8 devices"):
        sharding.parse_mesh("tensor:3", 8)
    with pytest.raises(ConfigError) as err:
        sharding.parse_mesh("model:2,data:x,data:2,data:4", 8)
    assert "unknown axis 'model'" in str(err.value) and "'data:x'" in str(err.value) and "given twice" in str(err.value)


def test_a_mesh_that_does_not_divide_the_model_names_the_axis_and_the_sizes():
    with pytest.raises(ConfigError) as err:
        sharding.check_model_fits({"data": 1, "fsdp": 5, "tensor": 3}, CONFIG, micro_rows=8)
    msg = str(err.value)
    for part in ("tensor:3 does not divide the 4 attention heads", "tensor:3 does not divide the 2 kv heads",
                 "tensor:3 does not divide the 80 MLP width", "fsdp:5 does not divide the 48 hidden size",
                 "1 x 5 = 5 devices share each micro-batch, which has 8 rows"):
        assert part in msg, msg
    sharding.check_model_fits({"data": 2, "fsdp": 2, "tensor": 2}, CONFIG, micro_rows=8)  # fits: no error


def test_trainer_refuses_a_mesh_larger_than_the_machine_and_pmap_with_a_mesh():
    model, _, params = model_and_params()
    cfg = LoraConfig(r=2)
    lora = get_method("lora")
    adapted = lora.init(jax.random.PRNGKey(0), params, cfg)
    with pytest.raises(ConfigError, match=f"there are {jax.device_count()}"):
        Trainer(model, adapted, lora.labels(adapted, cfg), optim_cfg=optim.OptimConfig(),
                train_cfg=TrainConfig(steps=1, batch_size=8), max_targets=8,
                parallel=sharding.ParallelConfig(mesh=f"data:{jax.device_count() + 1}"))
    with pytest.raises(ConfigError, match="takes no --mesh"):
        sharding.ParallelConfig(mesh="data:2", parallel="pmap")
    assert sharding.resolve_parallel(None, "jit") is None  # one device, no mesh: the plain path


@pytest.mark.slow
def test_the_entry_point_under_the_launcher_gives_the_one_device_losses(tmp_path):
    from jaxpeft.train.metrics import read_metrics
    from tests.hf_tiny import tiny_model_folder

    model = tiny_model_folder(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    losses = {}
    for name, devices, extra in (("plain", 1, []), ("mesh", 4, ["--mesh=data:2,fsdp:2"]),
                                 ("pmap", 4, ["--parallel=pmap"])):
        subprocess.run([sys.executable, "-m", "launch.single_host", "--platform=cpu",
                        f"--devices_per_process={devices}", "--", "python", "-m", "experiments.lora",
                        f"--model={model}", "--rank=4", "--steps=3", "--batch_size=4", "--eval_examples=4",
                        f"--out={tmp_path / name}", "--noprogress", *extra],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    assert len(losses["plain"]) == 3
    for name in ("mesh", "pmap"):
        np.testing.assert_allclose(losses[name], losses["plain"], atol=1e-5, rtol=0, err_msg=name)
