"""DPO on 8 fake CPU devices (the caller sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX
starts): per layout the loss and rewards/margins curves of three steps, printed as one JSON object, for
tests/test_dpo_sharding.py to compare with one device. `python -m tests.dpo_sharding_cases` runs it by hand."""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxpeft.preference.step import PreferenceConfig, preference_step_fn
from jaxpeft.train import optim, sharding
from jaxpeft.train.loop import TrainConfig, Trainer
from tests.sharding_cases import CONFIG, LORA, SEQ, STEPS, adapted, model_and_params

LAYOUTS = {"one_device": None, "data": "data:8", "fsdp": "fsdp:8", "mixed": "data:2,fsdp:2,tensor:2"}
PAIRS = 4  # 8 rows: the 4 chosen, then the 4 rejected


def batches():
    rng = np.random.default_rng(5)
    out = []
    for _ in range(STEPS):
        prompt = rng.integers(3, CONFIG.vocab_size, (PAIRS, SEQ // 2))
        ids = np.concatenate([np.concatenate([prompt, rng.integers(3, CONFIG.vocab_size, (PAIRS, SEQ - SEQ // 2))], 1)
                              for _ in range(2)]).astype(np.int32)
        attention = np.ones_like(ids)
        attention[::3, -2:] = 0
        loss_mask = np.zeros_like(ids)
        loss_mask[:, SEQ // 2:] = 1
        out.append({"input_ids": ids, "loss_mask": loss_mask * attention, "attention_mask": attention})
    return out


def main() -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    model, _, params = model_and_params()
    tree, labels = adapted(params, False)
    from jaxpeft.methods.lora import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    pref = PreferenceConfig(loss="dpo", beta=0.5)
    out = {}
    for name, layout in LAYOUTS.items():
        parallel = None if layout is None else sharding.ParallelConfig(mesh=layout)
        t = Trainer(model, tree, labels, optim_cfg=optim.OptimConfig(lr=3e-3, total_steps=STEPS, warmup_steps=0),
                    train_cfg=TrainConfig(steps=STEPS, batch_size=PAIRS), max_targets=64, parallel=parallel,
                    log_metrics=pref.metric_names(), rows_per_example=2,
                    make_step=lambda tx: preference_step_fn(model, tx, pref, max_targets=64,
                                                            is_added=lambda p: LORA.is_added(p, cfg)))
        records = [t.train_step(b) for b in batches()]
        out[name] = {"loss": [r["loss"] for r in records], "margins": [r["rewards/margins"] for r in records]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
