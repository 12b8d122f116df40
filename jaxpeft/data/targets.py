"""Token ids and target masks of the TRL-style formats (`jaxpeft.data.formats`), as TRL 1.16 tokenizes them.

Which tokens are targets is `train_on`, per format (the first value is the default):

  text               all                      every token, EOS appended (TRL's language modelling)
  prompt_completion  completion | all         completion: after the tokenized prompt (EOS appended)
  conversational     completion | all         completion: after the rendered prompt with its generation prompt
  messages           assistant | last | all   assistant: every assistant turn; last: the final one

An assistant turn's targets run from the end of its generation prompt (what `add_generation_prompt=True`
renders after the messages before it) through the end of the turn as the template renders it, end-of-turn
token and what follows it included (SmolLM2's "<|im_end|>\\n", as TRL keeps it). They are found for any chat
template by rendering message prefixes and taking the differences of the strings, then marking every token
that overlaps a target span (transformers' rule for `{% generation %}` spans). A template with
`{% generation %}` markers is taken at its word instead (transformers' assistant mask, TRL's
`assistant_only_loss=True`); it may mark a little more than the prefix rule, e.g. qwen2_5_training.jinja
also marks the "\\n" after "<|im_start|>assistant".

Prompt/completion boundaries follow TRL: the completion starts where the tokenized prompt and the tokenized
prompt+completion first differ.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from jaxpeft.core.errors import ConfigError, DataError

Record = dict[str, Any]

TRAIN_ON: dict[str, tuple[str, ...]] = {
    "text": ("all",),
    "prompt_completion": ("completion", "all"),
    "conversational": ("completion", "all"),
    "messages": ("assistant", "last", "all"),
    # Alpaca is one prompt and one answer: assistant and last mean its answer, as completion does.
    "alpaca": ("completion", "all", "assistant", "last"),
}
TRAIN_ON_VALUES = ("all", "completion", "assistant", "last")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def resolve_train_on(train_on: str | None, formats: Sequence[str]) -> dict[str, str]:
    """`train_on` for each format present (its default where `train_on` is None); refuses a value a format lacks."""
    if train_on is not None and train_on not in TRAIN_ON_VALUES:
        raise ConfigError(f"--train_on={train_on!r}: expected one of {list(TRAIN_ON_VALUES)}.")
    out, bad = {}, []
    for fmt in sorted(set(formats)):
        values = TRAIN_ON[fmt]
        if train_on is None:
            out[fmt] = values[0]
        elif train_on in values:
            out[fmt] = train_on
        else:
            bad.append(f"{fmt} records take {'|'.join(values)}")
    if bad:
        raise ConfigError(f"--train_on={train_on} does not apply to this dataset: {'; '.join(bad)}. Pass one of "
                          "those values, or leave --train_on out for each format's default.")
    return out


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template (its default one where it has several); DataError if it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    if not template:
        raise DataError("Conversational records need a chat template, and this tokenizer has none. Pass "
                        "--chat_template=FILE (a Jinja template, e.g. one of TRL's trl/chat_templates/*.jinja).")
    return template


def has_generation_markers(template: str) -> bool:
    """Whether the template marks assistant output with `{% generation %}` ... `{% endgeneration %}`."""
    return bool(_GENERATION_TAG.search(template))


def _where(rec: Mapping) -> str:
    return f"{rec.get('_source', 'records')} record {rec.get('_index', '?')}"


def _render(tokenizer: Any, rec: Mapping, messages: list, *, gen: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                             tools=rec.get("tools"), **rec.get("chat_template_kwargs", {}))
    except Exception as e:  # jinja raises many types (TemplateError, TypeError on a missing field, ...)
        raise DataError(f"{_where(rec)}: the chat template failed on it ({type(e).__name__}: {e}). Fix the "
                        "record's messages, or pass --chat_template=FILE with a template that accepts them.") from e


def _not_prefix(rec: Mapping, k: int) -> DataError:
    return DataError(
        f"{_where(rec)}: the chat template renders the conversation up to message {k} differently once later "
        "messages follow (renderings of successive prefixes are not prefixes of each other), so its assistant "
        "turns cannot be located. Pass --chat_template=FILE with a template that renders earlier turns "
        "unchanged or marks them with {% generation %}, or use --train_on=all.")


def _assistant_spans(tokenizer: Any, rec: Mapping, full: str, which: str) -> list[tuple[int, int]]:
    """Character spans of the target assistant turns in `full` (the rendered conversation)."""
    msgs = rec["messages"]
    turns = [k for k, m in enumerate(msgs) if m.get("role") == "assistant"]
    if which == "last":
        _check_last(rec)
        turns = turns[-1:]
    spans = []
    for k in turns:
        if k == 0:
            raise DataError(f"{_where(rec)}: its first message is an assistant turn, with nothing before it to "
                            "predict it from. Start the conversation with a system or user message.")
        head = _render(tokenizer, rec, msgs[:k], gen=True)
        upto = _render(tokenizer, rec, msgs[: k + 1], gen=False)
        if not upto.startswith(head) or not full.startswith(upto):
            raise _not_prefix(rec, k)
        spans.append((len(head), len(upto)))
    return spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 on every token overlapping a span (spans and offsets both in order)."""
    mask, s = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[t] = 1
    return mask


def _ids(tokenizer: Any, texts: list[str], *, special: bool, offsets: bool = False) -> Any:
    if not texts:
        return {"input_ids": [], "offset_mapping": []}
    try:
        return tokenizer(texts, add_special_tokens=special, return_offsets_mapping=offsets)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise ConfigError("Finding assistant turns needs a fast tokenizer (offsets); this one is "
                          f"{type(tokenizer).__name__}. Load it with use_fast=True.") from e


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _with_eos(text: str, eos: str | None) -> str:
    return text if eos is None or text.endswith(eos) else text + eos


def encode_new(tokenizer: Any, records: Sequence[Mapping], train_on: Mapping[str, str]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) of each normalised new-format record, untruncated, in order.

    `train_on` maps each format present to its value (`resolve_train_on`). Tokenization is batched per kind.
    """
    _check_template_reads_tools(tokenizer, records)
    eos = getattr(tokenizer, "eos_token", None)
    out: list[Any] = [None] * len(records)
    # (record position, full text, prompt text or None, target spans or None), tokenized as one batch per group:
    plain: list[tuple] = []  # raw strings, with the tokenizer's special tokens (TRL's `tokenizer(text)`)
    chat: list[tuple] = []  # rendered chat templates (they hold their special tokens)
    for i, rec in enumerate(records):
        fmt, mode = rec["_format"], train_on[rec["_format"]]
        if fmt == "text":
            plain.append((i, _with_eos(rec["text"], eos), None, None))
        elif fmt == "prompt_completion":
            full = rec["prompt"] + _with_eos(rec["completion"], eos)
            plain.append((i, full, rec["prompt"] if mode == "completion" else None, None))
        elif fmt == "conversational":
            template_of(tokenizer)
            full = _render(tokenizer, rec, rec["prompt"] + rec["completion"], gen=False)
            prompt = _render(tokenizer, rec, rec["prompt"], gen=True) if mode == "completion" else None
            chat.append((i, full, prompt, None))
        elif mode != "all" and has_generation_markers(template_of(tokenizer)):
            out[i] = _marked(tokenizer, rec, mode)
        else:
            template_of(tokenizer)
            full = _render(tokenizer, rec, rec["messages"], gen=False)
            chat.append((i, full, None, None if mode == "all" else _assistant_spans(tokenizer, rec, full, mode)))
    for group, special in ((plain, True), (chat, False)):
        spans = any(g[3] is not None for g in group)
        fulls = _ids(tokenizer, [g[1] for g in group], special=special, offsets=spans)
        with_prompt = [n for n, g in enumerate(group) if g[2] is not None]
        prompts = _ids(tokenizer, [group[n][2] for n in with_prompt], special=special)["input_ids"]
        prompt_of = dict(zip(with_prompt, prompts))
        for n, (i, _, _, target_spans) in enumerate(group):
            ids = list(map(int, fulls["input_ids"][n]))
            if n in prompt_of:
                cut = common_prefix(prompt_of[n], ids)
                mask = [0] * cut + [1] * (len(ids) - cut)
            elif target_spans is not None:
                mask = _mask_from_spans(fulls["offset_mapping"][n], target_spans)
            else:
                mask = [1] * len(ids)
            out[i] = (ids, mask)
    return out


def _check_template_reads_tools(tokenizer: Any, records: Sequence[Mapping]) -> None:
    """Refuses tool calls or a `tools` column that the chat template never reads: they would vanish from
    the training tokens without a word (SmolLM2's template renders only `content`)."""
    def messages(rec: Mapping) -> list:
        return rec.get("messages") or (rec.get("prompt", []) + rec.get("completion", []) if
                                       rec["_format"] == "conversational" else [])

    for field, has in (("tool_calls", lambda r: any(m.get("tool_calls") for m in messages(r))),
                       ("tools", lambda r: bool(r.get("tools")))):
        users = [r for r in records if r["_format"] in ("conversational", "messages") and has(r)]
        if users and field not in template_of(tokenizer):
            raise DataError(f"{_where(users[0])} (and {len(users) - 1} more) has '{field}', which the chat template "
                            "never reads, so it would be dropped from the training tokens. Pass "
                            "--chat_template=FILE with a template that renders tools (e.g. TRL's "
                            "trl/chat_templates/qwen2_5_training.jinja), or remove the field.")


def _marked(tokenizer: Any, rec: Mapping, mode: str) -> tuple[list[int], list[int]]:
    """Ids and the template's own assistant mask (`{% generation %}`); `last` keeps the final turn only."""
    msgs = rec["messages"]
    try:
        got = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            tools=rec.get("tools"), **rec.get("chat_template_kwargs", {}))
    except Exception as e:
        raise DataError(f"{_where(rec)}: the chat template failed on it ({type(e).__name__}: {e}). Fix the "
                        "record's messages, or pass --chat_template=FILE with a template that accepts them.") from e
    ids, mask = list(map(int, got["input_ids"])), list(map(int, got["assistant_masks"]))
    if mode == "last":
        _check_last(rec)
        before = _render(tokenizer, rec, msgs[:-1], gen=False)
        head = list(map(int, tokenizer(before, add_special_tokens=False)["input_ids"]))
        if ids[: len(head)] != head:
            raise _not_prefix(rec, len(msgs) - 1)
        mask = [0] * len(head) + mask[len(head):]
    return ids, mask


def _check_last(rec: Mapping) -> None:
    msgs = rec["messages"]
    if msgs[-1].get("role") != "assistant":
        raise DataError(f"{_where(rec)}: its messages end with a {msgs[-1].get('role')!r} turn, and "
                        "--train_on=last trains the final message, which must be the assistant's. Drop the "
                        "trailing turns, or use --train_on=assistant.")


def use_chat_template_file(tokenizer: Any, path: str | None) -> None:
    """Replaces the tokenizer's chat template with the Jinja template in `path` (TRL's `chat_template_path`
    for a .jinja file); None leaves it. The tokenizer saved beside an adapter then carries the template
    the adapter was trained with."""
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--chat_template={path}: no such file. Pass a Jinja chat template file, e.g. one of "
                        "TRL's trl/chat_templates/*.jinja.")
    text = file.read_text(encoding="utf-8")
    if "messages" not in text:
        raise DataError(f"--chat_template={path} does not look like a chat template (it never reads `messages`).")
    tokenizer.chat_template = text
