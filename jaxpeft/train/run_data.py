"""The data of one run: records loaded and encoded, the held-out examples, and the training stream.

The builtin task carries its own held-out split and scorer; a file gets a held-out fraction (5 %) unless
the run names an eval split or dataset. The held-out loss and the generation metrics use the same first
`eval_examples` records; `eval_examples=0` turns the evaluation off (the training data stays the same).

Shapes: a training batch is `batch_size` rows padded to its longest row rounded up to a length bucket
(`batching.length_buckets` of `RunData.seq_len`), so the step compiles once per bucket the stream reaches.
`RunData.seq_len`, the widest bucket, is the longest example rounded up to 16 (at most --seq_len), or with
packing --seq_len itself, unless no two examples fit in one row of --seq_len (then packing changes nothing
and the unpacked bound holds). Evaluation batches are that wide (`ordered_batches`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from absl import logging

from jaxpeft.core.errors import ConfigError
from jaxpeft.data import tasks
from jaxpeft.data.batching import Batcher, length_buckets
from jaxpeft.data.encode import encode_records, pad_id_of
from jaxpeft.data.formats import parse_field_map
from jaxpeft.data.records import Record, load_records
from jaxpeft.data.targets import use_chat_template_file
from jaxpeft.train.run_config import RunConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunData:
    """What a run trains and evaluates on; `seq_len` is the effective (static) row length."""

    encoded: list[Record]  # training examples (input_ids, loss_mask)
    eval_records: list[Record]  # held-out records, normalised (prompts and references)
    eval_encoded: list[Record]  # the same records encoded (held-out loss)
    seq_len: int
    pad_id: int
    batcher: Batcher  # the resumable training stream
    steps: int  # optimizer steps of the run: cfg.steps, or with cfg.epochs the batches of that many epochs
    score: Callable[[str, str], Mapping[str, float]]  # generation scorer: (prediction, reference) -> metrics
    max_new_tokens: int  # generation budget of an evaluation


def prepare_data(cfg: RunConfig, tokenizer: Any) -> RunData:
    """Loads, encodes and batches `cfg.dataset` (and its held-out part) with `tokenizer`."""
    if cfg.eval_examples < 0:
        raise ConfigError(f"--eval_examples={cfg.eval_examples}: expected a count of held-out examples, 0 or more "
                          "(0 turns the evaluation off).")
    task = tasks.get_task(cfg.dataset.split(":", 1)[1]) if cfg.dataset.startswith("builtin:") else None
    eval_split = cfg.eval_split if (cfg.eval_split is not None or task or cfg.eval_dataset) else 0.05
    use_chat_template_file(tokenizer, cfg.chat_template)
    train_records, eval_records = load_records(cfg.dataset, eval_split=eval_split, eval_dataset=cfg.eval_dataset,
                                               seed=cfg.seed, split=cfg.dataset_split, config=cfg.dataset_config,
                                               text_field=cfg.dataset_text_field,
                                               field_map=parse_field_map(cfg.field_map))
    encode = dict(seq_len=cfg.seq_len, train_on=cfg.train_on, truncation=cfg.truncation)
    encoded, stats = encode_records(tokenizer, train_records, **encode)
    eval_records = eval_records[: cfg.eval_examples]
    eval_encoded = encode_records(tokenizer, eval_records, **encode)[0] if cfg.eval_examples and eval_records else []
    seq_len = row_length(cfg.seq_len, [len(e["input_ids"]) for e in encoded], cfg.pack,
                         longest=max((len(e["input_ids"]) for e in eval_encoded), default=0))
    pad_id = pad_id_of(tokenizer)
    batcher = Batcher(encoded, batch_size=cfg.batch_size, seq_len=seq_len, pad_id=pad_id, seed=cfg.seed,
                      pack=cfg.pack, buckets=length_buckets(seq_len))
    steps = run_steps(cfg, batcher)
    logging.info("data: %d train / %d eval records, %d longer than --seq_len=%d (%s: %d cut, %d dropped), longest "
                 "%d tokens, %d target tokens, at most %d x %d", len(encoded), len(eval_encoded), stats.num_truncated,
                 cfg.seq_len, cfg.truncation, stats.num_truncated - stats.num_dropped, stats.num_dropped,
                 stats.max_len, stats.num_target_tokens, cfg.batch_size, seq_len)
    return RunData(encoded=encoded, eval_records=eval_records, eval_encoded=eval_encoded, seq_len=seq_len,
                   pad_id=pad_id, batcher=batcher, steps=steps, score=task.score if task else tasks.default_score,
                   max_new_tokens=task.max_new_tokens if task else 128)


def row_length(seq_len: int, lengths: list[int], pack: bool, *, longest: int = 0) -> int:
    """The widest batch of a run (module docstring): --seq_len when packing can put two of the training
    examples (`lengths`) in a row, else the longest example (held-out ones too: `longest`) rounded up to 16,
    at most --seq_len."""
    shortest = sorted(lengths)[:2]
    if pack and len(shortest) == 2 and sum(shortest) <= seq_len:
        return seq_len
    return min(seq_len, -(-max(max(lengths, default=1), longest) // 16) * 16)


def run_steps(cfg: RunConfig, batcher: Batcher) -> int:
    """The run's optimizer steps: `cfg.steps`, or with `cfg.epochs` the batches of that many epochs (counted
    by a dry pass over the stream, after packing; each epoch ends with its own, maybe smaller, batch). Logs
    the batch widths of the first epoch (each a compiled shape)."""
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ConfigError(f"--epochs={cfg.epochs}: expected 1 or more passes over the training data.")
    widths = batcher.epoch_widths(cfg.epochs or 1)
    first = batcher.epoch_widths(1) if cfg.epochs and cfg.epochs > 1 else widths
    steps = len(widths) if cfg.epochs else cfg.steps
    shapes = ", ".join(f"{w}: {first.count(w)}" for w in sorted(set(first)))
    logging.info("data: an epoch is %d batches of %d rows (%s), widths {%s}; the run takes %d steps%s", len(first),
                 batcher.batch_size, "packed" if batcher.pack else "one example a row", shapes, steps,
                 f" ({cfg.epochs} epochs)" if cfg.epochs else "")
    return steps
