"""A DPO step's compiled memory next to an SFT LoRA step's over the same tokens.

    python -m bench.dpo_memory                       # SmolLM2-135M shapes, 4 pairs = 8 rows of 96 tokens
    python -m bench.dpo_memory --config=tiny --pairs=4 --seq=32

Both steps are jaxpeft's jitted train steps (train/step.py and preference/step.py) on the same LoRA tree,
compiled ahead of time from abstract shapes (no weights are made); the figure is XLA's
`memory_analysis()`: temporaries + arguments. DPO's batch is B pairs = 2B rows (chosen, then rejected); SFT's
is the same 2B rows with the same completion targets. The goal (issue 15) is DPO <= 1.3x SFT: the reference
pass runs under stop_gradient on the same weights, so it adds activations for one forward, not a model copy.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxpeft.core.partition import split_trainable
from jaxpeft.methods.lora import Lora, LoraConfig
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.llama import LlamaForCausalLM
from jaxpeft.preference.step import PreferenceConfig, preference_step_fn
from jaxpeft.train import optim
from jaxpeft.train.step import train_step_fn

CONFIGS = {
    "tiny": LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=52, num_hidden_layers=2,
                        num_attention_heads=5, num_key_value_heads=1, head_dim=8, max_position_embeddings=128),
    "smollm2": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                           tie_word_embeddings=True),
}


def compiled_bytes(step, state, frozen, batch) -> dict[str, int]:
    m = jax.jit(step).lower(state, frozen, batch).compile().memory_analysis()
    return {"temp": int(m.temp_size_in_bytes), "args": int(m.argument_size_in_bytes),
            "total": int(m.temp_size_in_bytes + m.argument_size_in_bytes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="smollm2", choices=sorted(CONFIGS))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--completion", type=int, default=8, help="completion tokens per row")
    ap.add_argument("--loss", default="dpo", choices=["dpo", "ipo", "orpo"])
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    model = LlamaForCausalLM(cfg)
    lora_cfg = LoraConfig(r=4 if args.config == "tiny" else 16, lora_alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))

    def init(key):
        params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        return Lora().init(key, params, lora_cfg)

    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    labels = Lora().labels(params, lora_cfg)
    trainable, frozen = split_trainable(params, labels)
    tx = optim.adamw(optim.OptimConfig(lr=1e-4, total_steps=10, warmup_steps=0))
    state = jax.eval_shape(lambda t: {"params": t, "opt_state": tx.init(t), "step": jnp.int32(0),
                                      "rng": jax.random.PRNGKey(0)}, trainable)
    rows, s = 2 * args.pairs, args.seq
    loss_mask = jnp.zeros((1, rows, s), jnp.int32).at[:, :, s - args.completion - 4:s - 4].set(1)
    batch = {"input_ids": jax.ShapeDtypeStruct((1, rows, s), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, rows, s), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct(loss_mask.shape, jnp.int32)}
    targets = -(-rows * args.completion // 8) * 8
    sft = compiled_bytes(train_step_fn(model, tx, max_targets=targets), state, frozen, batch)
    pref = PreferenceConfig(loss=args.loss)
    dpo = compiled_bytes(preference_step_fn(model, tx, pref, max_targets=targets,
                                            is_added=lambda p: Lora().is_added(p, lora_cfg)), state, frozen, batch)
    print(f"config {args.config}: {args.pairs} pairs = {rows} rows x {s} tokens, {args.completion} completion "
          f"tokens per row, LoRA r={lora_cfg.r} on q,k,v,o; loss {args.loss}")
    print(f"{'step':<10}{'temporaries MB':>16}{'arguments MB':>16}{'total MB':>12}")
    for name, m in (("sft", sft), (args.loss, dpo)):
        print(f"{name:<10}{m['temp'] / 2**20:>16.1f}{m['args'] / 2**20:>16.1f}{m['total'] / 2**20:>12.1f}")
    print(f"ratio {args.loss}/sft (temporaries + arguments): {dpo['total'] / sft['total']:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
