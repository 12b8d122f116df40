"""The data of one run: records loaded and encoded, the held-out examples, and the training stream.

The builtin task carries its own held-out split and scorer; a file gets a held-out fraction (5 %) unless
the run names an eval split or dataset. The held-out loss and the generation metrics use the same first
`eval_examples` records; `eval_examples=0` turns the evaluation off (the training data stays the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from absl import logging

from jaxpeft.core.errors import ConfigError
from jaxpeft.data import tasks
from jaxpeft.data.batching import Batcher
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
    # Static shapes: pad to the longest example (rounded to 16) when that is shorter than seq_len.
    seq_len = cfg.seq_len if cfg.pack else min(cfg.seq_len, -(-stats.max_len // 16) * 16)
    pad_id = pad_id_of(tokenizer)
    batcher = Batcher(encoded, batch_size=cfg.batch_size, seq_len=seq_len, pad_id=pad_id, seed=cfg.seed,
                      pack=cfg.pack)
    logging.info("data: %d train / %d eval records, %d longer than --seq_len=%d (%s: %d cut, %d dropped), longest "
                 "%d tokens, %d target tokens, batches %d x %d", len(encoded), len(eval_encoded), stats.num_truncated,
                 cfg.seq_len, cfg.truncation, stats.num_truncated - stats.num_dropped, stats.num_dropped,
                 stats.max_len, stats.num_target_tokens, cfg.batch_size, seq_len)
    return RunData(encoded=encoded, eval_records=eval_records, eval_encoded=eval_encoded, seq_len=seq_len,
                   pad_id=pad_id, batcher=batcher, score=task.score if task else tasks.default_score,
                   max_new_tokens=task.max_new_tokens if task else 128)
