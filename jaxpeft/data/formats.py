"""The record formats training data comes in, recognised one record at a time and normalised to one form.

TRL 1.16's SFT formats, Alpaca, and ShareGPT (field names as the formats define them):

  format         record                                                   normalised (`"_format"` key)
  text           {"text": str}                                            {"_format": "text", "text"}
  prompt/compl.  {"prompt": str, "completion": str}                       {"_format": "prompt_completion", ...}
  conversational {"prompt": [messages], "completion": [messages]}          {"_format": "conversational", ...}
  messages       {"messages": [messages]}  (multi-turn, tool calls)        {"_format": "messages", ...}
  ShareGPT       {"conversations": [{"from": ..., "value": ...}, ...]}     the same as messages
  Alpaca         {"instruction": str, "input": str (optional), "output": str}  the legacy form (records.py)

Conversational records may carry `tools` (a list of JSON schemas, or that list as a JSON string) and
`chat_template_kwargs` (a dict); both go to `apply_chat_template` as TRL passes them. Messages are kept as
they are, every field included (`tool_calls`, `name`, `reasoning_content`, ...): only the template decides
what it renders. ShareGPT's `from`/`value` become `role`/`content`, and its roles `human`/`gpt` become
`user`/`assistant` (the roles chat templates know); other fields and roles are kept.

Keys beside a recognised format (`id`, `source`, ...) are ignored; `normalize` returns them so the caller
can list them once. A new-format record also keeps `_source` and `_index` (where it came from), so a later
error can name the file and the record.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from jaxpeft.core.errors import ConfigError, DataError

Record = dict[str, Any]

NEW_FORMATS = ("text", "prompt_completion", "conversational", "messages")
# The keys each format reads; anything else in a record is an ignored extra.
_FORMAT_KEYS = {
    "text": {"text"},
    "prompt_completion": {"prompt", "completion"},
    "conversational": {"prompt", "completion", "tools", "chat_template_kwargs"},
    "messages": {"messages", "tools", "chat_template_kwargs"},
    "sharegpt": {"conversations", "tools", "chat_template_kwargs"},
    "alpaca": {"instruction", "input", "output"},
}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}

EXPECTED = (
    "one of: {'text': str}; {'prompt': str, 'completion': str}; {'prompt': [messages], 'completion': "
    "[messages]}; {'messages': [{'role': ..., 'content': ...}, ...]} (optionally 'tools', "
    "'chat_template_kwargs'); ShareGPT {'conversations': [{'from': ..., 'value': ...}, ...]}; Alpaca "
    "{'instruction': str, 'input': str (optional), 'output': str}"
)
FIX = (
    "Rename your fields to one of these formats (--field_map=yours:theirs,..., or --dataset_text_field for a "
    "text column), or drop the records that have none."
)


class FormatProblem(ValueError):
    """Why one record fits no format (the caller adds the file, the index and the keys)."""


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _check_messages(msgs: Any, name: str) -> None:
    if not _is_messages(msgs):
        raise FormatProblem(f"'{name}' is not a non-empty list of message objects")
    for i, m in enumerate(msgs):
        if not isinstance(m.get("role"), str):
            raise FormatProblem(f"{name}[{i}] lacks a string 'role' (keys: {sorted(m)})")
        content = m.get("content")
        # An assistant turn that only calls tools may have no content; structured content (a list of parts)
        # is the template's business.
        if content is None and not m.get("tool_calls"):
            raise FormatProblem(f"{name}[{i}] ({m['role']}) has neither 'content' nor 'tool_calls'")


def _tools(record: Mapping) -> Any:
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise FormatProblem(f"'tools' is a string but not JSON ({e.msg}); give a list of tool schemas") from None
    if tools is not None and not isinstance(tools, list):
        raise FormatProblem(f"'tools' is a {type(tools).__name__}; expected a list of tool schemas (or its JSON)")
    return tools


def _template_kwargs(record: Mapping) -> dict[str, Any]:
    kwargs = record.get("chat_template_kwargs")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise FormatProblem(f"'chat_template_kwargs' is a string but not JSON ({e.msg})") from None
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise FormatProblem(f"'chat_template_kwargs' is a {type(kwargs).__name__}; expected an object")
    return {k: v for k, v in kwargs.items() if v is not None}  # arrow fills absent struct fields with None


def _from_sharegpt(msgs: Any) -> list[dict[str, Any]]:
    if not _is_messages(msgs):
        raise FormatProblem("'conversations' is not a non-empty list of message objects")
    out = []
    for m in msgs:
        m = dict(m)
        if "from" in m:
            m["role"] = m.pop("from")
        if "value" in m:
            m["content"] = m.pop("value")
        if isinstance(m.get("role"), str):
            m["role"] = _SHAREGPT_ROLES.get(m["role"], m["role"])
        out.append(m)
    return out


def detect(record: Any) -> str:
    """The format name of `record` (a key of `_FORMAT_KEYS`, or "normalised"/"legacy"); FormatProblem if none."""
    if not isinstance(record, Mapping):
        raise FormatProblem(f"is a {type(record).__name__}, not an object")
    if record.get("_format") in NEW_FORMATS:
        return "normalised"
    if "messages" in record and "target" in record:
        return "legacy"  # jaxpeft's own normalised chat form: {"messages": prompt, "target": answer}
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if prompt is None or completion is None:
            missing = "completion" if completion is None else "prompt"
            raise FormatProblem(f"has 'prompt' or 'completion' but no {missing!r} (prompt-only records are "
                                "not supervised data)")
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion"
        if isinstance(prompt, list) and isinstance(completion, list):
            return "conversational"
        raise FormatProblem(f"'prompt' is a {type(prompt).__name__} and 'completion' a "
                            f"{type(completion).__name__}; both must be strings or both message lists")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise FormatProblem(f"'text' is a {type(record['text']).__name__}, not a string")
        return "text"
    if "instruction" in record or "output" in record:
        missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
        if missing:
            raise FormatProblem(f"missing string field(s) {missing}")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise FormatProblem("'input' is not a string")
        return "alpaca"
    raise FormatProblem("matches no format")


def extra_keys(record: Mapping, fmt: str) -> set[str]:
    """The keys of `record` that its format `fmt` does not read."""
    return set(record) - _FORMAT_KEYS.get(fmt, set(record))


def normalize_new(record: Mapping, fmt: str, *, source: str, index: int) -> Record:
    """The normalised form of a record of one of the new formats (`detect` gave `fmt`)."""
    where = {"_source": source, "_index": index}
    if fmt == "text":
        return {"_format": "text", "text": record["text"], **where}
    if fmt == "prompt_completion":
        return {"_format": "prompt_completion", "prompt": record["prompt"], "completion": record["completion"],
                **where}
    extras = {"tools": _tools(record), "chat_template_kwargs": _template_kwargs(record)}
    if fmt == "conversational":
        _check_messages(record["prompt"], "prompt")
        _check_messages(record["completion"], "completion")
        return {"_format": "conversational", "prompt": list(record["prompt"]),
                "completion": list(record["completion"]), **extras, **where}
    msgs = _from_sharegpt(record["conversations"]) if fmt == "sharegpt" else list(record["messages"])
    _check_messages(msgs, "conversations" if fmt == "sharegpt" else "messages")
    return {"_format": "messages", "messages": msgs, **extras, **where}


def apply_field_map(records: list[Any], field_map: Mapping[str, str], *, source: str) -> list[Any]:
    """Renames record keys (`{"question": "prompt"}`); a mapped field that no record has is an error."""
    if not field_map:
        return records
    present = set().union(*(r.keys() for r in records if isinstance(r, Mapping)))
    unknown = sorted(set(field_map) - present)
    if unknown:
        raise DataError(f"{source}: --field_map names field(s) {unknown} that no record has (--dataset_text_field "
                        f"counts as one); the records have {sorted(present)}. Fix the names before the ':' "
                        "(yours:theirs).")
    out = []
    for r in records:
        if isinstance(r, Mapping):
            r = {field_map.get(k, k): v for k, v in r.items()}
        out.append(r)
    return out


def parse_field_map(text: str | None) -> dict[str, str]:
    """`"question:prompt,answer:completion"` -> `{"question": "prompt", "answer": "completion"}`."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        src, sep, dst = part.partition(":")
        if not sep or not src.strip() or not dst.strip():
            raise ConfigError(f"--field_map entry {part!r} is not yours:theirs; write e.g. "
                              "--field_map=question:prompt,answer:completion.")
        out[src.strip()] = dst.strip()
    return out
