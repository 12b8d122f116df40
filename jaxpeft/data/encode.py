"""Tokenization of normalised records (`jaxpeft.data.records`) with a loss mask, and evaluation prompts.

Loss-mask convention (one place, used everywhere): `loss_mask` is aligned with `input_ids`, and
`loss_mask[b, t] == 1` means token `input_ids[b, t]` is a target token, i.e. it is predicted by
the logits at position `t - 1`. The token loss is therefore

    nll_BxT = cross_entropy(logits_BxSxV[:, :-1], input_ids_BxS[:, 1:])
    loss = sum(nll_BxT * loss_mask_BxS[:, 1:]) / sum(loss_mask_BxS[:, 1:])

Alpaca records (the legacy path, unchanged): the targets are the answer plus the token that closes it
(the chat template's end-of-turn token, or EOS), so the model learns to stop, and position 0 is a prompt
token. The TRL-style formats are tokenized as TRL 1.16 does (`jaxpeft.data.targets`); a `text` record's
position 0 is a target there, which no loss can use (nothing predicts it), and packing clears the mask
at every example's first token so no example is predicted from the one before it (`batching.py`).

Array legend: B = batch size, S = sequence length.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

from jaxpeft.core.errors import ConfigError, DataError
from jaxpeft.data.records import Record, normalize_records, record_format
from jaxpeft.data.targets import encode_new, resolve_train_on

log = logging.getLogger(__name__)

def _id_lists(out: Any) -> list[list[int]]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    return [list(map(int, x)) for x in ids]


def _uses_chat_template(tokenizer: Any, chat_template: bool) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        log.warning("Tokenizer has no chat template; using the plain Alpaca prompt format.")
    return chat_template and has


def _plain_prompt(record: Record) -> str:
    if "instruction" in record:
        text = f"### Instruction:\n{record['instruction']}\n\n"
        if record.get("input"):
            text += f"### Input:\n{record['input']}\n\n"
        return text + "### Response:\n"
    heads = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    parts = [heads.get(m["role"], f"### {m['role']}:\n") + m["content"] for m in record["messages"]]
    return "".join(p + "\n\n" for p in parts) + "### Response:\n"


def _prompts(tokenizer: Any, records: Sequence[Record], chat: bool) -> list[list[int]]:
    if chat:
        convs = [r["messages"] for r in records]
        out = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=True)
        return _id_lists(out)
    return _id_lists(tokenizer([_plain_prompt(r) for r in records])["input_ids"])


def _prompt_and_completion(
    tokenizer: Any, records: Sequence[Record], chat: bool
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each prompt and of its completion (answer + closing token)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = _prompts(tokenizer, records, chat)
    targets = [r["target"] for r in records]
    answers = _id_lists(tokenizer(targets, add_special_tokens=False)["input_ids"])
    if not chat:
        return [(p, a + eos) for p, a in zip(prompts, answers)]
    convs = [r["messages"] + [{"role": "assistant", "content": r["target"]}] for r in records]
    fulls = _id_lists(tokenizer.apply_chat_template(convs, tokenize=True))
    special = set(getattr(tokenizer, "all_special_ids", []))
    out = []
    for p, f, a in zip(prompts, fulls, answers):
        if f[: len(p)] != p:
            # The template renders the prompt differently once an answer follows (e.g. it drops
            # a "thinking" block), or BPE merged across the boundary: mask the answer we tokenize.
            out.append((p, a + eos))
            continue
        c = f[len(p) :]
        # Drop what follows the end-of-turn token (SmolLM2 adds "\n" after <|im_end|>).
        while c and c[-1] not in special and not tokenizer.decode(c[-1:]).strip():
            c = c[:-1]
        if not c or c[-1] not in special:
            c = c + eos  # The template closes no turn: teach the model to stop with EOS.
        out.append((p, c))
    return out


TRUNCATION = ("prompt_left", "right", "drop")


def _fit(ids: list[int], mask: list[int], seq_len: int, truncation: str) -> Record | None:
    """Cuts one example to at most seq_len tokens (None: dropped).

    prompt_left: cut the tokens before the first target from their left (keeping one, so the first target
    has a position to be predicted from), then the end if still too long; right: keep the first seq_len
    tokens (TRL's); drop: drop the example.
    """
    truncated = len(ids) > seq_len
    if truncated and truncation == "drop":
        return None
    if truncated and truncation == "prompt_left":
        n_prompt = mask.index(1) if 1 in mask else len(mask)
        keep = min(n_prompt, max(1, seq_len - (len(ids) - n_prompt)))
        ids, mask = ids[n_prompt - keep :], mask[n_prompt - keep :]
    return {"input_ids": ids[:seq_len], "loss_mask": mask[:seq_len], "truncated": truncated}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodeStats:
    """Counts from `encode_records`: lengths are in tokens after truncation; `num_dropped` examples were
    longer than seq_len under truncation="drop" (`num_truncated` counts the cut and the dropped ones)."""

    num_examples: int
    num_truncated: int
    max_len: int
    mean_len: float
    num_target_tokens: int
    num_dropped: int = 0


def _plain_view(records: list[Record], tokenizer: Any, chat_template: bool) -> list[Record]:
    """Without a chat template, messages records fall back to the plain Alpaca-style format of before: the
    messages up to the last assistant turn are the prompt, that turn's content the target."""
    if not any(record_format(r) == "messages" for r in records) or _uses_chat_template(tokenizer, chat_template):
        return records
    out = []
    for r in records:
        msgs = r.get("messages") if record_format(r) == "messages" else None
        turns = [k for k, m in enumerate(msgs or []) if m.get("role") == "assistant"]
        if turns and turns[-1] > 0 and all(isinstance(m.get("content"), str) for m in msgs[: turns[-1] + 1]):
            r = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs[: turns[-1]]],
                 "target": msgs[turns[-1]]["content"]}
        out.append(r)
    return out


def _where(record: Mapping, position: int) -> str:
    if "_index" in record:
        return f"{record['_source']} record {record['_index']}"
    return f"record {position}"


def encode_records(
    tokenizer: Any,
    records: Sequence[Mapping],
    *,
    seq_len: int,
    chat_template: bool = True,
    train_on: str | None = None,
    truncation: str = "prompt_left",
) -> tuple[list[Record], EncodeStats]:
    """Encodes many records of any format (`jaxpeft.data.formats`), batched: 2k short records take well
    under a second.

    Alpaca records are tokenized as they always were (`encode_example`); the other formats as TRL 1.16
    tokenizes them, with the targets `train_on` selects (`jaxpeft.data.targets`; None: each format's
    default). Examples longer than `seq_len` are cut or dropped as `truncation` says (`_fit`). Returns
    the examples in the records' order (dropped ones left out) and counts. Raises DataError, naming the
    records, when an example has no target token left.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (a prompt and a target); got {seq_len}.")
    if truncation not in TRUNCATION:
        raise ConfigError(f"--truncation={truncation!r}: expected one of {list(TRUNCATION)}.")
    norm = _plain_view(normalize_records(records), tokenizer, chat_template)
    kinds = [record_format(r) for r in norm]
    modes = resolve_train_on(train_on, kinds)
    old = [i for i, k in enumerate(kinds) if k == "alpaca"]
    new = [i for i, k in enumerate(kinds) if k != "alpaca"]
    pairs: list[Any] = [None] * len(norm)
    chat = _uses_chat_template(tokenizer, chat_template) if old else False
    for i, (p, c) in zip(old, _prompt_and_completion(tokenizer, [norm[i] for i in old], chat) if old else []):
        pairs[i] = (p + c, [0] * len(p) + [1] * len(c) if modes["alpaca"] != "all" else [1] * len(p + c))
    for i, pair in zip(new, encode_new(tokenizer, [norm[i] for i in new], modes)):
        pairs[i] = pair
    fitted = [_fit(ids, mask, seq_len, truncation) for ids, mask in pairs]
    empty = [_where(norm[i], i) for i, e in enumerate(fitted) if e is not None and 1 not in e["loss_mask"]]
    if empty:
        untrained = [_where(norm[i], i) for i, (_, m) in enumerate(pairs) if 1 not in m]
        if untrained:
            raise DataError(f"{len(untrained)} record(s) have no target token under --train_on (first: "
                            f"{', '.join(untrained[:3])}): no assistant turn to learn from. Fix: drop them, or "
                            "use --train_on=all.")
        raise DataError(f"{len(empty)} example(s) have no target token left after --truncation={truncation} at "
                        f"--seq_len={seq_len} (first: {', '.join(empty[:3])}). Fix: raise --seq_len, or use "
                        "--truncation=prompt_left or drop.")
    examples = [e for e in fitted if e is not None]
    if not examples:
        raise DataError(f"Every example is longer than --seq_len={seq_len}, and --truncation=drop dropped them "
                        "all. Fix: raise --seq_len, or use --truncation=prompt_left.")
    lens = [len(e["input_ids"]) for e in examples]
    stats = EncodeStats(
        num_examples=len(examples),
        num_truncated=sum(e is None or e["truncated"] for e in fitted),
        max_len=max(lens),
        mean_len=sum(lens) / len(lens),
        num_target_tokens=sum(sum(e["loss_mask"]) for e in examples),
        num_dropped=len(fitted) - len(examples),
    )
    if stats.num_truncated:
        what = "dropped" if truncation == "drop" else f"cut to {seq_len} tokens ({truncation})"
        log.info("%d of %d examples longer than %d tokens: %s.", stats.num_truncated, len(fitted), seq_len, what)
    return examples, stats


def encode_example(
    tokenizer: Any, record: Mapping, *, seq_len: int, chat_template: bool = True, train_on: str | None = None
) -> Record:
    """Tokenizes one record (any format; see `encode_records`).

    Returns `input_ids` (list[int], at most seq_len), `loss_mask` (list[int], 1 on the target tokens) and
    `truncated` (bool). An Alpaca record's targets are exactly its answer and the end-of-turn/EOS token
    closing it; with a chat template its prompt is `apply_chat_template(messages, add_generation_prompt=
    True)`, without one the Alpaca text "### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n".
    """
    return encode_records(tokenizer, [record], seq_len=seq_len, chat_template=chat_template,
                          train_on=train_on)[0][0]


def _new_prompt(record: Mapping) -> tuple[Any, str] | None:
    """(prompt: messages or text, reference answer) of a new-format record for generation; None: none."""
    fmt = record["_format"]
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    if fmt == "conversational":
        answer = "".join(m["content"] for m in record["completion"] if isinstance(m.get("content"), str))
        return record["prompt"], answer
    if fmt == "messages":
        msgs = record["messages"]
        turns = [k for k, m in enumerate(msgs) if m.get("role") == "assistant"]
        if not turns or turns[-1] == 0:
            return None
        content = msgs[turns[-1]].get("content")
        return msgs[: turns[-1]], content if isinstance(content, str) else ""
    return None  # text records have no prompt


def eval_prompts(
    tokenizer: Any,
    records: Sequence[Mapping],
    *,
    chat_template: bool = True,
    max_prompt_len: int | None = None,
) -> list[tuple[list[int], str]]:
    """(prompt_ids, reference_text) per record, for generation-based evaluation.

    Prompts are built exactly as in training; `max_prompt_len` keeps only the last tokens. Records with no
    prompt to generate from (text records, conversations without an assistant turn) are left out.
    """
    norm = _plain_view(normalize_records(records), tokenizer, chat_template)
    old = [r for r in norm if record_format(r) == "alpaca"]
    old_prompts = iter(_prompts(tokenizer, old, _uses_chat_template(tokenizer, chat_template)) if old else [])
    out = []
    for r in norm:  # in the records' order
        if record_format(r) == "alpaca":
            out.append((next(old_prompts), r["target"]))
            continue
        got = _new_prompt(r)
        if got is None:
            continue
        prompt, reference = got
        if isinstance(prompt, str):
            ids = list(map(int, tokenizer(prompt)["input_ids"]))
        else:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                tools=r.get("tools"), **r.get("chat_template_kwargs", {}))
            ids = list(map(int, ids["input_ids"] if hasattr(ids, "keys") else ids))
        out.append((ids, reference))
    if max_prompt_len is not None:
        out = [(p[-max_prompt_len:], ref) for p, ref in out]
    return out


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
