"""Fine-tuning records: load them (local files, `save_to_disk` folders, the Hub, the bundled tasks) and
normalise them.

The formats (`jaxpeft.data.formats` has the table): TRL's text, prompt/completion (standard and
conversational) and messages records, ShareGPT conversations, and Alpaca. Alpaca records normalise as they
always have, to `{"messages": [...prompt messages...], "target": str, "instruction", "input"}` (the legacy
chat form `{"messages", "target"}` is accepted as is); the others keep their fields under a `"_format"` key.

Tokenizing them with a loss mask is `jaxpeft.data.encode`; batching them, `jaxpeft.data.batching`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxpeft.core.errors import ConfigError, DataError, bullet_list
from jaxpeft.data import formats, sources, tasks

log = logging.getLogger(__name__)

Record = dict[str, Any]
_EXPECTED = formats.EXPECTED
_FIX = formats.FIX
# ----------------------------------------------------------------------------------------------
# Records: validation and normalisation.


def _problem(record: Any) -> str | None:
    """Why a legacy (Alpaca or normalised chat) record is not usable, or None when it is."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' is not a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                return f"messages[{i}] lacks a string 'role'"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}] lacks a string 'content'"
        return None if isinstance(record["target"], str) else "'target' is not a string"
    return None


def _normalize_alpaca(record: Mapping) -> Record:
    if "messages" in record:  # already normalised (legacy chat form)
        return dict(record)
    instruction, inp = record["instruction"], record.get("input") or ""
    content = f"{instruction}\n\n{inp}" if inp else instruction
    return {
        "messages": [{"role": "user", "content": content}],
        "target": record["output"],
        "instruction": instruction,
        "input": inp,
    }


def record_format(record: Mapping) -> str:
    """The format of a normalised record: one of formats.NEW_FORMATS, or "alpaca" (Alpaca and legacy chat)."""
    return record.get("_format", "alpaca")


def normalize_records(records: Sequence[Any], *, source: str = "records") -> list[Record]:
    """Recognises each record's format (`jaxpeft.data.formats`) and returns the records normalised.

    Alpaca records become `{"messages", "target", "instruction", "input"}` exactly as before; the TRL-style
    formats (text, prompt/completion, conversational, messages, ShareGPT) their `"_format"` form. Alpaca
    records whose answer is empty are dropped with a warning (training on them teaches the model to answer
    nothing). Keys beside a record's format are ignored and listed once in the log. Raises DataError
    naming `source` and listing every bad record (index, problem, keys found).
    """
    if len(records) == 0:
        raise DataError(f"{source} contains no records. Expected a non-empty list of records, {_EXPECTED}.")
    bad, norm, extras, raw = [], [], set(), 0
    for i, r in enumerate(records):
        try:
            fmt = formats.detect(r)
            if fmt == "normalised":
                norm.append(r)
                continue
            raw += fmt != "legacy"  # legacy: Alpaca records normalised before
            problem = _problem(r) if fmt == "legacy" else None
            if problem is not None:
                raise formats.FormatProblem(problem)
            extras |= formats.extra_keys(r, fmt) if fmt != "legacy" else set()
            if fmt in ("alpaca", "legacy"):
                norm.append(_normalize_alpaca(r))
            else:
                norm.append(formats.normalize_new(r, fmt, source=source, index=i))
        except formats.FormatProblem as e:
            bad.append((i, str(e), r))
    if bad:
        shown = [
            f"record {i}: {p}; keys found: {sorted(r) if isinstance(r, Mapping) else '-'}"
            for i, p, r in bad[:10]
        ]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        # The first line alone names the file, the first bad record and the fix; the rest lists them all.
        raise DataError(
            f"{source} {shown[0]}. {_FIX} ({len(bad)} of {len(records)} records are not usable.)\n"
            f"Expected {_EXPECTED}.\nFound:\n{bullet_list(shown)}{more}"
        )
    if extras:
        log.info("%s: ignored field(s) beside the record formats: %s", source, sorted(extras))
    if raw:  # once per loaded source, not again when normalised records are encoded
        counts: dict[str, int] = {}
        for r in norm:
            counts[record_format(r)] = counts.get(record_format(r), 0) + 1
        log.info("%s: %d records (%s)", source, len(norm), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    empty = [i for i, r in enumerate(norm) if record_format(r) == "alpaca" and not r["target"].strip()]
    if empty and len(empty) == len(norm):
        raise DataError(f"{source}: every record has an empty answer ('output' or 'target').")
    if empty:
        log.warning("%s: dropped %d records with an empty answer: %s", source, len(empty), empty)
        dropped = set(empty)
        norm = [r for i, r in enumerate(norm) if i not in dropped]
    return norm


# ----------------------------------------------------------------------------------------------
# Loading.


def holdout_split(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Holds out round(fraction * n) records (at least 1), chosen by a seeded shuffle.

    Both parts keep the original order. Returns (train, eval).
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"eval_split must be a fraction in (0, 1); got {fraction}.")
    n = len(records)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(
            f"eval_split={fraction} of {n} records leaves nothing to train on; "
            "use a smaller fraction or a separate eval_dataset."
        )
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _read_all(spec: str, *, split: str, config: str | None, field_map: Mapping[str, str]) -> list[Record]:
    """Reads and normalises `spec` (datasets separated by commas, concatenated in order)."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DataError(f"--dataset={spec!r} names no dataset; pass a file, a folder, a hub name or builtin:<task>.")
    read = [sources.read(p, split, config) for p in parts]
    if field_map:
        present = set()
        for raw, _ in read:
            present |= set().union(*(r.keys() for r in raw if isinstance(r, Mapping)))
        names = " and ".join(source for _, source in read)
        formats.apply_field_map([dict.fromkeys(present)], field_map, source=names)  # raises on an unknown field
        read = [([{field_map.get(k, k): v for k, v in r.items()} if isinstance(r, Mapping) else r for r in raw],
                 source) for raw, source in read]
    out: list[Record] = []
    for raw, source in read:
        out += normalize_records(raw, source=source)
    return out


def load_records(
    spec: str,
    *,
    eval_split: float | str | None = None,
    eval_dataset: str | None = None,
    seed: int = 0,
    split: str = "train",
    config: str | None = None,
    text_field: str = "text",
    field_map: Mapping[str, str] | None = None,
) -> tuple[list[Record], list[Record]]:
    """Loads (train, eval) normalised records (`normalize_records`).

    `spec` is `builtin:<task>` (a task from `jaxpeft.data.tasks`, with its own disjoint eval split), a local
    .json (list or JSON lines) / .jsonl / .parquet / .csv file, a `datasets.save_to_disk` folder, a Hugging
    Face Hub dataset name (`config`: its configuration), or several of those separated by commas
    (concatenated in order). `split` is the split to train on (Hub datasets and saved DatasetDicts).
    `eval_split` is a fraction held out by a shuffle seeded with `seed`, or a split name; `eval_dataset` is
    a separate file or dataset. With neither, the eval list is empty. `field_map` renames fields before the
    formats are recognised (`{"question": "prompt"}`); `text_field` is the text column of `text` records.
    """
    if eval_split is not None and eval_dataset is not None:
        raise ConfigError("Pass eval_split or eval_dataset, not both.")
    field_map = dict(field_map or {})
    if text_field != "text":
        field_map.setdefault(text_field, "text")
    read = dict(split=split, config=config, field_map=field_map)
    if spec.startswith("builtin:"):
        task = tasks.get_task(spec.removeprefix("builtin:"))
        if eval_split is not None:
            raise ConfigError(
                f"{spec} has its own held-out eval split, disjoint from training; got "
                f"eval_split={eval_split!r}. Drop eval_split (or pass eval_dataset to replace it)."
            )
        train = normalize_records(task.make_split("train", task.n_train, seed), source=spec)
        ev = task.make_split("eval", task.n_eval, seed) if eval_dataset is None else None
        if ev is not None:
            return train, normalize_records(ev, source=f"{spec} (eval)")
    else:
        files = [p for p in spec.split(",") if sources.is_local(p.strip())]
        if isinstance(eval_split, str) and any(not sources.is_saved_dataset(Path(p.strip()).expanduser())
                                               for p in files):
            raise ConfigError(
                f"eval_split={eval_split!r} names a split, but {spec} is a local file. Pass a "
                "fraction (e.g. 0.05) or eval_dataset=<path>."
            )
        train = _read_all(spec, **read)
        if isinstance(eval_split, str):
            return train, _read_all(spec, **{**read, "split": eval_split})
        if eval_split is not None:
            return holdout_split(train, float(eval_split), seed)
        if eval_dataset is None:
            return train, []
    return train, _read_all(eval_dataset, **read)
