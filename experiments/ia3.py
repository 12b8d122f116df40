"""Fine-tune a model with IA3 (learned scaling vectors on k_proj, v_proj and, input-side, down_proj).

    python -m experiments.ia3 [--targets=k_proj,v_proj,down_proj] [--feedforward=down_proj]

Same run folder as experiments.lora (see jaxpeft/train/run.py): adapter/ is a PEFT IA3 folder, and
--save_merged writes merged/ (IA3 folds into the weights). IA3 trains a few thousand parameters, so it
needs a much larger learning rate than LoRA.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments.common import define_run_flags, method_main, parse_targets, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=100, default_lr=1e-2)
    flags.DEFINE_string("targets", "k_proj,v_proj,down_proj",
                        "Module-name suffixes (comma-separated), 'all-linear', or re:<regex>.", flag_values=fv)
    flags.DEFINE_string("feedforward", "down_proj",
                        "Targets whose input (not output) is scaled: suffixes (comma-separated, a subset of --targets) "
                        "or re:<regex>; empty for none.", flag_values=fv)


def ia3_config_from_flags(fv: flags.FlagValues):
    """IA3Config from the flags; a bad --targets is a usage error (a bad combination is a ConfigError)."""
    from jaxpeft.methods.ia3 import IA3Config

    f = fv
    try:
        targets = parse_targets(f.targets)
        feedforward = parse_targets(f.feedforward) if f.feedforward.strip() else ()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    return IA3Config(target_modules=targets, feedforward_modules=feedforward)


main = method_main("ia3", ia3_config_from_flags)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.ia3 ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
