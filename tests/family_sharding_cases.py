"""The multi-device loss curves of tests/sharding_cases.py for one tiny model of each other family, run in one
subprocess with 8 fake CPU devices (the caller sets XLA_FLAGS). `python -m tests.family_sharding_cases qwen3`
prints {layout: {"loss": [...], "grad_norm": [...]}} as JSON for LoRA on every linear of that family.

Sizes every mesh axis divides (4 heads, 2 kv heads, hidden 48), head_dim 16 != 48 / 4 so a split on the wrong
width cannot hide; the family's own features (q/k norms, windows) are on.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.models.families import build_model
from tests.sharding_cases import adapted, batches, trainer

LAYOUTS = {"one_device": None, "data": "data:8", "fsdp": "fsdp:8", "tensor": "tensor:2",
           "mixed": "data:2,fsdp:2,tensor:2"}
SHAPES = dict(vocab_size=72, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def family_config(name: str):
    if name == "qwen3":
        from jaxpeft.models.qwen3 import Qwen3Config

        return Qwen3Config(**SHAPES, sliding_window=5, layer_types=("full_attention", "sliding_attention"))
    if name in ("gemma2", "gemma3_text"):
        from jaxpeft.models.gemma import GemmaConfig

        return GemmaConfig(**SHAPES, model_type=name, sliding_window=5, qk_norm=name == "gemma3_text",
                           layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=10.0,
                           attn_logit_softcapping=0.05 if name == "gemma2" else None, final_logit_softcapping=0.5,
                           local_rope_theta=500.0)
    if name == "phi3":
        from jaxpeft.models.phi3 import Phi3Config

        shapes = {**SHAPES, "head_dim": 12}  # hidden 48 / 4 heads, as transformers' Phi-3 derives it
        return Phi3Config(**shapes, sliding_window=7, partial_rotary_factor=0.5, rope_type="longrope",
                          original_max_position_embeddings=8, short_factor=(1.1, 1.3, 1.7),
                          long_factor=(2.0, 3.0, 5.0))
    raise KeyError(f"no multi-device case for family {name!r}")


def main(name: str) -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    model = build_model(family_config(name))
    params = jax.tree.map(np.asarray, jax.jit(lambda k: model.init(k, jnp.zeros((1, 12), jnp.int32))["params"])(
        jax.random.PRNGKey(0)))
    tree, labels = adapted(params, False)
    data = batches()
    curves = {}
    for layout_name, layout in LAYOUTS.items():
        t = trainer(model, tree, labels, layout, grad_accum=2 if layout_name == "mixed" else 1)
        records = [t.train_step(b) for b in data]
        curves[layout_name] = {k: [float(r[k]) for r in records] for k in ("loss", "grad_norm")}
    json.dump(curves, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
