"""Look at a dataset as training will see it: the first examples decoded with their target tokens marked,
and the token statistics; optionally a dump of every example.

    python -m experiments.data --dataset=F --model=M --seq_len=N [--train_on=...] [--chat_template=FILE]
        [--truncation=...] [--show=3] [--dump=OUT.jsonl]

Targets are green on a terminal and between « and » elsewhere (--color forces either). --dump writes one
line per example in the dataset's order (no shuffle, no held-out part), unpacked and unpadded:
{"input_ids": [...], "loss_mask": [...]}, loss_mask[t] == 1 when token t is a target. Only the tokenizer
is loaded, never the weights.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import flags

from experiments.common import define_dataset_flags, log_to_stderr, run_cli, run_in_process


def define_flags(fv: flags.FlagValues) -> None:
    define_dataset_flags(fv)
    flags.DEFINE_string("model", None, "HF folder, .gguf file or hub id whose tokenizer and chat template to use "
                        "(default: SmolLM2-135M-Instruct).", flag_values=fv)
    flags.DEFINE_integer("seq_len", 128, "Maximum tokens per example, as in training (at least 2).", lower_bound=2,
                         flag_values=fv)
    flags.DEFINE_integer("show", 3, "Examples to print decoded (0 or more).", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("dump", None, "Write every example to this JSONL file.", flag_values=fv)
    flags.DEFINE_bool("color", None, "Mark targets with colour (default: when stdout is a terminal).", flag_values=fv)


def main(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    del argv
    log_to_stderr()
    from jaxpeft.convert.hf import load_tokenizer_from
    from jaxpeft.convert.load import resolve_model_dir
    from jaxpeft.data import preview
    from jaxpeft.data.formats import parse_field_map

    tokenizer = load_tokenizer_from(resolve_model_dir(fv.model))
    examples, stats = preview.encode_dataset(
        tokenizer, fv.dataset, seq_len=fv.seq_len, split=fv.dataset_split, config=fv.dataset_config,
        text_field=fv.dataset_text_field, field_map=parse_field_map(fv.field_map), train_on=fv.train_on,
        truncation=fv.truncation, chat_template=fv.chat_template)
    color = sys.stdout.isatty() if fv.color is None else fv.color
    for i, example in enumerate(examples[: fv.show]):
        n, k = len(example["input_ids"]), sum(example["loss_mask"])
        sys.stdout.write(f"--- example {i}: {n} tokens, {k} targets{' (truncated)' * example['truncated']}\n")
        sys.stdout.write(preview.show_example(tokenizer, example, color=color) + "\n")
    sys.stdout.write("--- statistics\n" + json.dumps(preview.token_stats(examples, stats), indent=1) + "\n")
    if fv.dump:
        preview.write_dump(fv.dump, examples)
        sys.stdout.write(f"wrote {len(examples)} examples to {fv.dump}\n")


def run(argv: Sequence[str]) -> int:
    """`python -m experiments.data ARGV[1:]` in this process (its own FlagValues); returns the exit code."""
    return run_in_process(define_flags, main, argv, doc=__doc__)


if __name__ == "__main__":
    run_cli(define_flags, main)
