"""Fine-tune a model with prompt tuning: trained virtual-token embeddings in front of every sequence.

    python -m experiments.prompt [--num_virtual_tokens=20] [--prompt_init=vocab|random|text
        --prompt_init_text="..."]

The flags and run folder of experiments.lora (see jaxpeft/train/run.py); adapter/ is a PEFT
PROMPT_TUNING folder (`peft.PeftModel.from_pretrained` loads it). --prompt_init=text starts from the
embeddings of the tokenized text, repeated to fill the virtual tokens (a text longer than them is an
error); vocab from randomly drawn vocabulary tokens; random from N(0, 1), as PEFT does. Prompt tuning
cannot be merged, so --save_merged is refused.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from experiments.common import define_run_flags, method_main, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    define_run_flags(fv, default_steps=100, default_lr=3e-2)
    flags.DEFINE_integer("num_virtual_tokens", 20, "Virtual tokens P put before every sequence.", flag_values=fv)
    flags.DEFINE_enum("prompt_init", "vocab", ["vocab", "random", "text"],
                      "Start from sampled vocabulary embeddings, N(0, 1), or the embeddings of --prompt_init_text.",
                      flag_values=fv)
    flags.DEFINE_string("prompt_init_text", None, "The text whose token embeddings start the prompt "
                        "(--prompt_init=text; at most --num_virtual_tokens tokens).", flag_values=fv)


def config_from_flags(fv: flags.FlagValues):
    from jaxpeft.methods.prompt import PromptConfig

    if (fv.prompt_init == "text") != (fv.prompt_init_text is not None):
        raise app.UsageError("--prompt_init=text and --prompt_init_text go together: give both or neither")
    return PromptConfig(num_virtual_tokens=fv.num_virtual_tokens, init=fv.prompt_init, init_text=fv.prompt_init_text)


main = method_main("prompt", config_from_flags)


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.prompt ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
