"""Prompt tuning and prefix tuning <-> PEFT's prompt-learning folders (PROMPT_TUNING, PREFIX_TUNING).

A folder holds `adapter_config.json` and `adapter_model.safetensors` with one tensor, `prompt_embeddings`:
    prompt tuning   (P, D)            the virtual tokens' input embeddings
    prefix tuning   (P, L * 2 * K*E)  column block 2l is layer l's key prefix, 2l+1 its value prefix
(D hidden, L layers, K kv heads, E head dim).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.convert.peft import common
from jaxpeft.convert.peft.common import WEIGHTS_NAME
from jaxpeft.core.errors import CheckpointError, ConfigError, bullet_list

TENSOR = "prompt_embeddings"


def peft_common(model_config: Any, *, peft_type: str, num_virtual_tokens: int, token_dim: int, heads: int,
                base_model_name_or_path: str) -> dict[str, Any]:
    """The adapter_config.json fields every PEFT prompt-learning config has (all known to old PEFT versions)."""
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
            "num_virtual_tokens": num_virtual_tokens, "token_dim": token_dim, "num_transformer_submodules": 1,
            "num_attention_heads": heads, "num_layers": model_config.num_hidden_layers,
            "base_model_name_or_path": base_model_name_or_path, "revision": None}


def write_folder(out_dir: str | os.PathLike, config: Mapping[str, Any], embeddings: np.ndarray, *,
                 overwrite: bool = False) -> Path:
    """Writes adapter_config.json (sorted keys) and adapter_model.safetensors (fp32, {"format": "pt"}) atomically."""
    tensor = np.ascontiguousarray(np.asarray(embeddings, np.float32))
    return common.write_folder(out_dir, config, {TENSOR: tensor}, overwrite=overwrite)


def read_folder(folder: str | os.PathLike, peft_type: str, *, allow_pickle: bool = False) -> tuple[dict, np.ndarray]:
    """(adapter_config.json contents, the `prompt_embeddings` tensor) of a PEFT folder of `peft_type`."""
    folder = Path(folder)
    raw = common.read_config_json(folder)
    if raw.get("peft_type") != peft_type:
        raise ConfigError(f"{folder} holds a {raw.get('peft_type')!r} adapter, not {peft_type!r}; load it with the "
                          "method it was trained with (e.g. LoRA folders with load_peft_adapter).")
    problems = []
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type={raw['task_type']!r}: jaxpeft runs causal LMs (CAUSAL_LM)")
    if raw.get("num_transformer_submodules", 1) != 1:
        problems.append(f"num_transformer_submodules={raw['num_transformer_submodules']}: encoder-decoder adapters "
                        "are not supported (a causal LM has 1)")
    tensors = common.read_tensors(folder, allow_pickle)
    extra = sorted(set(tensors) - {TENSOR})
    if TENSOR not in tensors:
        problems.append(f"{WEIGHTS_NAME} has no {TENSOR!r} tensor (found {sorted(tensors)})")
    elif extra:
        problems.append(f"{WEIGHTS_NAME} has tensors besides {TENSOR!r}: {extra}")
    if problems:
        raise CheckpointError(f"{folder} is not a {peft_type} adapter jaxpeft can load:\n{bullet_list(problems)}")
    return raw, np.asarray(tensors[TENSOR], np.float32)


def check_fits_model(folder: Any, checks: Mapping[str, tuple[Any, Any]]) -> None:
    """One CheckpointError listing every (what: (the adapter's, the model's)) pair that differs."""
    bad = [f"{what}: the adapter has {have}, the model {need}" for what, (have, need) in checks.items()
           if have is not None and have != need]
    if bad:
        raise CheckpointError(f"the adapter in {folder} was made for a different base model:\n{bullet_list(bad)}\n"
                              "Load it onto the model it was trained on (its base_model_name_or_path).")
