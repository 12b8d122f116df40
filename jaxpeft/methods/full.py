"""Full fine-tuning: the baseline. Every leaf is trainable; there is no separate adapter."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from jaxpeft.convert.hf import save_hf_folder
from jaxpeft.convert.load import from_pretrained
from jaxpeft.core.tree import Path
from jaxpeft.methods.base import Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig:
    pass


class Full(Method):
    name = "full"
    config_cls = FullConfig
    identity_at_init = True
    artifact_name = "model"

    def init(self, key: jax.Array, params: Mapping, config: Any) -> dict:
        return dict(params)

    def is_adapter(self, path: Path, config: Any) -> bool:
        return True

    def is_added(self, path: Path, config: Any) -> bool:
        return False

    def save(self, path: Any, params: Mapping, config: Any, *, model_config: Any, base_model_name_or_path: str,
             tokenizer: Any = None, overwrite: bool = False) -> None:
        save_hf_folder(path, params, model_config, tokenizer=tokenizer, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, Any]:
        loaded_model, loaded, _ = from_pretrained(str(path), dtype=model.dtype, load_tokenizer=False)
        return loaded_model, loaded, FullConfig()

