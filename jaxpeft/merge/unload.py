"""`merge_and_unload`: fold a trained adapter into the base weights and drop its leaves, for any method that can;
`save_merged`: the same written straight to an HF folder, module by module.

The method registry decides: `method.merge_module` folds one module (LoRA and DoRA: W + s·AB, rescaled for
DoRA; IA3: W diag-scaled; a quantized base kernel is dequantized into a dense one), and every leaf the
method added (`is_added`) must be gone afterwards, so the result is a plain tree that `save_hf_folder`
writes and transformers loads. Methods that change the computation rather than the weights (prompt and
prefix tuning, bottleneck adapters) are not `mergeable` and are refused with the reason.

`save_merged` never holds the merged model: each module is merged (its 4-bit kernel, if any, dequantized
in fp32 for the add), cast to the merged dtype, written and dropped before the next (`hf_tensors`' transform),
with the same bytes as merging the whole tree in fp32 and then casting (tests/test_shards.py).
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Any, Mapping

import jax.numpy as jnp

from jaxpeft.convert.hf import ModuleTransform, save_hf_folder
from jaxpeft.convert.shards import DEFAULT_MAX_SHARD_SIZE
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, dotted, flatten_params
from jaxpeft.methods.base import Method, get_method


def _mergeable(method: str | Method) -> Method:
    m = get_method(method) if isinstance(method, str) else method
    if not m.mergeable:
        raise ConfigError(f"{m.name} cannot be merged into the base weights (it changes the computation, not the "
                          "weights); keep the adapter and the base separate instead of merge_and_unload")
    return m


def _leftover_error(m: Method, left: list[str]) -> ConfigError:
    return ConfigError(f"{m.name}.merge left adapter leaves behind:\n{bullet_list(left[:20])}\n"
                       "This is a bug in the method's merge; report it with the method config.")


def merge_and_unload(params: Mapping, method: str | Method, config: Any = None) -> dict:
    """`params` (base + the method's leaves) with the adapter merged in and no adapter leaves left.

    `method` is a registered name ("lora", ...) or a `Method`; `config` is the method's config (LoRA reads
    everything it needs from its leaves and accepts None). Raises ConfigError for a method that cannot
    merge, and if leaves the method added survive its merge (a method bug, named leaf by leaf).
    """
    m = _mergeable(method)
    merged = m.merge(params, config)
    left = [dotted(p) for p in flatten_params(merged) if m.is_added(p, config)]
    if left:
        raise _leftover_error(m, left)
    return merged


def merged_module_transform(method: str | Method, config: Any = None) -> ModuleTransform:
    """`(module path, leaves) -> plain leaves`: one module merged and unloaded, its weights in float32 (a
    quantized kernel the adapter does not touch is dequantized to float32 too), for `hf_tensors`."""
    m = _mergeable(method)

    def transform(path: Path, leaves: Mapping[str, Any]) -> dict[str, Any]:
        merged = m.merge_module(path, leaves, config, dtype=jnp.float32)
        left = [dotted(path + (k,)) for k in merged if m.is_added(path + (k,), config)]
        if left:
            raise _leftover_error(m, left)
        if "qkernel" in merged:  # quantized but not adapted: written dense, as dequantize_params(.., float32)
            merged = {("kernel" if k == "qkernel" else k): (v.dequantize(jnp.float32) if k == "qkernel" else v)
                      for k, v in merged.items()}
        return merged

    return transform


def save_merged(out_dir: str | os.PathLike, params: Mapping, method: str | Method, config: Any, model_config: Any,
                *, tokenizer: Any = None, dtype: str = "auto", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                overwrite: bool = False) -> FsPath:
    """Writes `params` (base + the method's leaves) with the adapter merged in as an HF folder, one module at
    a time (the merged model never exists whole). `dtype`: float32, bfloat16, float16, or "auto" (the
    base's: `core.dtypes.tree_dtype_name`, a 4-bit base's dtype before quantization). Atomic."""
    return save_hf_folder(out_dir, params, model_config, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite,
                          max_shard_size=max_shard_size, transform=merged_module_transform(method, config))
