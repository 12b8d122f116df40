"""Fine-tuning records: load them (local files, the Hub, the bundled tasks) and normalise them to one form.

Records come in two formats and are normalised to one:

* Alpaca: `{"instruction": str, "input": str (optional), "output": str}`
* chat:   `{"messages": [{"role": str, "content": str}, ...]}`; the last assistant message is the
  target and the messages before it are the prompt.
* normalised: `{"messages": [...prompt messages...], "target": str}` (Alpaca records also keep
  `instruction` and `input`, used by the plain-text format).

Tokenizing them with a loss mask is `jaxpeft.data.encode`; batching them, `jaxpeft.data.batching`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxpeft.core.errors import ConfigError, DataError, MissingDependencyError, bullet_list
from jaxpeft.data import tasks

log = logging.getLogger(__name__)

Record = dict[str, Any]
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
_EXPECTED = (
    "Alpaca records {'instruction': str, 'input': str (optional), 'output': str}, or chat records "
    "{'messages': [{'role': ..., 'content': str}, ...]} ending with an assistant message"
)
_FIX = (
    "Rename your fields to instruction/input/output (or messages with role/content), e.g. with "
    "datasets.Dataset.rename_column, and drop records without an answer."
)
# ----------------------------------------------------------------------------------------------
# Records: validation and normalisation.


def _problem(record: Any) -> str | None:
    """Why `record` is not a usable Alpaca/chat/normalised record, or None when it is."""
    if not isinstance(record, Mapping):
        return f"is a {type(record).__name__}, not an object"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' is not a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                return f"messages[{i}] lacks a string 'role'"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}] lacks a string 'content'"
        if "target" in record:
            return None if isinstance(record["target"], str) else "'target' is not a string"
        roles = [m["role"] for m in msgs]
        if "assistant" not in roles:
            return "no assistant message to learn from"
        if len(roles) - 1 - roles[::-1].index("assistant") == 0:
            return "the only assistant message has no prompt before it"
        return None
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        return f"missing string field(s) {missing}"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return "'input' is not a string"
    return None


def _normalize_one(record: Mapping) -> Record:
    if "messages" in record and "target" in record:
        return dict(record)
    if "messages" in record:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return {"messages": msgs[:last], "target": msgs[last]["content"]}
    instruction, inp = record["instruction"], record.get("input") or ""
    content = f"{instruction}\n\n{inp}" if inp else instruction
    return {
        "messages": [{"role": "user", "content": content}],
        "target": record["output"],
        "instruction": instruction,
        "input": inp,
    }


def normalize_records(records: Sequence[Any], *, source: str = "records") -> list[Record]:
    """Validates Alpaca/chat records and returns them as `{"messages", "target"}` dicts.

    Records whose answer is empty are dropped with a warning (real sets have a few; training on
    them teaches the model to answer nothing). Raises DataError naming `source` and listing every
    bad record (index, problem, keys found).
    """
    if len(records) == 0:
        raise DataError(f"{source} contains no records. Expected a non-empty list of {_EXPECTED}.")
    bad = [(i, p, r) for i, r in enumerate(records) if (p := _problem(r)) is not None]
    if bad:
        shown = [
            f"record {i}: {p}; keys found: {sorted(r) if isinstance(r, Mapping) else '-'}"
            for i, p, r in bad[:10]
        ]
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(
            f"{source}: {len(bad)} of {len(records)} records are not usable.\n"
            f"Expected {_EXPECTED}.\nFound:\n{bullet_list(shown)}{more}\n{_FIX}"
        )
    norm = [_normalize_one(r) for r in records]
    empty = [i for i, r in enumerate(norm) if not r["target"].strip()]
    if len(empty) == len(norm):
        raise DataError(f"{source}: every record has an empty answer ('output' or 'target').")
    if empty:
        log.warning("%s: dropped %d records with an empty answer: %s", source, len(empty), empty)
        norm = [r for r in norm if r["target"].strip()]
    return norm


# ----------------------------------------------------------------------------------------------
# Loading.


def _read_local(path: Path) -> list[Any]:
    expected = f"Expected a .json, .jsonl or .parquet file of {_EXPECTED}."
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"Data file {path} {what}. {expected} Check the path (cwd-relative).")
    suffix = path.suffix.lower()
    if suffix not in _LOCAL_SUFFIXES:
        raise DataError(f"Data file {path} has suffix {suffix!r}. {expected} Convert it, e.g. "
                        "with datasets.Dataset.to_json(path).")  # fmt: skip
    if suffix == ".parquet" and path.stat().st_size:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MissingDependencyError("Reading .parquet needs: pip install pyarrow") from e
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file.
            raise DataError(f"Could not read parquet file {path} ({e}). {expected}") from e
    text = "" if suffix == ".parquet" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"Data file {path} is empty. {expected}")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}. {expected}") from None
    # JSON lines (also accepted in .json files: datasets' to_json writes them).
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not valid JSON ({e.msg}). Expected a JSON list "
                            "of records or one JSON record per line.") from None  # fmt: skip
    return records


def _read_hub(name: str, split: str) -> list[Any]:
    import datasets  # Imported here: heavy, and only needed for hub datasets.

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # Offline, unknown name, gated dataset...: all mean "not available".
        raise DataError(
            f"{name!r} is not a local file, and the dataset could not be fetched from the Hugging "
            f"Face Hub ({type(e).__name__}: {e}). To train on your own data, pass a path to a "
            f".json, .jsonl or .parquet file of {_EXPECTED}; or use builtin:dates."
        ) from e
    if split not in ds:
        raise DataError(
            f"Hub dataset {name!r} has splits {sorted(ds)}; asked for {split!r}. Pass one of those."
        )
    return ds[split].to_list()


def _read(spec: str, split: str = "train") -> tuple[list[Any], str]:
    path = Path(spec).expanduser()
    looks_local = path.suffix.lower() in _LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))
    if path.exists() or looks_local:
        return _read_local(path), str(path)
    return _read_hub(spec, split), f"hub dataset {spec!r} split {split!r}"


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


def load_records(
    spec: str,
    *,
    eval_split: float | str | None = None,
    eval_dataset: str | None = None,
    seed: int = 0,
) -> tuple[list[Record], list[Record]]:
    """Loads (train, eval) normalised records `{"messages", "target", ...}`.

    `spec` is `builtin:<task>` (a task from `jaxpeft.data.tasks`, with its own disjoint eval
    split), a local .json (list or JSON lines) / .jsonl / .parquet file, or a Hugging Face Hub
    dataset name. `eval_split` is a fraction of `spec` held out by a shuffle seeded with `seed`,
    or a split name for hub datasets; `eval_dataset` is a separate file or dataset. With neither,
    a local or hub dataset has an empty eval list.
    """
    if eval_split is not None and eval_dataset is not None:
        raise ConfigError("Pass eval_split or eval_dataset, not both.")
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
        if isinstance(eval_split, str) and Path(spec).suffix.lower() in _LOCAL_SUFFIXES:
            raise ConfigError(
                f"eval_split={eval_split!r} names a split, but {spec} is a local file. Pass a "
                "fraction (e.g. 0.05) or eval_dataset=<path>."
            )
        raw, source = _read(spec)
        train = normalize_records(raw, source=source)
        if isinstance(eval_split, str):
            raw_eval, eval_source = _read(spec, eval_split)
            return train, normalize_records(raw_eval, source=eval_source)
        if eval_split is not None:
            return holdout_split(train, float(eval_split), seed)
        if eval_dataset is None:
            return train, []
    raw_eval, eval_source = _read(eval_dataset)
    return train, normalize_records(raw_eval, source=eval_source)
