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

from absl import app, flags

from experiments.common import define_run_flags, method_main, run_app

define_run_flags(default_steps=100, default_lr=3e-2)
_TOKENS = flags.DEFINE_integer("num_virtual_tokens", 20, "Virtual tokens P put before every sequence.")
_INIT = flags.DEFINE_enum("prompt_init", "vocab", ["vocab", "random", "text"],
                          "Start from sampled vocabulary embeddings, N(0, 1), or the embeddings of --prompt_init_text.")
_TEXT = flags.DEFINE_string("prompt_init_text", None, "The text whose token embeddings start the prompt "
                            "(--prompt_init=text; at most --num_virtual_tokens tokens).")


def config_from_flags():
    from jaxpeft.methods.prompt import PromptConfig

    if (_INIT.value == "text") != (_TEXT.value is not None):
        raise app.UsageError("--prompt_init=text and --prompt_init_text go together: give both or neither")
    return PromptConfig(num_virtual_tokens=_TOKENS.value, init=_INIT.value, init_text=_TEXT.value)


main = method_main("prompt", config_from_flags)

if __name__ == "__main__":
    run_app(main)
