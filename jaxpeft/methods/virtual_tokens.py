"""What prompt tuning and prefix tuning share: checks on the number of virtual tokens, and their PEFT folders.

Both methods put P virtual tokens in front of every sequence; the model (`jaxpeft/models/llama.py`) finds
their leaves in the parameter tree, fills the first P slots of a KV cache with their keys and values, and
returns outputs for the real tokens only, whose positions start at P. A PEFT folder of either method holds
`adapter_config.json` and `adapter_model.safetensors` with one tensor, `prompt_embeddings`:
    prompt tuning   (P, D)            the virtual tokens' input embeddings
    prefix tuning   (P, L * 2 * K*E)  column block 2l is layer l's key prefix, 2l+1 its value prefix
(D hidden, L layers, K kv heads, E head dim).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import CheckpointError, ConfigError, bullet_list
from jaxpeft.core.targets import LINEAR_KERNELS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"
# Leaves of either method: a tree that has one of them cannot take another virtual-token adapter.
VIRTUAL_LEAVES = ("prompt", "prefix_encoder", "prefix_key", "prefix_value")


def check_count(num_virtual_tokens: int, method: str) -> list[str]:
    """The problem with a virtual-token count, if any (for a config's one error listing every problem)."""
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        return [f"num_virtual_tokens={num_virtual_tokens!r}: {method} needs at least 1 virtual token"]
    return []


def check_fits_context(num_virtual_tokens: int, model_config: Any) -> None:
    """The virtual tokens take the first P positions; at least one must be left for real tokens."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and num_virtual_tokens >= limit:
        raise ConfigError(f"num_virtual_tokens={num_virtual_tokens} fills the model's whole context "
                          f"(max_position_embeddings={limit}): the real tokens' positions start after the virtual "
                          f"ones. Use fewer than {limit} virtual tokens (and leave room for your sequences).")


def refuse_virtual(params: Mapping) -> None:
    """Refuses a tree that already carries prompt or prefix leaves (one virtual-token adapter at a time)."""
    from jaxpeft.core.tree import flatten_params

    found = sorted({"/".join(p) for p in flatten_params(params) if p[0] in VIRTUAL_LEAVES or p[-1] in VIRTUAL_LEAVES})
    if found:
        more = " ..." if len(found) > 4 else ""
        raise ConfigError(f"these parameters already carry virtual-token leaves ({found[:4]}{more}); split that "
                          "adapter off (method.split(...)[1]) before adding another")


def base_shapes(params: Mapping) -> dict[str, int]:
    """Shapes of the base model read off the tree: layers L, hidden D, kv width K*E, vocab V."""
    model = params["model"]
    layers = model["layers"]
    k_proj = layers["0"]["self_attn"]["k_proj"]
    kernel = next(k_proj[k] for k in LINEAR_KERNELS if k in k_proj)  # quantized kernels expose their (I, O) shape
    vocab, hidden = np.shape(model["embed_tokens"]["embedding"])
    return {"layers": len(layers), "hidden": int(hidden), "kv_width": int(kernel.shape[1]), "vocab": int(vocab)}


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
    from safetensors.numpy import save_file

    tensor = np.ascontiguousarray(np.asarray(embeddings, np.float32))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        save_file({TENSOR: tensor}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(out_dir)


def read_folder(folder: str | os.PathLike, peft_type: str, *, allow_pickle: bool = False) -> tuple[dict, np.ndarray]:
    """(adapter_config.json contents, the `prompt_embeddings` tensor) of a PEFT folder of `peft_type`."""
    from jaxpeft.convert.peft_io import _read_tensors, read_config_json

    folder = Path(folder)
    raw = read_config_json(folder)
    if raw.get("peft_type") != peft_type:
        raise ConfigError(f"{folder} holds a {raw.get('peft_type')!r} adapter, not {peft_type!r}; load it with the "
                          "method it was trained with (e.g. LoRA folders with load_peft_adapter).")
    problems = []
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type={raw['task_type']!r}: jaxpeft runs causal LMs (CAUSAL_LM)")
    if raw.get("num_transformer_submodules", 1) != 1:
        problems.append(f"num_transformer_submodules={raw['num_transformer_submodules']}: encoder-decoder adapters "
                        "are not supported (a causal LM has 1)")
    tensors = _read_tensors(folder, allow_pickle)
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
