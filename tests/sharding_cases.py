"""The multi-device cases of tests/test_sharding.py, run in one subprocess with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set by the caller before JAX starts).

Prints one JSON object: per method (LoRA, QLoRA) and layout (one device, data, fsdp, tensor, mixed,
pmap) the loss and grad-norm curves, plus sharding facts and a checkpoint saved on one mesh and
restored on another. `python -m tests.sharding_cases` runs it by hand.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.llama import LlamaForCausalLM
from jaxpeft.quant import quantize_params
from jaxpeft.train import optim, sharding
from jaxpeft.train.checkpoint import Checkpointer
from jaxpeft.train.loop import TrainConfig, Trainer

# Sizes every axis of the test meshes divides (4 heads and 2 kv heads for tensor:2, hidden 48 for fsdp:8),
# still distinct so that a transposed split cannot hide. Blocks of 64: q/o/gate/up/down have 24 or 60
# blocks (split over fsdp x tensor), k/v 12 (replicated under fsdp:8: the fallback is exercised).
CONFIG = LlamaConfig(vocab_size=72, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
LAYOUTS = {"one_device": None, "data": "data:8", "fsdp": "fsdp:8", "tensor": "tensor:2",
           "mixed": "data:2,fsdp:2,tensor:2", "pmap": "pmap"}
# The default test run trains the layouts the other assertions read (mixed: the specs, grad_accum 2; fsdp: the
# NF4 fallback; pmap) and one device; `--all` (the slow test) adds every other (method, layout) pair.
DEFAULT_RUNS = {"lora": ("one_device", "mixed", "pmap"), "qlora": ("one_device", "mixed", "fsdp")}
STEPS, ROWS, SEQ = 3, 8, 12
LORA = get_method("lora")


def model_and_init():
    """The tiny model and its init function (key -> params)."""
    model = LlamaForCausalLM(CONFIG)
    return model, lambda k: model.init(k, jnp.zeros((1, SEQ), jnp.int32))["params"]


def model_and_params():
    model, init = model_and_init()
    return model, init, jax.tree.map(np.asarray, jax.jit(init)(jax.random.PRNGKey(0)))


def batches():
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(3, CONFIG.vocab_size, (ROWS, SEQ)).astype(np.int32)
        attention = np.ones_like(ids)
        attention[::3, -3:] = 0  # some padded rows
        loss_mask = np.zeros_like(ids)
        loss_mask[:, SEQ // 2:] = 1
        out.append({"input_ids": ids, "loss_mask": loss_mask * attention, "attention_mask": attention})
    return out


def adapted(params, quantized: bool):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    base = quantize_params(params, blocksize=64) if quantized else params
    tree = LORA.init(jax.random.PRNGKey(2), base, cfg)
    # A non-zero B, so that every adapter weight has a gradient from the first step.
    flat = flatten_params(tree)
    for path in [p for p in flat if p[-1] == "lora_b"]:
        b = np.asarray(flat[path])
        flat[path] = b + 0.01 * np.cos(np.arange(b.size)).reshape(b.shape).astype(b.dtype)
    tree = unflatten_params(flat)
    return tree, LORA.labels(tree, cfg)


def trainer(model, tree, labels, layout, *, grad_accum=1):
    parallel = None if layout is None else (
        sharding.ParallelConfig(parallel="pmap") if layout == "pmap" else sharding.ParallelConfig(mesh=layout))
    return Trainer(model, tree, labels, optim_cfg=optim.OptimConfig(lr=3e-3, total_steps=STEPS, warmup_steps=0),
                   train_cfg=TrainConfig(steps=STEPS, batch_size=ROWS, grad_accum=grad_accum), max_targets=64,
                   parallel=parallel)


def spec_of(x) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def main() -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    model, init, params = model_and_params()
    data = batches()
    out: dict = {"curves": {}}
    start = time.perf_counter()
    every = "--all" in sys.argv[1:]
    tmp = tempfile.TemporaryDirectory()
    ckpt = Checkpointer(tmp.name)
    for method in ("lora", "qlora"):
        tree, labels = adapted(params, method == "qlora")
        for name, layout in LAYOUTS.items():
            if not every and name not in DEFAULT_RUNS[method]:
                continue
            t = trainer(model, tree, labels, layout, grad_accum=2 if name == "mixed" else 1)
            records = []
            for i, b in enumerate(data):
                records.append(t.train_step(b))
                if method == "lora" and name == "one_device" and i == 1:
                    ckpt.save(2, t.state, {"data": {}})  # restored below onto the other layouts' meshes
            if method == "lora" and name in ("mixed", "pmap"):
                # The one-device checkpoint of step 2 restored onto this mesh: its third step continues the curve.
                t.state, _ = ckpt.restore(t.state)
                out[f"restored/{name}"] = {"step": t.step, "loss3": t.train_step(data[2])["loss"]}
                if name == "mixed":
                    out["restored_spec"] = spec_of(t.state["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["lora_b"])
            print(f"{method}/{name}: {time.perf_counter() - start:.1f} s wall, {time.process_time():.1f} s cpu so far", file=sys.stderr)
            start = time.perf_counter()
            out["curves"][f"{method}/{name}"] = {k: [r[k] for r in records] for k in ("loss", "grad_norm")}
            if method == "qlora" and name in ("mixed", "fsdp"):
                attn = t.frozen["model"]["layers"]["0"]["self_attn"]
                out[f"qlora_{name}_specs"] = {m: spec_of(attn[m]["qkernel"].packed) for m in ("q_proj", "k_proj")}
            if method == "lora" and name == "mixed":
                q = t.state["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
                mu = t.state["opt_state"][1][0].mu["model"]["layers"]["0"]["self_attn"]["q_proj"]
                out["lora_mixed_specs"] = {
                    "kernel": spec_of(t.frozen["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]),
                    "lora_a": spec_of(q["lora_a"]), "lora_b": spec_of(q["lora_b"]), "mu_lora_b": spec_of(mu["lora_b"]),
                    "embedding": spec_of(t.frozen["model"]["embed_tokens"]["embedding"]),
                    "lm_head": spec_of(t.frozen["lm_head"]["kernel"]),
                    "lora_b_shard": list(q["lora_b"].addressable_shards[0].data.shape)}

    ckpt.close()
    tmp.cleanup()

    # eval_shape initialisation: the same values as an unsharded init, created sharded.
    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
    sharded = sharding.init_params(init, jax.random.PRNGKey(0), mesh)
    kernel = sharded["model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"]
    out["init"] = {"max_abs_diff": float(max(np.max(np.abs(np.asarray(a) - b)) for a, b in zip(
        jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(params)))),
        "gate_spec": spec_of(kernel), "gate_shard": list(kernel.addressable_shards[0].data.shape)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
