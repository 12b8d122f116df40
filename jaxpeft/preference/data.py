"""Preference data in TRL's format: records {"prompt", "chosen", "rejected"}, each a string or (conversational)
a list of messages, tokenized as TRL 1.16's DPOTrainer tokenizes them, and batched with the B chosen rows of a
micro-batch first and its B rejected rows after them (one forward for both).

Tokenization (TRL's `_prepare_dataset`): strings get the EOS token appended to chosen and rejected when they
lack it and are tokenized as prompt, prompt + chosen, prompt + rejected; message lists go through the chat
template (the prompt with the generation prompt, prompt + chosen and prompt + rejected without). The
completion starts where the prompt's tokens and the prompt + completion's first differ (TRL's
`common_prefix_length`). Then, ours: `max_prompt_len` keeps the prompt's last tokens (TRL 0.x's
`max_prompt_length`, which TRL 1.x no longer has), a completion longer than `seq_len - 1` is an error, and a
prompt + completion longer than `seq_len` loses the prompt's first tokens (the completion is kept whole).

Shape legend: A micro-steps, B pairs per micro-batch, S sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.data.targets import common_prefix

FIELDS = ("prompt", "chosen", "rejected")


def is_conversational(record: Mapping[str, Any]) -> bool:
    return isinstance(record.get("prompt"), list) or isinstance(record.get("chosen"), list)


def check_records(records: Sequence[Mapping[str, Any]], *, name: str = "the dataset") -> None:
    """Refuses, in one error naming every offending record, records without prompt/chosen/rejected, with an
    empty chosen or rejected, or a dataset where chosen == rejected in every record (nothing to prefer)."""
    problems = []
    for i, r in enumerate(records):
        missing = [f for f in FIELDS if f not in r or r[f] is None]
        if missing:
            problems.append(f"record {i}: no {', '.join(repr(m) for m in missing)} (has {sorted(r)})")
            continue
        empty = [f for f in ("chosen", "rejected") if not _text(r[f]).strip()]
        if empty:
            problems.append(f"record {i}: empty {', '.join(repr(e) for e in empty)}")
    if problems:
        raise ConfigError(f"{name} is not preference data in TRL's format {{'prompt', 'chosen', 'rejected'}}:\n"
                          + bullet_list(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if
                                                          len(problems) > 20 else "")
                          + "\nFix these records, or rename fields with --field_map (e.g. question:prompt).")
    if records and all(_text(r["chosen"]) == _text(r["rejected"]) for r in records):
        raise ConfigError(f"{name}: chosen equals rejected in every one of its {len(records)} records (e.g. record "
                          "0), so there is no preference to learn. Check the chosen/rejected columns.")


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) for m in value)
    return str(value)


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_pair(tokenizer: Any, record: Mapping[str, Any]) -> dict[str, list[int]]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} of one record, as TRL 1.16 tokenizes it."""
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if is_conversational(record):
        def template(messages, **kw):
            return _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw))

        p = template(prompt, add_generation_prompt=True)
        pc, pr = template(prompt + chosen), template(prompt + rejected)
    else:
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p, pc, pr = (_ids(tokenizer(t)) for t in (prompt, prompt + chosen, prompt + rejected))
    n = min(common_prefix(p, pc), common_prefix(p, pr))
    return {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def encode_pairs(tokenizer: Any, records: Sequence[Mapping[str, Any]], *, seq_len: int,
                 max_prompt_len: int | None = None, name: str = "the dataset") -> list[dict[str, list[int]]]:
    """`tokenize_pair` of every record, truncated (see the module docstring); one error names every record
    whose chosen or rejected completion alone exceeds `seq_len - 1` tokens."""
    check_records(records, name=name)
    out, too_long = [], []
    for i, r in enumerate(records):
        t = tokenize_pair(tokenizer, r)
        longest = max(len(t["chosen_ids"]), len(t["rejected_ids"]))
        if longest > seq_len - 1:
            too_long.append(f"record {i}: a {longest}-token completion")
            continue
        prompt = t["prompt_ids"]
        if max_prompt_len is not None and len(prompt) > max_prompt_len:
            prompt = prompt[len(prompt) - max_prompt_len:] if max_prompt_len > 0 else []
        keep = seq_len - longest
        t["prompt_ids"] = prompt[len(prompt) - keep:] if len(prompt) > keep else prompt
        out.append(t)
    if too_long:
        raise ConfigError(f"{name}: {len(too_long)} record(s) have a completion longer than --seq_len - 1 = "
                          f"{seq_len - 1} tokens (the prompt needs at least one):\n" + bullet_list(too_long[:20])
                          + "\nRaise --seq_len or drop these records.")
    return out


def pair_rows(pairs: Sequence[Mapping[str, Sequence[int]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """(2B, S) input_ids / attention_mask / loss_mask of B pairs: the chosen rows, then the rejected rows,
    right-padded (TRL's `DataCollatorForPreference` layout; loss_mask = TRL's completion_mask)."""
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    ids = np.full((len(rows), seq_len), pad_id, np.int32)
    attn, loss = np.zeros_like(ids), np.zeros_like(ids)
    for r, (prompt, completion) in enumerate(rows):
        seq = list(prompt) + list(completion)
        ids[r, :len(seq)], attn[r, :len(seq)], loss[r, len(prompt):len(seq)] = seq, 1, 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@dataclasses.dataclass
class PairBatcher:
    """An endless, resumable stream of preference batches: each epoch a fresh permutation (seed + epoch) of the
    pairs. A batch of `batch_size` pairs over `grad_accum` micro-steps is (A * 2B, S), laid out so that the
    Trainer's reshape to (A, 2B, S) gives each micro-batch its own chosen rows followed by its rejected rows."""

    pairs: Sequence[Mapping[str, Sequence[int]]]
    batch_size: int
    grad_accum: int
    seq_len: int
    pad_id: int
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _take(self) -> Mapping[str, Sequence[int]]:
        perm = np.random.default_rng(self.seed + self.epoch).permutation(len(self.pairs))
        pair = self.pairs[int(perm[self.position])]
        self.position += 1
        if self.position == len(self.pairs):
            self.epoch, self.position = self.epoch + 1, 0
        return pair

    def __next__(self) -> dict[str, np.ndarray]:
        per_micro = self.batch_size // self.grad_accum
        micros = [pair_rows([self._take() for _ in range(per_micro)], self.seq_len, self.pad_id)
                  for _ in range(self.grad_accum)]
        return {k: np.concatenate([m[k] for m in micros]) for k in micros[0]}
