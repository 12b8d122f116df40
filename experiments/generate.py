"""Generate text with a jaxpeft model (optionally with an adapter: PEFT LoRA/IA3/prefix/prompt, AdapterHub).

    python -m experiments.generate --prompt="Name three prime numbers." [--model=PATH] [--adapter=DIR]
        [--max_new_tokens=N] [--greedy | --temperature=0.7 --top_k=50 --top_p=0.9 --seed=0] [--nochat]

stdout holds the continuation only; logs go to stderr.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from experiments.common import define_param_dtype_flag, encode_prompt, log_to_stderr, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("prompt", None, "Prompt text.", required=True, flag_values=fv)
    flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).",
                        flag_values=fv)
    flags.DEFINE_string("adapter", None, "An adapter folder to apply: PEFT (LoRA, IA3, prefix, prompt; ours or "
                        "PEFT's) or AdapterHub.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 128, "Maximum number of new tokens.", flag_values=fv)
    flags.DEFINE_bool("greedy", False, "Greedy decoding (the default unless --temperature is given).", flag_values=fv)
    flags.DEFINE_float("temperature", None, "Sampling temperature; setting it turns on sampling.", flag_values=fv)
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens when sampling (0 = all).", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    define_param_dtype_flag(fv)
    flags.DEFINE_bool("chat", True, "Wrap the prompt in the tokenizer's chat template (--nochat: raw).", flag_values=fv)


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    log_to_stderr()
    import jaxpeft
    from jaxpeft.models.generate import SamplingConfig, generate, stop_ids_for

    if fv.greedy and fv.temperature is not None:
        raise app.UsageError("--greedy and --temperature contradict each other; pass one of them")
    sample = fv.temperature is not None or fv.top_k > 0 or fv.top_p < 1.0
    sampling = SamplingConfig(greedy=not sample, temperature=fv.temperature or 1.0, top_k=fv.top_k, top_p=fv.top_p)
    model, params, tokenizer = jaxpeft.from_pretrained(fv.model, param_dtype=fv.param_dtype)
    if fv.adapter:
        from jaxpeft.methods import load_adapter

        _, model, params, _ = load_adapter(fv.adapter, model, params)
    ids = encode_prompt(tokenizer, fv.prompt, chat=fv.chat)
    out = generate(model, params, [ids], max_new_tokens=fv.max_new_tokens, sampling=sampling,
                   stop_ids=stop_ids_for(tokenizer, model.config), pad_id=tokenizer.pad_token_id or 0,
                   seed=fv.seed)[0]
    sys.stdout.write(tokenizer.decode(out, skip_special_tokens=True) + "\n")


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.generate ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
