"""Plan the memory of fine-tuning from shapes alone (no weights are read).

    python -m experiments.memory                                  # the table: Llama-2 7B/13B/70B x full/lora/qlora
    python -m experiments.memory --model=llama-7b --method=qlora --remat   # one breakdown, ending `peak: <N> GB`
    python -m experiments.memory --model=llama-7b --method=lora --dtype=float32 --param_dtype=float32 --crosscheck

--model is a preset (llama-7b, llama-13b, llama-70b) or an HF folder / config.json. Without --remat the
table shows both settings. --crosscheck compiles the real train step on abstract inputs for
--crosscheck_layers layers of the model's widths (0: all of them) and prints the plan beside XLA's
memory analysis; on the CPU it uses XLA's memory-minimising scheduler unless --nocpu_memory_scheduler.
"""

from __future__ import annotations

from absl import flags

from experiments.common import parse_targets, run_app

_MODEL = flags.DEFINE_string("model", None, "llama-7b | llama-13b | llama-70b | an HF folder or config.json.")
_METHOD = flags.DEFINE_enum("method", None, ["full", "lora", "qlora"], "Fine-tuning method to plan.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
_REMAT = flags.DEFINE_bool("remat", False, "Recompute each layer's activations in the backward.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank (lora, qlora).")
_TARGETS = flags.DEFINE_string("targets", "q_proj,k_proj,v_proj,o_proj",
                               "LoRA targets: module-name suffixes, 'all-linear', or re:<regex>.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                                 "Stored dtype of the base weights (full fine-tuning trains them).")
_BLOCKSIZE = flags.DEFINE_integer("blocksize", 64, "NF4 block size (qlora).")
_DOUBLE_QUANT = flags.DEFINE_bool("double_quant", True, "Quantize the NF4 block scales too (qlora).")
_CROSSCHECK = flags.DEFINE_bool("crosscheck", False, "Also compile the real train step and compare with XLA.")
_CROSS_LAYERS = flags.DEFINE_integer("crosscheck_layers", 2, "Layers of the cross-checked model (0: all).")
_CPU_SCHED = flags.DEFINE_bool("cpu_memory_scheduler", True,
                               "Cross-check with XLA's memory-minimising CPU scheduler.")


def _plan_config(method: str, remat: bool):
    from absl import app

    from jaxpeft.plan import PlanConfig

    try:
        targets = parse_targets(_TARGETS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    return PlanConfig(method=method, batch_size=_BATCH.value, seq_len=_SEQ.value, remat=remat, rank=_RANK.value,
                      targets=targets, dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value,
                      quant_blocksize=_BLOCKSIZE.value, double_quant=_DOUBLE_QUANT.value)


def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    if _CROSSCHECK.value and not (_MODEL.value and _METHOD.value):
        raise app.UsageError("--crosscheck needs --model and --method: it compiles that plan's train step")
    if _CROSSCHECK.value and _CPU_SCHED.value:
        from jaxpeft.plan.xla import use_memory_scheduler

        use_memory_scheduler()  # before JAX starts its backend
    from jaxpeft.plan import METHODS, PRESETS, layer_count_scaled, plan_memory, resolve_model
    from jaxpeft.plan.report import format_breakdown, format_crosscheck, format_table

    if _MODEL.value and _METHOD.value:
        label, config = resolve_model(_MODEL.value)
        plan_cfg = _plan_config(_METHOD.value, _REMAT.value)
        plan = plan_memory(config, plan_cfg)  # validates before the (slow) cross-check
        if _CROSSCHECK.value:
            from jaxpeft.plan.xla import crosscheck

            layers = _CROSS_LAYERS.value or config.num_hidden_layers
            print(format_crosscheck(crosscheck(layer_count_scaled(config, layers), plan_cfg), layers))
            print()
        print(format_breakdown(label, plan))
        return
    models = [resolve_model(_MODEL.value)] if _MODEL.value else [(name, cfg) for name, cfg in PRESETS.items()]
    methods = [_METHOD.value] if _METHOD.value else list(METHODS)
    remats = [_REMAT.value] if flags.FLAGS["remat"].present else [False, True]
    rows = {label: {m: {r: plan_memory(config, _plan_config(m, r)) for r in remats} for m in methods}
            for label, config in models}
    print(format_table(rows, _plan_config(methods[0], remats[0])))


if __name__ == "__main__":
    run_app(main)
