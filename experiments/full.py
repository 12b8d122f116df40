"""Full fine-tuning, the baseline every PEFT method is measured against: every weight is trained.

    python -m experiments.full [--lr=5e-5]

Same trainer and run folder as experiments.lora (see jaxpeft/train/run.py), except that the result is
model/, a whole Hugging Face folder (config, safetensors, tokenizer) that transformers loads, instead
of adapter/. There is nothing to merge, so --save_merged is refused.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments.common import define_run_flags, method_main, run_cli, run_in_process


# 5e-5: the usual full fine-tuning rate (transformers' Trainer default); LoRA's 1e-3 would wreck the base.
DEFAULT_LR = 5e-5


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=100, default_lr=DEFAULT_LR)


def full_config_from_flags(fv: flags.FlagValues):
    from jaxpeft.methods.full import FullConfig

    if fv.save_merged:
        raise app.UsageError("--save_merged means nothing for full fine-tuning: there is no adapter to merge, and "
                             "the trained model is already written whole to <out>/model/ (a Hugging Face folder). "
                             "Drop --save_merged.")
    return FullConfig()


main = method_main("full", full_config_from_flags)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.full ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
