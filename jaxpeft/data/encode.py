"""Tokenization of normalised records (`jaxpeft.data.records`) with a loss mask, and evaluation prompts.

Loss-mask convention (one place, used everywhere): `loss_mask` is aligned with `input_ids`, and
`loss_mask[b, t] == 1` means token `input_ids[b, t]` is a target token, i.e. it is predicted by
the logits at position `t - 1`. The token loss is therefore

    nll_BxT = cross_entropy(logits_BxSxV[:, :-1], input_ids_BxS[:, 1:])
    loss = sum(nll_BxT * loss_mask_BxS[:, 1:]) / sum(loss_mask_BxS[:, 1:])

Target tokens are the answer plus the token that closes it (the chat template's end-of-turn token,
or EOS), so the model learns to stop. Position 0 of every example is a prompt token (mask 0), which
also keeps packed examples from being predicted across a boundary.

Array legend: B = batch size, S = sequence length.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

from jaxpeft.core.errors import ConfigError
from jaxpeft.data.records import Record, normalize_records

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


def _fit(prompt: list[int], completion: list[int], seq_len: int) -> Record:
    """Joins prompt and completion into at most seq_len tokens; cuts the prompt's left first."""
    truncated = len(prompt) + len(completion) > seq_len
    if truncated:
        # Keep at least one prompt token, so the first answer token has a position to predict from.
        keep = min(len(prompt), max(1, seq_len - len(completion)))
        prompt = prompt[len(prompt) - keep :]
    ids = (prompt + completion)[:seq_len]
    mask = ([0] * len(prompt) + [1] * len(completion))[:seq_len]
    return {"input_ids": ids, "loss_mask": mask, "truncated": truncated}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncodeStats:
    """Counts from `encode_records`: lengths are in tokens after truncation."""

    num_examples: int
    num_truncated: int
    max_len: int
    mean_len: float
    num_target_tokens: int


def encode_records(
    tokenizer: Any, records: Sequence[Mapping], *, seq_len: int, chat_template: bool = True
) -> tuple[list[Record], EncodeStats]:
    """Encodes many records (batched: 2k short records take well under a second).

    Returns examples as in `encode_example`, and counts including how many were truncated.
    Records with an empty answer are dropped (see `normalize_records`).
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (a prompt and a target); got {seq_len}.")
    norm = normalize_records(records)
    chat = _uses_chat_template(tokenizer, chat_template)
    examples = [_fit(p, c, seq_len) for p, c in _prompt_and_completion(tokenizer, norm, chat)]
    lens = [len(e["input_ids"]) for e in examples]
    stats = EncodeStats(
        num_examples=len(examples),
        num_truncated=sum(e["truncated"] for e in examples),
        max_len=max(lens),
        mean_len=sum(lens) / len(lens),
        num_target_tokens=sum(sum(e["loss_mask"]) for e in examples),
    )
    if stats.num_truncated:
        log.info("%d of %d examples cut to %d tokens.", stats.num_truncated, len(lens), seq_len)
    return examples, stats


def encode_example(
    tokenizer: Any, record: Mapping, *, seq_len: int, chat_template: bool = True
) -> Record:
    """Tokenizes one Alpaca/chat/normalised record.

    Returns `input_ids` (list[int], at most seq_len), `loss_mask` (list[int], 1 exactly on the
    answer tokens and the end-of-turn/EOS token closing it) and `truncated` (bool). With a chat
    template the prompt is `apply_chat_template(messages, add_generation_prompt=True)`; without
    one, the Alpaca text "### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n".
    """
    return encode_records(tokenizer, [record], seq_len=seq_len, chat_template=chat_template)[0][0]


def eval_prompts(
    tokenizer: Any,
    records: Sequence[Mapping],
    *,
    chat_template: bool = True,
    max_prompt_len: int | None = None,
) -> list[tuple[list[int], str]]:
    """(prompt_ids, reference_text) per record, for generation-based evaluation.

    Prompts are built exactly as in training; `max_prompt_len` keeps only the last tokens.
    """
    norm = normalize_records(records)
    prompts = _prompts(tokenizer, norm, _uses_chat_template(tokenizer, chat_template))
    if max_prompt_len is not None:
        prompts = [p[-max_prompt_len:] for p in prompts]
    return [(p, r["target"]) for p, r in zip(prompts, norm)]


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
