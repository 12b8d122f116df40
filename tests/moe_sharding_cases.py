"""The expert-parallel cases of tests/test_moe_sharding.py, run in one subprocess with 8 fake CPU devices (the caller
sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts).

`python -m tests.moe_sharding_cases mixtral [--hlo]` prints JSON: per layout (one device, expert:4,
expert:2,fsdp:2,data:2) the loss and grad-norm curves of LoRA on every linear and on both expert stacks of the tiny
model of tests/hf_tiny.py FAMILY_CASES with 8 experts instead of its own count (7 for Mixtral, 6 for Qwen3-MoE:
expert:4 divides neither), plus the shardings of an expert stack and its LoRA factors; `--hlo` instead compiles
the expert:4 step only and reports its collectives (all-to-all count, every all-gather's shape).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.models.families import build_model, config_from_hf
from jaxpeft.train import optim, sharding
from jaxpeft.train.loop import TrainConfig, Trainer
from tests.hf_tiny import FAMILY_CASES, VOCAB, tiny_hf_config

EXPERTS = 8
LAYOUTS = {"one_device": None, "expert4": "expert:4", "mixed": "expert:2,fsdp:2,data:2"}
STEPS, ROWS, SEQ = 3, 8, 12
TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def model_config(family: str):
    case = dict(FAMILY_CASES[family])
    hf = tiny_hf_config(case.pop("model_type"), layers=2, **case)
    return dataclasses.replace(config_from_hf(hf.to_dict()), num_experts=EXPERTS)


def batches():
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(3, VOCAB, (ROWS, SEQ)).astype(np.int32)
        attention = np.ones_like(ids)
        attention[::3, -3:] = 0
        loss_mask = np.zeros_like(ids)
        loss_mask[:, SEQ // 2:] = 1
        out.append({"input_ids": ids, "loss_mask": loss_mask * attention, "attention_mask": attention})
    return out


def adapted(model):
    params = jax.tree.map(np.asarray, jax.jit(lambda k: model.init(k, jnp.zeros((1, SEQ), jnp.int32))["params"])(
        jax.random.PRNGKey(0)))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", target_parameters=TARGETS,
                     init_lora_weights="gaussian")
    lora = get_method("lora")
    tree = lora.init(jax.random.PRNGKey(2), params, cfg)
    flat = flatten_params(tree)
    for path in [p for p in flat if p[-1] == "lora_b"]:  # non-zero B: every factor has a gradient from step one
        b = np.asarray(flat[path])
        flat[path] = b + 0.01 * np.cos(np.arange(b.size)).reshape(b.shape).astype(b.dtype)
    tree = unflatten_params(flat)
    return tree, lora.labels(tree, cfg)


def trainer(model, tree, labels, layout):
    parallel = None if layout is None else sharding.ParallelConfig(mesh=layout)
    return Trainer(model, tree, labels, optim_cfg=optim.OptimConfig(lr=3e-3, total_steps=STEPS, warmup_steps=0),
                   train_cfg=TrainConfig(steps=STEPS, batch_size=ROWS), max_targets=64, parallel=parallel)


def spec_of(x) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def collectives(hlo: str) -> dict:
    gathers = re.findall(r"= ([a-z0-9]+\[[0-9,]*\])[^=\n]*? all-gather(?:-start)?\(", hlo)
    return {"all_to_all": len(re.findall(r" all-to-all(?:-start)?\(", hlo)), "all_gather_shapes": gathers}


def main(family: str, hlo_only: bool) -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    config = model_config(family)
    model = build_model(config)
    tree, labels = adapted(model)
    data = batches()
    out: dict = {"curves": {}, "experts": config.num_experts, "hidden": config.hidden_size,
                 "width": config.moe_intermediate_size}
    for name, layout in LAYOUTS.items():
        if hlo_only and name != "expert4":
            continue
        t = trainer(model, tree, labels, layout)
        if hlo_only:
            out["collectives"] = collectives(t.compiled_step(data[0]).as_text())
            break
        records = [t.train_step(b) for b in data]
        out["curves"][name] = {k: [float(r[k]) for r in records] for k in ("loss", "grad_norm")}
        if name == "mixed":
            layer = next(k for k in sorted(t.frozen["model"]["layers"], key=int)
                         if "experts" in t.frozen["model"]["layers"][k]["mlp"])
            frozen = t.frozen["model"]["layers"][layer]["mlp"]["experts"]["gate_up_proj"]["weight"]
            lora = t.state["params"]["model"]["layers"][layer]["mlp"]["experts"]["gate_up_proj"]
            out["specs"] = {"weight": spec_of(frozen), "lora_a": spec_of(lora["lora_a"]),
                            "lora_b": spec_of(lora["lora_b"]),
                            "weight_shard": list(frozen.addressable_shards[0].data.shape)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], "--hlo" in sys.argv[2:])
