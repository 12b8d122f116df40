"""Reads GGUF files (llama.cpp's format) of the Llama, Qwen3, Gemma 2, Gemma 3 and Phi-3 architectures into HF
names and a plain HF folder.

The weights come back dequantized to float32 in torch layout `[out, in]`, with what llama.cpp's converter
changed undone (the Llama q/k row permutation; Gemma's RMSNorm weights, stored as 1 + w), so they are
exactly what transformers' own GGUF loader produces. Which GGUF architecture is read as which family, and the
tensor names, come from the family table (`models.families`); what each architecture stores in its metadata
(and what it leaves to llama.cpp's defaults) is `_ARCHS` below.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable

import numpy as np
from absl import logging

from jaxpeft.convert.shards import DEFAULT_MAX_SHARD_SIZE, TensorSpec, Tensors, save_shards
from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import (
    CheckpointError,
    MissingDependencyError,
    UnsupportedModelError,
    bullet_list,
)
from jaxpeft.models.families import gguf_family

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# Metadata whose presence means a variant this reader would silently get wrong (the sliding window only
# where the architecture has none here; `_Arch.window`).
_UNSUPPORTED_KEYS = ("expert_count", "attention.sliding_window", "attention.key_length_mla")


@dataclasses.dataclass(frozen=True)
class _Arch:
    """What one GGUF architecture's files hold beyond the shared fields.

    permute_qk: llama.cpp's Llama converter permutes the q/k rows (its Qwen, Gemma and Phi-3 converters do
    not). norm_offset: added to every RMSNorm weight on the way in (Gemma's `(1 + w)` norms: llama.cpp stores
    1 + w, transformers' GGUF loader subtracts 1 again). window: `attention.sliding_window` is read. extra:
    (reader, arch, config so far) -> the architecture's own config.json fields. tensors: extra global tensors
    the architecture may carry and what they become (read by `extra`, not loaded as weights)."""

    extra: Callable[[Any, str, dict], dict]
    permute_qk: bool = False
    norm_offset: float = 0.0
    window: bool = False
    tensors: tuple[str, ...] = ()


def _llama_fields(reader: Any, arch: str, base: dict) -> dict:
    return {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _qwen3_fields(reader: Any, arch: str, base: dict) -> dict:
    return {"hidden_act": "silu", "attention_bias": False}


def _gemma_fields(reader: Any, arch: str, base: dict) -> dict:
    """Gemma 2 / 3: soft-caps from the file or transformers' defaults; the query scale llama.cpp applies (its
    files do not store query_pre_attn_scalar: head_dim, but hidden / heads for the 27B shapes, as llama.cpp
    keys it on the model size); Gemma 3's sliding layers rotate with base 10,000 (llama.cpp's fixed value)."""
    gemma2 = arch == "gemma2"
    hidden, heads = base["hidden_size"], base["num_attention_heads"]
    is_27b = (hidden, base["num_hidden_layers"]) in ((4608, 46), (5376, 62))
    out = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
           "query_pre_attn_scalar": hidden // heads if is_27b else base["head_dim"],
           "attn_logit_softcapping": _field(reader, f"{arch}.attn_logit_softcapping", 50.0 if gemma2 else None),
           "final_logit_softcapping": _field(reader, f"{arch}.final_logit_softcapping", 30.0 if gemma2 else None)}
    if not gemma2:
        out["rope_local_base_freq"] = _field(reader, f"{arch}.rope.freq_base_swa", 10000.0)
    # Which layers slide: a period (every n-th layer full) or one flag per layer (True: sliding); without the
    # key, the family's own pattern (Gemma 2 alternates, Gemma 3 has five sliding layers, then a full one).
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern is not None:
        every = int(pattern)
        out["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                              for i in range(base["num_hidden_layers"])]
    return out


def _phi3_fields(reader: Any, arch: str, base: dict) -> dict:
    """Phi-3: the rotary width (`rope.dimension_count`) as partial_rotary_factor; LongRoPE from the
    rope_factors_short / rope_factors_long tensors and the original context length."""
    head_dim = base["head_dim"]
    rotary = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    out: dict[str, Any] = {"hidden_act": "silu", "partial_rotary_factor": rotary / head_dim}
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
    if factors:
        if len(factors) != 2:
            raise UnsupportedModelError(f"GGUF Phi-3 file has {sorted(factors)} but LongRoPE needs both "
                                        "rope_factors_short.weight and rope_factors_long.weight")
        gguf = _import_gguf()
        short, long = (_dequantize(gguf, factors[f"rope_factors_{k}.weight"]).reshape(-1).tolist()
                       for k in ("short", "long"))
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is None:
            raise UnsupportedModelError(f"GGUF Phi-3 file has LongRoPE factors but no {arch}.rope.scaling."
                                        "original_context_length; it cannot be read as a LongRoPE model")
        rope = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                "rope_theta": base["rope_theta"], "partial_rotary_factor": rotary / head_dim}
        attn_factor = _field(reader, f"{arch}.rope.scaling.attn_factor")
        if attn_factor is not None:
            rope["attention_factor"] = attn_factor
        out.update(rope_parameters=rope, original_max_position_embeddings=original)
    return out


_ARCHS = {
    "llama": _Arch(_llama_fields, permute_qk=True),
    "qwen3": _Arch(_qwen3_fields),
    "gemma2": _Arch(_gemma_fields, norm_offset=-1.0, window=True),
    "gemma3": _Arch(_gemma_fields, norm_offset=-1.0, window=True),
    "phi3": _Arch(_phi3_fields, window=True, tensors=("rope_factors_short.weight", "rope_factors_long.weight")),
}


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise MissingDependencyError(
            "Reading GGUF files needs the `gguf` package, which is not installed.\n"
            "Fix: pip install gguf"
        ) from e
    return gguf


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation (HF rotate-half order -> GGUF interleaved pairs).

    llama.cpp's `convert_hf_to_gguf.py` does `w.reshape(n_head, 2, d // n_head // 2, *rest)
    .swapaxes(1, 2)`; this is the exact inverse. `n_head` is the head count of this projection
    (num_key_value_heads for k_proj).
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise UnsupportedModelError(
            f"q/k projection has {rows} rows, not a multiple of 2 x {n_head} heads; "
            "the GGUF file's head counts do not match its tensors."
        )
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, (np.floating, float)):
        # GGUF stores float32: take its shortest decimal form so 1e-5 stays 1e-05, not 9.99999974e-06.
        return float(str(np.float32(value)))
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def _dequantize(gguf: Any, tensor: Any) -> np.ndarray:
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    data = np.asarray(tensor.data)
    if qtype.name in ("F32", "F16", "F64"):
        out = data.astype(np.float32)
    else:
        try:
            out = gguf.quants.dequantize(data, qtype)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"GGUF tensor {tensor.name!r} uses quantization {qtype.name}, which the installed "
                f"gguf package cannot dequantize.\nFix: pip install -U gguf, or re-export the model "
                "with a common type (F16, Q8_0, Q4_K_M)."
            ) from e
    return np.ascontiguousarray(out.reshape(shape), dtype=np.float32)


def _rope_scaling(reader: Any, arch: str, ctx: int) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind is None and (linear := _field(reader, f"{arch}.rope.scale_linear")) not in (None, 1.0):
        kind, factor = "linear", linear
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = _field(reader, f"{arch}.rope.scaling.original_context_length", ctx)
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original}
    raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported (linear, yarn are).")


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a GGUF file into an HF `config.json` dict and a float32 state dict.

    The state dict uses the family's HF parameter names, torch layout `[out, in]`, quantized
    tensors dequantized, q/k rows restored to HF order; `lm_head.weight` is present only for
    untied models. Raises UnsupportedModelError for other architectures or unknown tensors.
    Dequantizes everything at once; `open_gguf` gives the same tensors one at a time.
    """
    config, tensors = open_gguf(path)
    return config, dict(tensors.items())


def open_gguf(path: str) -> tuple[dict, Tensors]:
    """`read_gguf` without reading: the config, and the tensors (float32, HF names, in the file's order) as
    lazy `Tensors`, each dequantized (and q/k unpermuted) only when asked for, from the memory-mapped file.
    Every check (architecture, unknown or missing tensors) runs here, before any tensor is dequantized.
    """
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e

    arch = _field(reader, "general.architecture")
    try:
        family = gguf_family(arch)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e
    global_names, layer_names = family.gguf_names()
    spec = _ARCHS[arch]
    # llama.cpp's Llama converter permutes the rows of q and k (by query heads and kv heads).
    permuted = {f"{m.gguf}.weight": m.short for m in family.linears
                if spec.permute_qk and m.short in ("q_proj", "k_proj")}
    norms = {f"{n.gguf}.weight" for n in family.norms} | {"output_norm.weight"}
    unsupported = [k for k in _UNSUPPORTED_KEYS if not (spec.window and k == "attention.sliding_window")]
    present = [f"{arch}.{k}" for k in unsupported if f"{arch}.{k}" in reader.fields]
    if present:
        raise UnsupportedModelError(f"GGUF metadata names features this reader lacks:\n{bullet_list(present)}")

    hidden = _field(reader, f"{arch}.embedding_length")
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    n_layers = _field(reader, f"{arch}.block_count")
    # Phi-3's rope.dimension_count is the rotary width, a part of the head (partial_rotary_factor).
    head_dim = _field(reader, f"{arch}.attention.key_length") or (
        hidden // n_head if arch == "phi3" else _field(reader, f"{arch}.rope.dimension_count", hidden // n_head))
    ctx = _field(reader, f"{arch}.context_length", 2048)

    groups = []
    shapes: dict[str, tuple[int, ...]] = {}
    unknown: list[str] = []
    for tensor in reader.tensors:
        name = tensor.name
        match = _LAYER_RE.match(name)
        if name in spec.tensors:
            continue  # metadata stored as a tensor (Phi-3's LongRoPE factors): read into the config
        if name in global_names:
            hf_name = global_names[name]
        elif match and match.group(2) in layer_names and int(match.group(1)) < n_layers:
            hf_name = f"{family.layer_prefix(int(match.group(1)))}.{layer_names[match.group(2)]}"
        else:
            unknown.append(f"{name} ({tensor.tensor_type.name}, shape {tensor.shape.tolist()})")
            continue
        heads = None
        if match and match.group(2) in permuted:
            heads = n_head if permuted[match.group(2)] == "q_proj" else n_kv
        offset = spec.norm_offset if (match.group(2) if match else name) in norms else 0.0
        shapes[hf_name] = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        groups.append(([TensorSpec(hf_name, shapes[hf_name], np.float32)],
                       functools.partial(_hf_tensor, gguf, tensor, hf_name, heads, offset)))
    if unknown:
        # rope_freqs.weight (Llama 3.1 rope scaling) and biases land here on purpose.
        raise UnsupportedModelError(
            f"GGUF file {path} has tensors this {arch} reader does not map:\n{bullet_list(unknown)}"
        )

    expected = {f"{family.embed}.weight", f"{family.final_norm}.weight"} | {
        f"{family.layer_prefix(i)}.{v}" for i in range(n_layers) for v in layer_names.values()
    }
    missing = sorted(expected - shapes.keys())
    if missing:
        raise CheckpointError(f"GGUF file {path} lacks tensors:\n{bullet_list(missing)}")

    window = _field(reader, f"{arch}.attention.sliding_window") if spec.window else None
    config: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(reader, arch, ctx),
        "max_position_embeddings": ctx,
        # The embedding's row count is the truth; the metadata key is optional in older files.
        "vocab_size": int(shapes[f"{family.embed}.weight"][0]),
        "tie_word_embeddings": f"{family.head}.weight" not in shapes,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if window is not None:
        config["sliding_window"] = int(window)
    config.update(spec.extra(reader, arch, config))
    if config.get("rope_parameters"):  # LongRoPE: the rope fields live in rope_parameters
        config.pop("rope_scaling")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = pad
    return config, Tensors(groups)


def _hf_tensor(gguf: Any, tensor: Any, hf_name: str, heads: int | None, offset: float = 0.0) -> dict[str, np.ndarray]:
    """One GGUF tensor dequantized to float32 (q/k rows unpermuted when `heads` is set, `offset` added: Gemma's
    norms), by its HF name."""
    weight = _dequantize(gguf, tensor)
    if offset:
        weight = weight + np.float32(offset)
    return {hf_name: weight if heads is None else unpermute_qk(weight, heads)}


def gguf_to_hf_folder(gguf_path: str, out_dir: str, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Converts a GGUF file (any architecture of `_ARCHS`) into a plain fp32 HF folder at `out_dir`, atomically.

    Writes config.json, model.safetensors (or shards with an index past `max_shard_size`),
    generation_config.json and the tokenizer files (with the chat template), dequantizing and writing one
    tensor at a time, so the fp32 model never exists whole. `out_dir` must not exist yet. Returns `out_dir`.
    """
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            "Converting GGUF to an HF folder needs `transformers` for the tokenizer.\n"
            "Fix: pip install transformers"
        ) from e

    config, tensors = open_gguf(gguf_path)
    logging.info("read %s: %d tensors, %d layers", gguf_path, len(tensors.specs), config["num_hidden_layers"])
    directory, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # The GGUF tokenizer comes back with an "infinite" max length; the model's context is the truth.
    tokenizer.model_max_length = config["max_position_embeddings"]

    with atomic_dir(out_dir) as tmp:
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        # One tensor dequantized at a time; shards past `max_shard_size` (DEFAULT_MAX_SHARD_SIZE, 5GB).
        save_shards(tmp, tensors, max_shard_size=max_shard_size)
        gen = {
            key: config[key]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(key) is not None
        }
        transformers.GenerationConfig(**gen).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out_dir
