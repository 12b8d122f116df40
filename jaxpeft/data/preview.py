"""Looking at the encoded data: the examples decoded with their target tokens marked (Axolotl's
`preprocess --debug` view), token statistics, and a JSONL dump of `{"input_ids", "loss_mask"}` per example
(`experiments.data`). Loss-mask convention: `jaxpeft/data/encode.py`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from jaxpeft.core.atomic import atomic_file
from jaxpeft.data.encode import EncodeStats, encode_records
from jaxpeft.data.records import Record, load_records
from jaxpeft.data.targets import use_chat_template_file

_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


def encode_dataset(
    tokenizer: Any,
    dataset: str,
    *,
    seq_len: int,
    split: str = "train",
    config: str | None = None,
    text_field: str = "text",
    field_map: Mapping[str, str] | None = None,
    train_on: str | None = None,
    truncation: str = "prompt_left",
    chat_template: str | None = None,
) -> tuple[list[Record], EncodeStats]:
    """The training examples of `dataset` exactly as a run encodes them, in the dataset's order (no shuffle,
    no held-out part, unpacked and unpadded). `chat_template` is a Jinja file replacing the tokenizer's."""
    use_chat_template_file(tokenizer, chat_template)
    records, _ = load_records(dataset, split=split, config=config, text_field=text_field, field_map=field_map)
    return encode_records(tokenizer, records, seq_len=seq_len, train_on=train_on, truncation=truncation)


def show_example(tokenizer: Any, example: Mapping, *, color: bool) -> str:
    """The example decoded, its target runs marked: green when `color`, else between « and »."""
    start, end = (_GREEN, _RESET) if color else ("«", "»")
    ids, mask = list(example["input_ids"]), list(example["loss_mask"])
    parts, t = [], 0
    while t < len(ids):
        u = t
        while u < len(ids) and mask[u] == mask[t]:
            u += 1
        text = tokenizer.decode(ids[t:u])
        parts.append(f"{start}{text}{end}" if mask[t] else text)
        t = u
    return "".join(parts)


def token_stats(examples: Sequence[Mapping], stats: EncodeStats) -> dict[str, Any]:
    """Examples, tokens, target tokens, truncated/dropped counts and a length histogram (powers of two)."""
    lens = [len(e["input_ids"]) for e in examples]
    histogram: dict[str, int] = {}
    for n in lens:
        top = 1 << max(0, (n - 1).bit_length())
        key = f"{top // 2 + 1}-{top}" if top > 1 else "1"
        histogram[key] = histogram.get(key, 0) + 1
    order = sorted(histogram, key=lambda k: int(k.split("-")[-1]))
    return {"examples": len(examples), "tokens": sum(lens), "target_tokens": stats.num_target_tokens,
            "truncated": stats.num_truncated, "dropped": stats.num_dropped, "max_len": stats.max_len,
            "mean_len": round(stats.mean_len, 1), "length_histogram": {k: histogram[k] for k in order}}


def write_dump(path: str, examples: Sequence[Mapping]) -> None:
    """One JSON line `{"input_ids": [...], "loss_mask": [...]}` per example, written atomically (a temporary
    sibling renamed into place)."""
    with atomic_file(path) as f:
        for e in examples:
            f.write(json.dumps({"input_ids": list(map(int, e["input_ids"])),
                                "loss_mask": list(map(int, e["loss_mask"]))}) + "\n")
