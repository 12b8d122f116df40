"""bitsandbytes 4-bit checkpoints <-> jaxpeft quantized parameter trees (the QLoRA base loader is `convert.load`).

An HF folder saved with `load_in_4bit` (transformers + bitsandbytes) stores each quantized `Linear4bit`
M, torch weight [O, I], N = O * I weights in K blocks (K2 nested blocks), as these tensors (checked by
saving real bnb-quantized models with transformers 5.24 / bitsandbytes 0.50.2):

    M.weight                                   uint8 [(N + 1) // 2, 1]   packed codes, high nibble first
    M.weight.absmax                            fp32 [K], or uint8 [K] codes with double quantization
    M.weight.quant_map                         fp32 [16]                 the 4-bit code table
    M.weight.nested_absmax                     fp32 [K2]                 double quantization only
    M.weight.nested_quant_map                  fp32 [256]                double quantization only (dynamic map)
    M.weight.quant_state.bitsandbytes__<qt>    uint8 [bytes]             UTF-8 JSON, <qt> = nf4 | fp4

The JSON (bitsandbytes' `QuantState.as_dict(packed=True)`, written by `json.dumps`) holds, in order,
quant_type, blocksize, dtype ("float32" | "bfloat16" | "float16"), shape ([O, I]) and, with double
quantization, nested_blocksize (256), nested_dtype ("float32"), nested_offset (the fp32 mean of absmax,
as a Python float). Every other tensor (embeddings, norms, lm_head) is stored dense, as usual, and
config.json carries transformers' `quantization_config` (`quant_method: "bitsandbytes"`).

A 4-bit kernel (`quant.nf4`) holds exactly these bytes, so export and import copy codes and statistics unchanged;
dequantized weights equal `bitsandbytes.functional.dequantize_4bit` bit for bit. Importing needs no
torch or bitsandbytes (safetensors is read with numpy).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from absl import logging

from jaxpeft.convert.hf import (hf_name_to_path, hf_tensors, load_tokenizer_from, numpy_dtype, read_config_json,
                                read_hf_weights,
                                tensor_ndim, write_hf_folder)
from jaxpeft.convert.shards import DEFAULT_MAX_SHARD_SIZE, TensorSpec, Tensors
from jaxpeft.convert.stream import Placement, load_params
from jaxpeft.core import dtypes
from jaxpeft.core.dtypes import config_dtype
from jaxpeft.core.errors import CheckpointError, ConfigError, UnsupportedModelError, bullet_list
from jaxpeft.core.partition import count
from jaxpeft.core.targets import Targets
from jaxpeft.core.tree import dotted, flatten_params, module_leaves, unflatten_params
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import build_model, config_from_hf, family_of
from jaxpeft.quant import dynamic8, nf4

STATE_TAG = ".weight.quant_state.bitsandbytes__"
_AUX = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bnb4bitConfig:
    """How QLoRA quantizes its base: bitsandbytes' 4-bit settings (`BitsAndBytesConfig` plus blocksize).

    `double_quant` is `bnb_4bit_use_double_quant`; `targets` picks the linear modules ("all-linear" is
    every linear but the output head; embeddings are never quantized).
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    targets: Targets = "all-linear"

    def __post_init__(self) -> None:
        problems = []
        if self.quant_type not in nf4.CODES:
            problems.append(f"quant_type {self.quant_type!r}: expected one of {sorted(nf4.CODES)}")
        if self.blocksize not in nf4.ALLOWED_BLOCKSIZES:
            problems.append(f"blocksize {self.blocksize!r}: bitsandbytes accepts {list(nf4.ALLOWED_BLOCKSIZES)}")
        if problems:
            raise ConfigError("unsupported 4-bit quantization settings:\n" + bullet_list(problems)
                              + "\nPick values from those lists (the QLoRA default is nf4, blocksize 64).")


def quantization_config(quant_type: str, double_quant: bool, *, compute_dtype: str = "float32",
                        skip_modules: list[str] | None = None) -> dict[str, Any]:
    """The `quantization_config` transformers writes for `BitsAndBytesConfig(load_in_4bit=True, ...)`."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


# ---------------------------------------------------------------------------------------------- export


def bnb_state_dict(params: Mapping, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The HF state dict of a tree whose linear modules hold `qkernel`s, in bitsandbytes' layout.

    Dense leaves are written in `dtype`; adapters must be merged or split off first. Builds every tensor
    at once; `save_bnb_folder` streams the same tensors (`bnb_tensors`)."""
    return dict(bnb_tensors(params, dtype).items())


def bnb_tensors(params: Mapping, dtype: str = "float32") -> Tensors:
    """`bnb_state_dict` as lazy `Tensors`, in module order: each module's tensors (a 4-bit module's codes,
    statistics and quant_state, or a dense module's cast weights) are made only when written."""
    flat = flatten_params(params)
    quantized = {p[:-1]: q for p, q in flat.items() if p[-1] == "qkernel"}
    if not quantized:
        raise ConfigError("these parameters hold no quantized kernels (`qkernel`); quantize them first "
                          "(jaxpeft.quant.quantize_params) or save a dense folder with save_hf_folder.")
    bad = [f"{dotted(m)}: shape {q.shape}, transposed={q.transposed}" for m, q in quantized.items()
           if not nf4.is_4bit_kernel(q)]
    formats = sorted({(q.quant_type, q.double_quant) for q in quantized.values()})
    if bad or len(formats) > 1:
        raise ConfigError(
            "cannot write these quantized kernels as one bitsandbytes checkpoint:\n"
            + bullet_list(bad + ([f"mixed formats (quant_type, double_quant): {formats}"] if len(formats) > 1 else []))
            + "\nbitsandbytes stores (I, O) kernels quantized by quantize_kernel/quantize_params, one "
            "quant_type and double-quant setting per checkpoint.")
    parts = []
    for module, leaves in module_leaves(flat).items():
        dense = {k: v for k, v in leaves.items() if k != "qkernel"}
        if dense:
            parts.append(hf_tensors({module + (k,): v for k, v in dense.items()}, numpy_dtype(dtype)))
        if "qkernel" in leaves:
            q, name = leaves["qkernel"], dotted(module)
            specs = [TensorSpec(k, shape, dt) for k, (shape, dt) in _quant_specs(name, q).items()]
            parts.append(Tensors([(specs, functools.partial(_quant_tensors, name, q))]))
    return Tensors.concat(parts)


def _quant_meta(q: Any) -> bytes:
    """The quant_state JSON of a 4-bit kernel (bitsandbytes' `QuantState.as_dict(packed=True)`), UTF-8."""
    meta: dict[str, Any] = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype_name,
                            "shape": list(q.storage_shape)}
    if q.double_quant:
        meta.update({"nested_blocksize": q.nested_blocksize, "nested_dtype": "float32",
                     "nested_offset": float(np.float32(q.offset))})
    return json.dumps(meta).encode("utf-8")


def _quant_specs(name: str, q: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of each tensor `_quant_tensors` makes, without making the large ones."""
    out = {f"{name}.weight": ((int(np.prod(q.packed.shape)), 1), np.uint8),
           f"{name}.weight.absmax": (tuple(q.absmax.shape), np.uint8 if q.double_quant else np.float32),
           f"{name}.weight.quant_map": ((16,), np.float32)}
    if q.double_quant:
        out[f"{name}.weight.nested_absmax"] = (tuple(q.nested_absmax.shape), np.float32)
        out[f"{name}.weight.nested_quant_map"] = ((256,), np.float32)
    out[name + STATE_TAG + q.quant_type] = ((len(_quant_meta(q)),), np.uint8)
    return out


def _quant_tensors(name: str, q: Any) -> dict[str, np.ndarray]:
    """The bitsandbytes tensors of one 4-bit kernel (`nf4.is_4bit_kernel`) named `name`."""
    out = {f"{name}.weight": np.asarray(q.packed, np.uint8).reshape(-1, 1),
           f"{name}.weight.absmax": np.asarray(q.absmax, np.uint8 if q.double_quant else np.float32),
           f"{name}.weight.quant_map": nf4.CODES[q.quant_type].astype(np.float32)}
    if q.double_quant:
        out[f"{name}.weight.nested_absmax"] = np.asarray(q.nested_absmax, np.float32)
        out[f"{name}.weight.nested_quant_map"] = dynamic8.DYNAMIC_MAP.astype(np.float32)
    out[name + STATE_TAG + q.quant_type] = np.frombuffer(_quant_meta(q), np.uint8).copy()
    return out


def save_bnb_folder(
    out_dir: str | os.PathLike,
    params: Mapping,
    config: LlamaConfig,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Writes an HF folder that `AutoModelForCausalLM.from_pretrained(out_dir)` loads as a bitsandbytes
    4-bit model (needs bitsandbytes on the loading side). Dense tensors are stored in `dtype`; the 4-bit
    matmuls compute in `compute_dtype`; "auto" for either is the base's dtype (`core.dtypes.tree_dtype_name`:
    for a quantized tree, its kernels' dtype before quantization). Tensors are made and written one module
    at a time, into shards with an index past `max_shard_size` (as transformers). Written atomically."""
    auto = dtypes.tree_dtype_name(params)
    dtype, compute_dtype = dtypes.resolve(dtype, auto), dtypes.resolve(compute_dtype, auto)
    # transformers 5.24 fills a 4-bit model's shards in name order (not module order as for a dense model).
    tensors = bnb_tensors(params, dtype).reordered(lambda spec: spec.name)
    flat = flatten_params(params)
    first = next(q for p, q in flat.items() if p[-1] == "qkernel")
    quantized = {dotted(p[:-1]) for p in flat if p[-1] == "qkernel"}
    # transformers converts every nn.Linear not listed here; an explicit list replaces its default (lm_head).
    skip = sorted({dotted(p[:-1]) for p in flat if p[-1] == "kernel"} | ({"lm_head"} - quantized))
    hf_config = {**config.to_hf(), "torch_dtype": dtype, "dtype": dtype,
                 "quantization_config": quantization_config(first.quant_type, first.double_quant,
                                                            compute_dtype=compute_dtype, skip_modules=skip)}
    # transformers counts a 4-bit weight as 2 parameters per stored byte (`num_parameters`).
    total = sum(int(np.prod(v.shape)) for p, v in flat.items() if p[-1] != "qkernel") + sum(
        2 * int(np.prod(q.packed.shape)) for p, q in flat.items() if p[-1] == "qkernel")
    return write_hf_folder(out_dir, tensors, hf_config, tokenizer=tokenizer, overwrite=overwrite,
                           max_shard_size=max_shard_size, total_parameters=total)


# ---------------------------------------------------------------------------------------------- import


def split_quantization_config(hf: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json without `quantization_config`, the validated bitsandbytes 4-bit config or None).

    Only a bitsandbytes 4-bit `quantization_config` is accepted; anything else is one clear error.
    """
    rest = dict(hf)
    qc = rest.pop("quantization_config", None)
    if qc is None:
        return rest, None
    problems = []
    if qc.get("quant_method") != "bitsandbytes":
        problems.append(f"quant_method={qc.get('quant_method')!r} (only 'bitsandbytes' 4-bit checkpoints load)")
    elif qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        problems.append("load_in_8bit=True (LLM.int8 checkpoints are not supported; only 4-bit nf4/fp4)")
    elif not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        problems.append("load_in_4bit is not set (expected a bitsandbytes 4-bit checkpoint)")
    if qc.get("bnb_4bit_quant_type", "fp4") not in nf4.CODES:
        problems.append(f"bnb_4bit_quant_type={qc.get('bnb_4bit_quant_type')!r} (supported: {sorted(nf4.CODES)})")
    if qc.get("bnb_4bit_quant_storage", "uint8") not in ("uint8", None):
        problems.append(f"bnb_4bit_quant_storage={qc['bnb_4bit_quant_storage']!r} (only uint8 storage)")
    if problems:
        raise UnsupportedModelError("this checkpoint's quantization_config is not supported:\n"
                                    + bullet_list(problems) + "\nUse a bitsandbytes 4-bit (nf4/fp4) checkpoint "
                                    "or the original full-precision model.")
    return rest, dict(qc)


def is_bnb_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder/config.json` has a bitsandbytes `quantization_config`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        qc = json.loads(path.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "bitsandbytes"


def bnb_to_params(state: Mapping[str, np.ndarray], config: LlamaConfig, param_dtype: Any = np.float32, *,
                  placement: Placement | None = None, progress: bool = False) -> dict:
    """Converts a bitsandbytes 4-bit HF state dict (a dict, or a lazy `stream.Checkpoint` read one tensor at
    a time) into a tree with `qkernel`s holding its exact bytes; dense tensors stored in `param_dtype`."""
    names = list(state)
    metas = {k.split(STATE_TAG)[0]: k for k in names if STATE_TAG in k}
    bad_type = [f"{k}: quant type {k.split(STATE_TAG)[1]!r}" for k in names
                if STATE_TAG in k and k.split(STATE_TAG)[1] not in nf4.CODES]
    if bad_type:
        raise UnsupportedModelError("this bitsandbytes checkpoint uses 4-bit types jaxpeft does not know:\n"
                                    + bullet_list(bad_type) + f"\nSupported: {sorted(nf4.CODES)}.")
    aux = {f"{m}.weight.{a}" for m in metas for a in _AUX} | set(metas.values())
    dense = [k for k in names if k not in aux and not (k.endswith(".weight") and k[:-7] in metas)
             and not k.endswith("rotary_emb.inv_freq")]
    present = set(dense) | {f"{m}.weight" for m in metas}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")
        dense = [k for k in dense if k != "lm_head.weight"]
    expected = family_of(config.model_type).hf_names(config)
    problems = [f"missing: {n}" for n in sorted(expected - present)]
    problems += [f"unexpected: {n}" for n in sorted(present - expected)]
    if problems:  # before reading any tensor data
        raise CheckpointError("this bitsandbytes checkpoint does not fit its config.json:\n"
                              + bullet_list(problems[:40]) + "\nCheck that the folder is complete and unmodified.")
    placement = placement or Placement()
    flat: dict[tuple[str, ...], Any] = {}
    for module, key in sorted(metas.items()):
        try:
            path = tuple(module.split(".")) + ("qkernel",)
            flat[path] = placement.put(path, _quantized(module, key, state))
        except KeyError as e:
            problems.append(f"{module}: missing tensor or quant_state field {e}")
        except ValueError as e:
            problems.append(f"{module}: {e}")
    if problems:
        raise CheckpointError("this bitsandbytes checkpoint does not fit its config.json:\n"
                              + bullet_list(problems[:40]) + "\nCheck that the folder is complete and unmodified.")
    layout = {name: hf_name_to_path(name, tensor_ndim(state, name)) for name in dense}
    flat.update(flatten_params(load_params(state, layout, param_dtype=param_dtype, placement=placement,
                                           progress=progress, desc="load (dense tensors)")))
    return unflatten_params(flat)


def _quantized(module: str, key: str, state: Mapping[str, np.ndarray]) -> Any:
    """One module's 4-bit kernel from its checkpoint tensors; raises ValueError naming what is wrong."""
    import jax.numpy as jnp

    meta = json.loads(bytes(np.asarray(state[key], np.uint8)).decode("utf-8"))
    quant_type, blocksize, dtype = meta["quant_type"], int(meta["blocksize"]), meta["dtype"]
    out_dim, in_dim = (int(d) for d in meta["shape"])
    nested = "nested_offset" in meta or f"{module}.weight.nested_absmax" in state
    packed = np.asarray(state[f"{module}.weight"])
    absmax = np.asarray(state[f"{module}.weight.absmax"])
    n, k = out_dim * in_dim, -(-out_dim * in_dim // max(blocksize, 1))
    checks = [
        (quant_type == key.split(STATE_TAG)[1], f"quant_type {quant_type!r} disagrees with the key {key!r}"),
        (blocksize in nf4.ALLOWED_BLOCKSIZES, f"blocksize {blocksize} not in {list(nf4.ALLOWED_BLOCKSIZES)}"),
        (dtype in nf4.ALLOWED_DTYPES, f"dtype {dtype!r} not in {list(nf4.ALLOWED_DTYPES)}"),
        (packed.dtype == np.uint8 and packed.size == (n + 1) // 2,
         f"weight {packed.dtype}{list(packed.shape)}, expected uint8 with {(n + 1) // 2} bytes"),
        (absmax.size == k and absmax.dtype == (np.uint8 if nested else np.float32),
         f"absmax {absmax.dtype}[{absmax.size}], expected {'uint8' if nested else 'float32'}[{k}]"),
        (np.array_equal(np.asarray(state[f"{module}.weight.quant_map"]), nf4.CODES.get(quant_type, np.zeros(0))),
         f"quant_map differs from bitsandbytes' {quant_type} table (custom code tables are not supported)"),
    ]
    if nested:
        nested_bs = int(meta["nested_blocksize"])
        nested_absmax = np.asarray(state[f"{module}.weight.nested_absmax"], np.float32)
        checks += [
            (meta.get("nested_dtype") == "float32", f"nested_dtype {meta.get('nested_dtype')!r}, expected 'float32'"),
            (nested_absmax.size == -(-k // nested_bs), f"nested_absmax has {nested_absmax.size} values"),
            (np.array_equal(np.asarray(state[f"{module}.weight.nested_quant_map"]), dynamic8.DYNAMIC_MAP),
             "nested_quant_map differs from bitsandbytes' dynamic map"),
        ]
    failed = [msg for ok, msg in checks if not ok]
    if failed:
        raise ValueError("; ".join(failed))
    return nf4.kernel_from_storage(
        jnp.asarray(packed.reshape(-1, 1)), jnp.asarray(absmax),
        jnp.asarray(nested_absmax) if nested else None,
        jnp.asarray(np.float32(meta["nested_offset"])) if nested else None,
        quant_type=quant_type, blocksize=blocksize, shape=(in_dim, out_dim), dtype_name=dtype,
        nested_blocksize=nested_bs if nested else None)


def load_bnb_folder(folder: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None, remat: bool = False,
                    load_tokenizer: bool = True, placement: Placement | None = None, progress: bool = False):
    """Loads an HF folder quantized by bitsandbytes (4-bit): returns (model, params, tokenizer).

    Quantized linears become `qkernel`s built from the checkpoint's own codes and statistics; dense
    tensors are stored in `param_dtype`, by default ("auto") as the checkpoint stores them; `dtype`, the
    compute dtype, defaults to the checkpoint's `bnb_4bit_compute_dtype`. Read one tensor at a time.
    """
    import jax.numpy as jnp

    folder = Path(folder)
    rest, qc = split_quantization_config(read_config_json(folder))
    if qc is None:
        raise CheckpointError(f"{folder} has no quantization_config in config.json, so it is not a bitsandbytes "
                              "checkpoint; load it with jaxpeft.from_pretrained.")
    config = config_from_hf(rest)
    state = read_hf_weights(folder)
    stored = config_dtype(rest) or getattr(state, "float_dtype", lambda: None)() or "float32"
    param_name = dtypes.resolve(param_dtype, stored)
    compute_name = dtypes.resolve(dtype, qc.get("bnb_4bit_compute_dtype") or param_name)
    params = bnb_to_params(state, config, jnp.dtype(param_name), placement=placement, progress=progress)
    logging.info("loaded a bitsandbytes %s checkpoint from %s (dense tensors %s, computing in %s)",
                 qc.get("bnb_4bit_quant_type"), folder, param_name, compute_name)
    model = build_model(config, dtype=jnp.dtype(compute_name), param_dtype=jnp.dtype(param_name), remat=remat)
    return model, params, load_tokenizer_from(folder) if load_tokenizer else None


# ---------------------------------------------------------------------------------------------- summary


def quantization_summary(params: Mapping) -> dict[str, Any]:
    """The 4-bit settings found in a tree and the base's bytes: quantized as held vs all in fp32."""
    qs = [q for p, q in flatten_params(params).items() if p[-1] == "qkernel"]
    held, fp32 = nf4.param_bytes(params), 4 * count(params)
    return {"quant_type": sorted({q.quant_type for q in qs}), "blocksize": sorted({q.blocksize for q in qs}),
            "double_quant": sorted({q.double_quant for q in qs}), "quantized_modules": len(qs),
            "base_param_bytes": {"quantized": held, "float32": fp32, "ratio": round(held / fp32, 4)}}
