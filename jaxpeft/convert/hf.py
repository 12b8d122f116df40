"""Hugging Face checkpoints <-> jaxpeft parameter trees.

The mapping is mechanical: an HF name `a.b.c.weight` is the tree path a/b/c with the leaf renamed
`kernel` (and transposed to (in, out)) for linear layers, `embedding` for `embed_tokens`, and kept as
`weight`/`bias` otherwise (norm scales, biases).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from jaxpeft.convert.experts import file_tensors, fused_view
from jaxpeft.convert.shards import DEFAULT_MAX_SHARD_SIZE, TensorSpec, Tensors, as_tensors, save_shards
from jaxpeft.convert.stream import Checkpoint, Placement, QuantizeSpec, load_params
from jaxpeft.core import dtypes
from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import CheckpointError, bullet_list
from jaxpeft.core.tree import module_leaves
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
    state = fused_view(state, config)  # MoE: per-expert (or fused) expert tensors under the tree's names
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
    """The inverse of `hf_to_params`: an HF state dict (numpy, torch layout) from a dense parameter tree.

    Builds every tensor at once; the writers stream the same tensors with `hf_tensors`."""
    return dict(hf_tensors(params, dtype).items())


ModuleTransform = Callable[[tuple[str, ...], dict], Mapping[str, Any]]


def hf_tensors(params: Mapping, dtype: Any = np.float32, *, transform: ModuleTransform | None = None) -> Tensors:
    """The HF state dict of `params` as lazy `Tensors`: each module's tensors are transposed to torch layout
    and cast to `dtype` only when a writer asks for them, so the converted model never exists whole.

    `transform(module_path, leaves)` (e.g. merging an adapter into that module) is applied to one module's
    leaves just before they are converted; it must be traceable by `jax.eval_shape`, which gives the
    tensors' shapes ahead of computing them. Raises CheckpointError, before anything is computed, naming
    every leaf that is not a plain weight (adapters and quantized kernels must be merged or dequantized).
    """
    np_dtype = np.dtype(dtype)
    groups, bad = [], []
    for module, leaves in module_leaves(params).items():
        shapes = leaves if transform is None else _eval_shapes(transform, module, leaves)
        specs = []
        for leaf, value in shapes.items():
            if leaf not in ("kernel", "embedding", "weight", "bias"):
                bad.append("/".join(module + (leaf,)))
                continue
            shape = tuple(np.shape(value))
            specs.append(TensorSpec(_hf_name(module, leaf), shape[::-1] if leaf == "kernel" else shape, np_dtype))
        groups.append((specs, functools.partial(_module_tensors, module, leaves, np_dtype, transform)))
    if bad:
        raise CheckpointError(
            f"leaf {bad[0]} is not a plain weight; merge or split off adapters (and dequantize) before exporting "
            "a full model" + (f". Every such leaf:\n{bullet_list(bad)}" if len(bad) > 1 else ""))
    return Tensors(groups)


def transformers_order(config: LlamaConfig) -> Callable[[TensorSpec], tuple[int, int, str]]:
    """A sort key putting tensors in the order transformers' `state_dict()` lists them (embedding, each layer's
    linears then norms, final norm, head; a module's weight before its bias): the order its `save_pretrained`
    fills a dense model's shards in. Names it does not know go last, by name."""
    family = family_of(config.model_type)
    modules = [family.embed]
    for i in range(config.num_hidden_layers):
        prefix = family.layer_prefix(i)
        modules += [f"{prefix}.{part.name}" for part in (*family.linears, *family.norms)]
    modules += [family.final_norm, family.head]
    rank = {m: i for i, m in enumerate(modules)}

    def key(spec: TensorSpec) -> tuple[int, int, str]:
        module, _, leaf = spec.name.rpartition(".")
        return rank.get(module, len(rank)), {"weight": 0, "bias": 1}.get(leaf, 2), spec.name

    return key


def _hf_name(module: tuple[str, ...], leaf: str) -> str:
    return ".".join(module) + (".bias" if leaf == "bias" else ".weight")


def _eval_shapes(transform: ModuleTransform, module: tuple[str, ...], leaves: dict) -> Mapping[str, Any]:
    import jax

    return jax.eval_shape(lambda x: dict(transform(module, x)), leaves)


def _module_tensors(module: tuple[str, ...], leaves: dict, np_dtype: np.dtype,
                    transform: ModuleTransform | None) -> dict[str, np.ndarray]:
    """One module's HF tensors: (transformed,) transposed (kernels) and cast, one copy each."""
    out = {}
    for leaf, value in (leaves if transform is None else transform(module, leaves)).items():
        array = np.asarray(value)
        out[_hf_name(module, leaf)] = np.array(array.T if leaf == "kernel" else array, dtype=np_dtype, order="C")
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


def read_config_json(folder: str | os.PathLike) -> dict[str, Any]:
    """An HF model folder's config.json as a dict; a missing or broken file is one CheckpointError."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); point at an HF model folder with a valid config.json.") from e


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
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    transform: ModuleTransform | None = None,
) -> Path:
    """Writes an HF model folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    `dtype` is float32, bfloat16, float16 or "auto" (the tree's own, `core.dtypes.tree_dtype_name`). Tensors
    are converted and written one module at a time (`transform` may change a module's leaves just before,
    see `hf_tensors`), into one model.safetensors or, past `max_shard_size` bytes (default the Hub's
    "5GB"), shards with an index. Written atomically: the folder appears complete or not at all.
    """
    dtype = dtypes.resolve(dtype, dtypes.tree_dtype_name(params)) if dtype == dtypes.AUTO else dtype
    tensors = hf_tensors(params, numpy_dtype(dtype), transform=transform).reordered(transformers_order(config))
    tensors = file_tensors(tensors, config)  # MoE: the files' per-expert names
    hf_config = {**config.to_hf(), "torch_dtype": dtype, "dtype": dtype}
    return write_hf_folder(out_dir, tensors, hf_config, tokenizer=tokenizer, generation_config=generation_config,
                           overwrite=overwrite, max_shard_size=max_shard_size)


def write_hf_folder(
    out_dir: str | os.PathLike,
    state: Mapping[str, np.ndarray] | Tensors,
    hf_config: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    generation_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    total_parameters: int | None = None,
) -> Path:
    """Writes the weights (a state dict or lazy `Tensors`, streamed tensor by tensor: one model.safetensors,
    or shards and model.safetensors.index.json past `max_shard_size`), config.json, generation_config.json
    (and the tokenizer) atomically. `total_parameters` goes into a sharded index (default: the tensors'
    element count).

    A tied model's `lm_head.weight` is left out, as transformers saves it."""
    tensors = as_tensors(state)
    if hf_config.get("tie_word_embeddings"):
        tensors = tensors.without(["lm_head.weight"])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_shards(tmp, tensors, max_shard_size=max_shard_size, total_parameters=total_parameters)
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True))
        gen = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": hf_config.get("eos_token_id"),
               "pad_token_id": hf_config.get("pad_token_id"), **(generation_config or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def numpy_dtype(name: str):
    """The numpy dtype of float32, bfloat16 or float16 (`core.dtypes.numpy_dtype`)."""
    return dtypes.numpy_dtype(name)
