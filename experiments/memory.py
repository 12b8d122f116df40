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

from typing import Sequence

from absl import flags

from experiments.common import parse_targets, run_app
from experiments.common import run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, "llama-7b | llama-13b | llama-70b | an HF folder or config.json.",
                        flag_values=fv)
    flags.DEFINE_enum("method", None, ["full", "lora", "qlora"], "Fine-tuning method to plan.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 1, "Sequences per step.", flag_values=fv)
    flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.", flag_values=fv)
    flags.DEFINE_bool("remat", False, "Recompute each layer's activations in the backward.", flag_values=fv)
    flags.DEFINE_integer("rank", 16, "LoRA rank (lora, qlora).", flag_values=fv)
    flags.DEFINE_string("targets", "q_proj,k_proj,v_proj,o_proj",
                        "LoRA targets: module-name suffixes, 'all-linear', or re:<regex>.", flag_values=fv)
    flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"],
                      "Compute dtype; auto: --param_dtype's.", flag_values=fv)
    flags.DEFINE_enum("param_dtype", "auto", ["auto", "bfloat16", "float16", "float32"],
                      "Stored dtype of the base weights (full fine-tuning trains them); auto: bfloat16 for a "
                      "preset, a folder's config.json dtype (as a training run loads it).", flag_values=fv)
    flags.DEFINE_integer("blocksize", 64, "NF4 block size (qlora).", flag_values=fv)
    flags.DEFINE_bool("double_quant", True, "Quantize the NF4 block scales too (qlora).", flag_values=fv)
    flags.DEFINE_bool("crosscheck", False, "Also compile the real train step and compare with XLA.", flag_values=fv)
    flags.DEFINE_integer("crosscheck_layers", 2, "Layers of the cross-checked model (0: all).", flag_values=fv)
    flags.DEFINE_bool("cpu_memory_scheduler", True,
                      "Cross-check with XLA's memory-minimising CPU scheduler.", flag_values=fv)


def _stored_dtype(model: str | None) -> str:
    """What --param_dtype=auto means for --model: a folder's config.json dtype, bfloat16 for a preset."""
    import json
    from pathlib import Path

    from jaxpeft.core.dtypes import config_dtype

    if model:
        path = Path(model).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if path.is_file():
            try:
                declared = config_dtype(json.loads(path.read_text()))
            except (ValueError, UnicodeDecodeError):
                return "bfloat16"  # resolve_model reports the bad file
            if declared:
                return declared
            try:  # no dtype declared: the tensors' (headers only), as from_pretrained resolves it
                from jaxpeft.convert.hf import read_hf_weights

                return read_hf_weights(path.parent).float_dtype() or "float32"
            except Exception:
                return "float32"  # a bare config.json: transformers' default
    return "bfloat16"


def _plan_config(fv: flags.FlagValues, method: str, remat: bool, model: str | None = None):
    from absl import app

    from jaxpeft.core.dtypes import resolve
    from jaxpeft.plan import PlanConfig

    try:
        targets = parse_targets(fv.targets)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    param_dtype = resolve(fv.param_dtype, _stored_dtype(model))
    return PlanConfig(method=method, batch_size=fv.batch_size, seq_len=fv.seq_len, remat=remat, rank=fv.rank,
                      targets=targets, dtype=resolve(fv.dtype, param_dtype), param_dtype=param_dtype,
                      quant_blocksize=fv.blocksize, double_quant=fv.double_quant)


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a --flag")
    if fv.crosscheck and not (fv.model and fv.method):
        raise app.UsageError("--crosscheck needs --model and --method: it compiles that plan's train step")
    if fv.crosscheck and fv.cpu_memory_scheduler:
        from jaxpeft.plan.xla import use_memory_scheduler

        use_memory_scheduler()  # before JAX starts its backend
    from jaxpeft.plan import METHODS, PRESETS, layer_count_scaled, plan_memory, resolve_model
    from jaxpeft.plan.report import format_breakdown, format_crosscheck, format_table

    if fv.model and fv.method:
        label, config = resolve_model(fv.model)
        plan_cfg = _plan_config(fv, fv.method, fv.remat, fv.model)
        plan = plan_memory(config, plan_cfg)  # validates before the (slow) cross-check
        if fv.crosscheck:
            from jaxpeft.plan.xla import crosscheck

            layers = fv.crosscheck_layers or config.num_hidden_layers
            print(format_crosscheck(crosscheck(layer_count_scaled(config, layers), plan_cfg), layers))
            print()
        print(format_breakdown(label, plan))
        return
    models = [resolve_model(fv.model)] if fv.model else [(name, cfg) for name, cfg in PRESETS.items()]
    methods = [fv.method] if fv.method else list(METHODS)
    remats = [fv.remat] if fv["remat"].present else [False, True]
    rows = {label: {m: {r: plan_memory(config, _plan_config(fv, m, r, fv.model)) for r in remats} for m in methods}
            for label, config in models}
    print(format_table(rows, _plan_config(fv, methods[0], remats[0], fv.model)))


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.memory ARGV[1:]` in this process (its own FlagValues); returns the exit code.

    --crosscheck's memory-minimising scheduler is an XLA flag read when JAX starts its backend: in a
    process that already started it, the cross-check compiles with the scheduler JAX started with.
    """
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    run_app(lambda argv: main(flags.FLAGS, argv))
