"""Fine-tune a model with prefix tuning: trained key/value prefixes in every attention layer.

    python -m experiments.prefix [--num_virtual_tokens=20] [--prefix_projection [--encoder_hidden_size=N]]

The flags and run folder of experiments.lora (see jaxpeft/train/run.py); adapter/ is a PEFT
PREFIX_TUNING folder (`peft.PeftModel.from_pretrained` loads it). --prefix_projection trains the prefixes
through PEFT's reparameterisation MLP (Embedding -> Linear -> Tanh -> Linear); only its output is saved.
Prefix tuning cannot be merged, so --save_merged is refused.
"""

from __future__ import annotations

from absl import app, flags

from experiments.common import define_run_flags, method_main, run_app

define_run_flags(default_steps=100, default_lr=1e-2)
_TOKENS = flags.DEFINE_integer("num_virtual_tokens", 20, "Prefix length P (key/value slots per layer).")
_PROJECTION = flags.DEFINE_bool("prefix_projection", False,
                                "Train the prefixes through PEFT's Embedding -> Linear -> Tanh -> Linear MLP.")
_HIDDEN = flags.DEFINE_integer("encoder_hidden_size", None,
                               "Hidden width of the --prefix_projection MLP (default: kv heads x head dim).")


def config_from_flags():
    from jaxpeft.methods.prefix import PrefixConfig

    if _HIDDEN.value is not None and not _PROJECTION.value:
        raise app.UsageError("--encoder_hidden_size sizes the reparameterisation MLP; add --prefix_projection "
                             "or drop it")
    return PrefixConfig(num_virtual_tokens=_TOKENS.value, prefix_projection=_PROJECTION.value,
                        encoder_hidden_size=_HIDDEN.value)


main = method_main("prefix", config_from_flags)

if __name__ == "__main__":
    run_app(main)
