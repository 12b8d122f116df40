"""Generate text with a jaxpeft model (optionally with an adapter: PEFT LoRA/IA3/prefix/prompt, AdapterHub).

    python -m experiments.generate --prompt="Name three prime numbers." [--model=PATH] [--adapter=DIR]
        [--max_new_tokens=N] [--greedy | --temperature=0.7 --top_k=50 --top_p=0.9 --seed=0] [--nochat]

stdout holds the continuation only; logs go to stderr.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.common import encode_prompt, log_to_stderr, run_app

_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.", required=True)
_MODEL = flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
_ADAPTER = flags.DEFINE_string("adapter", None, "An adapter folder to apply: PEFT (LoRA, IA3, prefix, prompt; ours or PEFT's) or AdapterHub.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Maximum number of new tokens.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding (the default unless --temperature is given).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature; setting it turns on sampling.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens when sampling (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHAT = flags.DEFINE_bool("chat", True, "Wrap the prompt in the tokenizer's chat template (--nochat: raw).")


def main(argv) -> None:
    del argv
    log_to_stderr()
    import jaxpeft
    from jaxpeft.models.generate import SamplingConfig, generate, stop_ids_for

    if _GREEDY.value and _TEMPERATURE.value is not None:
        raise app.UsageError("--greedy and --temperature contradict each other; pass one of them")
    sample = _TEMPERATURE.value is not None or _TOP_K.value > 0 or _TOP_P.value < 1.0
    sampling = SamplingConfig(greedy=not sample, temperature=_TEMPERATURE.value or 1.0, top_k=_TOP_K.value,
                              top_p=_TOP_P.value)
    model, params, tokenizer = jaxpeft.from_pretrained(_MODEL.value)
    if _ADAPTER.value:
        from jaxpeft.methods import load_adapter

        _, model, params, _ = load_adapter(_ADAPTER.value, model, params)
    ids = encode_prompt(tokenizer, _PROMPT.value, chat=_CHAT.value)
    out = generate(model, params, [ids], max_new_tokens=_MAX_NEW.value, sampling=sampling,
                   stop_ids=stop_ids_for(tokenizer, model.config), pad_id=tokenizer.pad_token_id or 0,
                   seed=_SEED.value)[0]
    sys.stdout.write(tokenizer.decode(out, skip_special_tokens=True) + "\n")


if __name__ == "__main__":
    run_app(main)
