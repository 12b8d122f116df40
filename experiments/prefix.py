"""Fine-tune a model with prefix tuning: trained key/value prefixes in every attention layer.

    python -m experiments.prefix [--num_virtual_tokens=20] [--prefix_projection [--encoder_hidden_size=N]]

The flags and run folder of experiments.lora (see jaxpeft/train/run.py); adapter/ is a PEFT
PREFIX_TUNING folder (`peft.PeftModel.from_pretrained` loads it). --prefix_projection trains the prefixes
through PEFT's reparameterisation MLP (Embedding -> Linear -> Tanh -> Linear); only its output is saved.
Prefix tuning cannot be merged, so --save_merged is refused.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments.common import define_run_flags, method_main, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=100, default_lr=1e-2)
    flags.DEFINE_integer("num_virtual_tokens", 20, "Prefix length P (key/value slots per layer).", flag_values=fv)
    flags.DEFINE_bool("prefix_projection", False,
                      "Train the prefixes through PEFT's Embedding -> Linear -> Tanh -> Linear MLP.", flag_values=fv)
    flags.DEFINE_integer("encoder_hidden_size", None,
                         "Hidden width of the --prefix_projection MLP (default: kv heads x head dim).", flag_values=fv)


def config_from_flags(fv: flags.FlagValues):
    from jaxpeft.methods.prefix import PrefixConfig

    if fv.encoder_hidden_size is not None and not fv.prefix_projection:
        raise app.UsageError("--encoder_hidden_size sizes the reparameterisation MLP; add --prefix_projection "
                             "or drop it")
    return PrefixConfig(num_virtual_tokens=fv.num_virtual_tokens, prefix_projection=fv.prefix_projection,
                        encoder_hidden_size=fv.encoder_hidden_size)


main = method_main("prefix", config_from_flags)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.prefix ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
