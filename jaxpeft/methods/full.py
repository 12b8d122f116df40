"""Full fine-tuning: the baseline. Every leaf is trainable; there is no separate adapter."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from jaxpeft.core.tree import Path
from jaxpeft.methods.base import Method, register


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig:
    pass


class Full(Method):
    name = "full"
    config_cls = FullConfig
    identity_at_init = True

    def init(self, key: jax.Array, params: Mapping, config: Any) -> dict:
        return dict(params)

    def is_adapter(self, path: Path, config: Any) -> bool:
        return True

    def is_added(self, path: Path, config: Any) -> bool:
        return False


register(Full())
