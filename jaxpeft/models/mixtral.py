"""Mixtral (`MixtralForCausalLM`): Mistral's attention (GQA, optional sliding window on every layer) and on every
layer a top-k softmax router over `num_local_experts` SwiGLU experts of width `intermediate_size`, the top-k
weights always renormalised and kept in fp32 (transformers 5.24's `MixtralTopKRouter`). The module is
`moe.MoeForCausalLM`; this file is the config and the expert names of checkpoint files.

transformers 5.24 holds the experts fused (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj`
(E, H, I), router `mlp.gate.weight`) but its `save_pretrained` writes, as the Hub's files are, the legacy names
below (`block_sparse_moe.experts.<e>.w1` gate, `w3` up, `w2` down); both are read, the legacy ones written.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.models import config as llama_config
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.moe import MoeFields

ARCHITECTURE = "MixtralForCausalLM"
_MOE_KEYS = {"num_local_experts", "num_experts", "num_experts_per_tok", "output_router_logits",
             "router_aux_loss_coef", "router_jitter_noise"}
# Checkpoint-file names inside `model.layers.<i>`: (router, {expert part: name with {e}}), part in gate/up/down.
FILE_ROUTER = "block_sparse_moe.gate"
FILE_EXPERTS = {"gate": "block_sparse_moe.experts.{e}.w1", "up": "block_sparse_moe.experts.{e}.w3",
                "down": "block_sparse_moe.experts.{e}.w2"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtralConfig(MoeFields, LlamaConfig):
    """Shapes and options of a Mixtral decoder (the Llama fields, the MoE fields)."""

    model_type: str = "mixtral"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "MixtralConfig":
        """Builds a config from a Mixtral `config.json` dict; raises one error listing every unsupported field."""
        if hf.get("model_type") != "mixtral":
            raise UnsupportedModelError(f"MixtralConfig reads model_type 'mixtral', got {hf.get('model_type')!r}")
        problems: list[str] = []
        bad_archs = [a for a in hf.get("architectures") or [] if a != ARCHITECTURE]
        if bad_archs:
            problems.append(f"architectures={bad_archs} (expected [{ARCHITECTURE!r}])")
        known = llama_config._HARMLESS | llama_config._ROPE_KEYS | llama_config._MODEL_KEYS | _MOE_KEYS
        problems += [f"{k}={hf[k]!r} (unknown field)" for k in sorted(set(hf) - known)]
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is implemented)")
        if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
            problems.append(f"router_jitter_noise={hf['router_jitter_noise']} (router jitter is not implemented)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                problems.append(f"{key}={hf[key]!r} (Mixtral has no biases)")
        rope_type, theta, params = llama_config._parse_rope(hf, problems)
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id")
        window = hf.get("sliding_window")
        config = cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=theta, rope_type=rope_type,
            rope_params=tuple(sorted(params.items())),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096 * 32)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            num_experts=int(hf.get("num_local_experts", hf.get("num_experts", 8))),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
            moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            output_router_logits=bool(hf.get("output_router_logits", False)))
        llama_config.raise_unsupported("mixtral", problems + config.moe_problems())
        return config

    def to_hf(self) -> dict[str, Any]:
        """The Mixtral `config.json` dict that transformers loads into the same model."""
        return {"architectures": [ARCHITECTURE], "model_type": "mixtral", **self.shared_hf(),
                "sliding_window": self.sliding_window, "num_local_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok, "router_aux_loss_coef": self.router_aux_loss_coef,
                "output_router_logits": self.output_router_logits, "router_jitter_noise": 0.0}
