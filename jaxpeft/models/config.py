"""Llama-family model configuration, read from a Hugging Face `config.json` with an allowlist.

Every field of the HF config is either understood (and honoured), known to be harmless, or
unsupported; unsupported fields and values are collected and reported in one `UnsupportedModelError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from jaxpeft.core.errors import UnsupportedModelError, bullet_list

# The HF model types this config class reads (each with its own rules in `from_hf`), and the class name
# `to_hf` writes for each. Which module runs them, and their layers' parts, is `models.families`.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Keys every PretrainedConfig carries, or that only matter to torch (no effect on the maths here).
_HARMLESS = {
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
    "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "transformers_version", "initializer_range", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "model_type", "tie_word_embeddings", "max_window_layers",
    "layer_types", "torchscript", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "tf_legacy_loss", "use_bfloat16", "pruned_heads",
    "add_cross_attention", "is_decoder", "cross_attention_hidden_size", "tie_encoder_decoder",
    "output_scores", "return_dict_in_generate", "_attn_implementation_autoset", "_attn_implementation",
    "keys_to_ignore_at_inference",
}
_ROPE_KEYS = {"rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor"}
_MODEL_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
    "attention_bias", "mlp_bias", "attention_dropout", "pretraining_tp", "sliding_window",
    "use_sliding_window",
}
_ROPE_TYPES = {"default", "linear", "dynamic", "llama3"}


def raise_unsupported(model_type: str, problems: list[str]) -> None:
    """The one error for a config's unsupported fields and values (every family's `from_hf`); none: returns."""
    if problems:
        raise UnsupportedModelError(
            f"this {model_type} config has fields jaxpeft does not support:\n{bullet_list(problems)}\n"
            "Remove or change them in config.json if they are not needed, or use a supported model.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and options of a Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Scaling parameters of the rope type, as a sorted tuple of (name, value) so the config stays hashable.
    rope_params: tuple[tuple[str, float], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v (Qwen2; Llama's attention_bias)
    o_proj_bias: bool = False  # bias on o_proj too (Llama's attention_bias; Qwen2 has none)
    sliding_window: int | None = None
    # Per-layer attention kinds ("full_attention" / "sliding_attention"), repeated when shorter than the layers;
    # empty: every layer uses `sliding_window` (None: full attention). Families with mixed layers set it.
    layer_types: tuple[str, ...] = ()
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_windows(self) -> tuple[int | None, ...]:
        """The attention window of each layer (None: full attention)."""
        n = self.num_hidden_layers
        if not self.layer_types:
            return (self.sliding_window,) * n
        kinds = [self.layer_types[i % len(self.layer_types)] for i in range(n)]
        return tuple(self.sliding_window if k == "sliding_attention" else None for k in kinds)

    def generation_recompute_length(self) -> int | None:
        """A sequence length at which generation recomputes the whole KV cache once (as transformers' Phi-3
        generate does when LongRoPE switches factors); None: never."""
        return None

    def rope(self) -> dict[str, float]:
        return dict(self.rope_params)

    def base_inv_freq(self) -> np.ndarray:
        """Inverse frequencies (float32, [head_dim // 2]) before any sequence-length dependent scaling."""
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        p = self.rope()
        if self.rope_type == "linear":
            inv_freq = inv_freq / np.float32(p["factor"])
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, p)
        return inv_freq.astype(np.float32)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        """Builds a config from an HF `config.json` dict; raises one error listing every unsupported field."""
        problems: list[str] = []
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; jaxpeft supports {sorted(ARCHITECTURES)} "
                "(Llama-family decoders). Use a checkpoint of one of those architectures."
            )
        archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
        bad_archs = [a for a in archs if a != ARCHITECTURES[model_type]]
        if bad_archs:
            problems.append(f"architectures={bad_archs} (expected [{ARCHITECTURES[model_type]!r}])")
        unknown = sorted(set(hf) - _HARMLESS - _ROPE_KEYS - _MODEL_KEYS)
        for key in unknown:
            problems.append(f"{key}={hf[key]!r} (unknown field)")
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is implemented)")
        if hf.get("mlp_bias", False):
            problems.append("mlp_bias=True (MLP biases are not implemented)")
        if hf.get("pretraining_tp", 1) != 1:
            problems.append(f"pretraining_tp={hf['pretraining_tp']} (only 1 is implemented)")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            problems.append(f"partial_rotary_factor={hf['partial_rotary_factor']} (only 1.0)")

        rope_type, theta, params = _parse_rope(hf, problems)
        attention_bias = bool(hf.get("attention_bias", False)) or model_type == "qwen2"
        if model_type == "mistral" and attention_bias:
            problems.append("attention_bias=True (Mistral has no attention biases)")
        sliding = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        raise_unsupported(model_type, problems)
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_params=tuple(sorted(params.items())),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias and model_type == "llama",
            sliding_window=int(sliding) if sliding else None,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that transformers loads into the same model."""
        out = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
               **self.shared_hf()}
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        else:
            out["attention_bias"] = self.attention_bias or self.o_proj_bias
            out["mlp_bias"] = False
            if self.model_type == "mistral":
                out["sliding_window"] = self.sliding_window
        return out

    def shared_hf(self) -> dict[str, Any]:
        """The `config.json` fields every Llama-like family writes alike (shapes, norms, RoPE, tokens)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope()}
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_type == "default" else rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


def _parse_rope(hf: Mapping[str, Any], problems: list[str]) -> tuple[str, float, dict[str, float]]:
    """Reads rope theta and scaling from either the transformers-5 `rope_parameters` or the older keys."""
    rp = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **rp}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        problems.append(f"rope type {rope_type!r} (supported: {sorted(_ROPE_TYPES)})")
        return "default", theta, {}
    needed = {
        "default": (),
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }[rope_type]
    missing = [k for k in needed if k not in merged]
    if missing:
        problems.append(f"rope type {rope_type!r} lacks {missing}")
    params = {k: float(merged[k]) for k in needed if k in merged}
    if float(merged.get("attention_factor") or 1.0) != 1.0:
        problems.append(f"rope attention_factor={merged['attention_factor']} (only 1.0)")
    return rope_type, theta, params


def _llama3_inv_freq(inv_freq: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
