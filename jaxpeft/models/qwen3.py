"""Qwen3 (dense): a Llama-family decoder with a per-head RMSNorm on q and k before RoPE.

What differs from Llama, and where it is honoured:
- `q_norm` / `k_norm` (E,) in every attention block (`LlamaConfig.qk_norm`, read by `llama.Attention`);
- `head_dim` independent of hidden / heads (already a Llama config field);
- biases on q, k, v *and* o when `attention_bias` (Qwen2 has them on q/k/v only);
- optional sliding-window layers: `use_sliding_window` with `layer_types` (or, in older files,
  `max_window_layers`: layers from that index on slide), honoured per layer through
  `LlamaConfig.layer_windows` and `causal_lm.layer_masks`.
The module is `llama.LlamaForCausalLM`; this file is only the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.models import config as llama_config
from jaxpeft.models.config import LlamaConfig

ARCHITECTURE = "Qwen3ForCausalLM"
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3Config(LlamaConfig):
    """Shapes and options of a Qwen3 dense decoder (the Llama fields, q/k norms on, per-layer windows)."""

    qk_norm: bool = True
    model_type: str = "qwen3"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Qwen3Config":
        """Builds a config from a Qwen3 `config.json` dict; raises one error listing every unsupported field."""
        problems: list[str] = []
        if hf.get("model_type") != "qwen3":
            raise UnsupportedModelError(f"Qwen3Config reads model_type 'qwen3', got {hf.get('model_type')!r}")
        bad_archs = [a for a in hf.get("architectures") or [] if a != ARCHITECTURE]
        if bad_archs:
            problems.append(f"architectures={bad_archs} (expected [{ARCHITECTURE!r}])")
        known = llama_config._HARMLESS | llama_config._ROPE_KEYS | llama_config._MODEL_KEYS
        problems += [f"{k}={hf[k]!r} (unknown field)" for k in sorted(set(hf) - known)]
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is implemented)")
        for key in ("mlp_bias", "partial_rotary_factor", "pretraining_tp"):
            if key in hf and hf[key] not in (False, 1, 1.0, None):
                problems.append(f"{key}={hf[key]!r} (not part of Qwen3)")
        rope_type, theta, params = llama_config._parse_rope(hf, problems)
        n = int(hf["num_hidden_layers"])
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        layer_types = hf.get("layer_types")
        if layer_types is None:  # transformers' own default (Qwen3Config.__post_init__)
            start = int(hf.get("max_window_layers", n))
            layer_types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                           for i in range(n)]
        odd = sorted(set(layer_types) - set(_LAYER_TYPES))
        if odd or len(layer_types) != n:
            problems.append(f"layer_types={layer_types!r} (need {n} entries from {list(_LAYER_TYPES)})")
        if "sliding_attention" in layer_types and not window:
            problems.append("layer_types has sliding_attention layers but no sliding_window is set")
        llama_config.raise_unsupported("qwen3", problems)
        heads = int(hf["num_attention_heads"])
        bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        sliding = "sliding_attention" in layer_types
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type,
            rope_params=tuple(sorted(params.items())),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias, o_proj_bias=bias,
            sliding_window=int(window) if sliding else None,
            layer_types=tuple(layer_types) if sliding else (),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))

    def to_hf(self) -> dict[str, Any]:
        """The Qwen3 `config.json` dict that transformers loads into the same model."""
        windows = self.layer_windows()
        return {"architectures": [ARCHITECTURE], "model_type": "qwen3", **self.shared_hf(),
                "attention_bias": self.attention_bias, "use_sliding_window": self.sliding_window is not None,
                "sliding_window": self.sliding_window,
                "layer_types": ["sliding_attention" if w else "full_attention" for w in windows],
                "max_window_layers": self.num_hidden_layers}
