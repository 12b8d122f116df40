"""Hugging Face checkpoints <-> jaxpeft parameter trees.

The mapping is mechanical: an HF name `a.b.c.weight` is the tree path a/b/c with the leaf renamed
`kernel` (and transposed to (in, out)) for linear layers, `embedding` for `embed_tokens`, and kept as
`weight`/`bias` otherwise (norm scales, biases).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.convert.stream import Checkpoint, Placement, QuantizeSpec, load_params
from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import CheckpointError, bullet_list
from jaxpeft.core.tree import flatten_params
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import family_of

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_to_params(state: Mapping[str, np.ndarray], config: LlamaConfig, dtype: Any = np.float32, *,
                 quantize: QuantizeSpec | None = None, placement: Placement | None = None,
                 progress: bool = False) -> dict:
    """Converts an HF state dict (torch layout; a dict of numpy arrays or a lazy `stream.Checkpoint`) into
    the canonical parameter tree, one tensor at a time (`stream.load_params`: `dtype` is the stored dtype
    of float weights, `quantize` the linears made 4-bit as they arrive, `placement` where leaves go)."""
    expected = family_of(config.model_type).hf_names(config)
    names = set(state)
    if config.tie_word_embeddings:
        names.discard("lm_head.weight")  # some savers keep the tied copy; it is the embedding
    missing = sorted(expected - names)
    unexpected = sorted(n for n in names - expected if not n.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        lines = [f"missing: {n}" for n in missing] + [f"unexpected: {n}" for n in unexpected]
        raise CheckpointError(
            f"the checkpoint's tensors do not fit a {config.model_type} model with this config.json:\n"
            f"{bullet_list(lines[:40])}" + (f"\n  ... and {len(lines) - 40} more" if len(lines) > 40 else "")
            + "\nCheck that config.json and the weights belong to the same model."
        )
    layout = {name: hf_name_to_path(name, tensor_ndim(state, name)) for name in expected}
    return load_params(state, layout, param_dtype=dtype, quantize=quantize, placement=placement,
                       progress=progress)


def tensor_ndim(state: Mapping, name: str) -> int:
    """The rank of tensor `name` of `state` (from a lazy checkpoint's header, without reading it)."""
    info = getattr(state, "info", None)
    return len(info[name].shape) if info is not None else np.ndim(state[name])


def params_to_hf(params: Mapping, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_params`: an HF state dict (numpy, torch layout) from a dense parameter tree."""
    out = {}
    for path, value in flatten_params(params).items():
        array = np.asarray(value).astype(dtype)
        *module, leaf = path
        if leaf == "kernel":
            array = np.ascontiguousarray(array.T)
        elif leaf not in ("embedding", "weight", "bias"):
            raise CheckpointError(
                f"leaf {'/'.join(path)} is not a plain weight; merge or split off adapters (and dequantize) "
                "before exporting a full model"
            )
        out[".".join(module) + (".bias" if leaf == "bias" else ".weight")] = array
    return out


def hf_name_to_path(name: str, ndim: int) -> tuple[tuple[str, ...], str]:
    parts = name.split(".")
    module, leaf = tuple(parts[:-1]), parts[-1]
    if leaf == "weight" and ndim == 2:
        leaf = "embedding" if module[-1] == "embed_tokens" else "kernel"
    return module, leaf


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one safetensors file into numpy; a damaged file is a CheckpointError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(
            f"could not read {path}: {e}. The file is truncated or not a safetensors file; "
            "download or export it again."
        ) from e


def read_hf_weights(folder: str | os.PathLike, *, allow_pickle: bool = False) -> Mapping[str, np.ndarray]:
    """The tensors of model.safetensors or a sharded safetensors index, as a lazy `stream.Checkpoint` (headers
    read now, each tensor when it is looked up), or (opt-in) of pytorch_model.bin, read whole."""
    folder = Path(folder)
    if (folder / WEIGHTS_INDEX_NAME).exists():
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{folder}/{WEIGHTS_INDEX_NAME} names shards that are missing:\n"
                                  f"{bullet_list(missing)}\nDownload the complete checkpoint.")
        return Checkpoint([folder / s for s in shards])
    if (folder / WEIGHTS_NAME).exists():
        return Checkpoint([folder / WEIGHTS_NAME])
    singles = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(singles) == 1:
        return Checkpoint([folder / singles[0]])
    if (folder / PICKLE_NAMES[0]).exists():
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only {PICKLE_NAMES[0]}, a pickle file that can run code when loaded. "
                "Convert it to safetensors, or pass allow_pickle=True if you trust its source."
            )
        import torch

        loaded = torch.load(folder / PICKLE_NAMES[0], map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in loaded.items()}
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"no weights in {folder}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} with its shards; "
        f"found {present or 'nothing'}. Point at a complete Hugging Face model folder."
    )


def load_tokenizer_from(folder: str | os.PathLike):
    """The tokenizer of an HF model folder (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"could not load a tokenizer from {folder} ({e}); the folder needs the "
                              "tokenizer files (tokenizer.json / tokenizer_config.json).") from e


def save_hf_folder(
    out_dir: str | os.PathLike,
    params: Mapping,
    config: LlamaConfig,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    generation_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes an HF model folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Written atomically: the folder appears complete or not at all.
    """
    np_dtype = numpy_dtype(dtype)
    state = params_to_hf(params, np_dtype)
    hf_config = {**config.to_hf(), "torch_dtype": dtype, "dtype": dtype}
    return write_hf_folder(out_dir, state, hf_config, tokenizer=tokenizer, generation_config=generation_config,
                           overwrite=overwrite)


def write_hf_folder(
    out_dir: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    hf_config: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    generation_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes model.safetensors, config.json, generation_config.json (and the tokenizer) atomically.

    A tied model's `lm_head.weight` is left out, as transformers saves it."""
    from safetensors.numpy import save_file

    state = dict(state)
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True))
        gen = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": hf_config.get("eos_token_id"),
               "pad_token_id": hf_config.get("pad_token_id"), **(generation_config or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def numpy_dtype(name: str):
    import ml_dtypes

    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if name not in table:
        raise ValueError(f"dtype {name!r} is not one of {sorted(table)}")
    return table[name]
