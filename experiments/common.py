"""Helpers shared by the absl entry points: logging to stderr, chat prompts."""

from __future__ import annotations

import sys
from typing import Any

from absl import logging


def log_to_stderr() -> None:
    """absl logs go to stderr (stdout is reserved for results)."""
    logging.use_absl_handler()
    logging.get_absl_handler().python_handler.stream = sys.stderr
    logging.set_verbosity(logging.INFO)


def encode_prompt(tokenizer: Any, text: str, *, chat: bool) -> list[int]:
    """Token ids of a user prompt, through the tokenizer's chat template unless `chat` is False."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(text)["input_ids"]
