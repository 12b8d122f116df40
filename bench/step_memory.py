"""Memory of one LoRA / QLoRA train step on SmolLM2-135M: XLA's compiled plan and the process peak.

    python -m bench.step_memory --method=qlora --targets=all-linear [--batch_size=8 --seq_len=64 --remat]
    python -m bench.step_memory --method=lora --targets=q_proj,k_proj,v_proj,o_proj --batch_size=1 \
        --seq_len=4096 --attention=blockwise --remat --steps=0      # compile only: the plan, no run

Prints the compiled step's memory analysis (arguments = frozen base + state + batch, temporaries,
outputs) and the process RSS: after loading, after compiling, and the peak while running --steps steps
(the kernel's high-water mark is reset before the steps, Linux only). Run the two methods one after
another to compare them. `--steps=0` stops after compiling (long sequences: the compiled figure needs no
memory of its own). `--attention` picks the attention implementation (kernels/attention).
"""

from __future__ import annotations

import gc

from absl import app, flags

_METHOD = flags.DEFINE_enum("method", "qlora", ["lora", "qlora"], "LoRA on the fp32 base, or on the NF4 base.")
_TARGETS = flags.DEFINE_string("targets", "all-linear", "LoRA targets: all-linear or comma-separated suffixes.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps to run after compiling.")
_REMAT = flags.DEFINE_bool("remat", False, "Recompute each layer in the backward pass.")
_ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "dense", "blockwise", "cudnn"],
                               "Attention implementation (kernels/attention); auto: by platform and length.")
_BLOCK = flags.DEFINE_integer("attention_block", 512, "Query / key block of the blockwise attention.")


def _rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1e3
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _compile(trainer, micro):
    """The trainer's step compiled for `micro` (and cached where its runner looks, so running reuses it)."""
    import numpy as np

    from jaxpeft.train.sharding import place

    runner = trainer._runner
    batch = {k: place(np.asarray(v), runner._batch_sh) for k, v in micro.items()}
    aot = runner._step
    key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
    aot._compiled[key] = aot._fn.lower(trainer.state, trainer.frozen, batch).compile()
    return aot._compiled[key]


def main(argv) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxpeft
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train import optim
    from jaxpeft.train.loop import TrainConfig, Trainer

    if _METHOD.value == "qlora":
        from jaxpeft.convert.bnb import Bnb4bitConfig
        from jaxpeft.convert.load import QuantizedBaseLoader

        model, params, _, _ = QuantizedBaseLoader(Bnb4bitConfig())(None, dtype=jnp.float32, remat=_REMAT.value,
                                                                  load_tokenizer=False)
    else:
        model, params, _ = jaxpeft.from_pretrained(None, dtype=jnp.float32, remat=_REMAT.value, load_tokenizer=False)
    model = model.clone(attention=_ATTENTION.value, attention_block=_BLOCK.value)
    targets = _TARGETS.value if _TARGETS.value == "all-linear" else tuple(_TARGETS.value.split(","))
    lora, cfg = get_method("lora"), LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    params = lora.init(jax.random.PRNGKey(0), params, cfg)
    b, s = _BATCH.value, _SEQ.value
    trainer = Trainer(model, params, lora.labels(params, cfg), optim_cfg=optim.OptimConfig(lr=1e-3, total_steps=10),
                      train_cfg=TrainConfig(steps=10, batch_size=b), max_targets=b * 16)
    del params
    gc.collect()
    print(f"after load + init: rss {_rss_mb()['VmRSS']:.0f} MB")
    rng = np.random.default_rng(0)

    def batch():
        ids = rng.integers(3, model.config.vocab_size, (b, s)).astype(np.int32)
        loss_mask = np.zeros_like(ids)
        loss_mask[:, s - 16:] = 1
        return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": np.ones_like(ids)}

    first = batch()
    micro = {k: v[None] for k, v in first.items()}
    compiled = _compile(trainer, micro)
    m = compiled.memory_analysis()
    print(f"compiled step: arguments {m.argument_size_in_bytes / 1e6:.0f} MB, temporaries "
          f"{m.temp_size_in_bytes / 1e6:.0f} MB, outputs {m.output_size_in_bytes / 1e6:.0f} MB "
          f"(aliased {m.alias_size_in_bytes / 1e6:.0f} MB); temporaries + arguments "
          f"{(m.temp_size_in_bytes + m.argument_size_in_bytes) / 1e6:.0f} MB")
    print(f"after compile: rss {_rss_mb()['VmRSS']:.0f} MB")
    if _STEPS.value == 0:
        return
    _reset_peak()
    trainer.train_step(first)
    for _ in range(_STEPS.value - 1):
        trainer.train_step(batch())
    r = _rss_mb()
    print(f"{_STEPS.value} steps: rss {r['VmRSS']:.0f} MB, peak while stepping {r['VmHWM']:.0f} MB")


if __name__ == "__main__":
    app.run(main)
