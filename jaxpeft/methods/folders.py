"""Which method reads an adapter folder, and reading any folder jaxpeft understands."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from jaxpeft.convert.peft.common import read_config_json
from jaxpeft.core.errors import ConfigError
from jaxpeft.methods.base import METHODS, Method, get_method


def method_of_folder(folder: Any) -> Method:
    """The registered method that reads an adapter folder: PEFT folders by their `peft_type`, AdapterHub
    folders (bottleneck adapters) by their layout. Raises a ConfigError saying what the folder is."""
    path = Path(folder) / "adapter_config.json"
    raw = read_config_json(Path(folder), expect="an adapter folder (PEFT or AdapterHub); a full model folder is "
                                                "loaded with --model / from_pretrained instead")
    if "peft_type" in raw:
        by_type = {m.peft_type: m for m in METHODS.values() if m.peft_type}
        if raw["peft_type"] not in by_type:
            raise ConfigError(f"{folder} holds a PEFT {raw['peft_type']!r} adapter; jaxpeft reads "
                              f"{sorted(by_type)}.")
        return by_type[raw["peft_type"]]
    if isinstance(raw.get("config"), dict) and "model_class" in raw:
        return get_method("adapters")
    raise ConfigError(f"{path} is neither a PEFT adapter config (no peft_type) nor an AdapterHub one (no "
                      "config/model_class); cannot tell which method wrote it.")


def load_adapter(folder: Any, model: Any, params: Mapping) -> tuple[Method, Any, dict, Any]:
    """Reads any adapter folder jaxpeft understands onto base `params`: (method, model, params, config)."""
    method = method_of_folder(folder)
    model, params, config = method.load(folder, model, params)
    return method, model, params, config
