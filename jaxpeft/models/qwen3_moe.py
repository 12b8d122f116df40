"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (q/k norms, free head_dim, optional biases, one sliding
window on every layer when `use_sliding_window`) and a top-k router over `num_experts` experts of width
`moe_intermediate_size` on the sparse layers (`decoder_sparse_step`, `mlp_only_layers`; the others keep a dense
SwiGLU of `intermediate_size`). The top-k weights are renormalised only with `norm_topk_prob` and cast to the
compute dtype (transformers 5.24's `Qwen3MoeTopKRouter`). The module is `moe.MoeForCausalLM`; this file is the
config and the checkpoint files' expert names (`mlp.experts.<e>.{gate,up,down}_proj`, what `save_pretrained`
writes; the fused `mlp.experts.gate_up_proj` / `down_proj` of a loaded transformers model are read too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.models import config as llama_config
from jaxpeft.models.moe import MoeFields
from jaxpeft.models.qwen3 import Qwen3Config

ARCHITECTURE = "Qwen3MoeForCausalLM"
_MOE_KEYS = {"num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
             "decoder_sparse_step", "mlp_only_layers", "output_router_logits", "router_aux_loss_coef"}
FILE_ROUTER = "mlp.gate"
FILE_EXPERTS = {"gate": "mlp.experts.{e}.gate_proj", "up": "mlp.experts.{e}.up_proj",
                "down": "mlp.experts.{e}.down_proj"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(MoeFields, Qwen3Config):
    """Shapes and options of a Qwen3-MoE decoder (Qwen3's fields, the MoE fields)."""

    model_type: str = "qwen3_moe"
    router_weights_in_compute_dtype: bool = True

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Qwen3MoeConfig":
        """Builds a config from a Qwen3-MoE `config.json`; one error lists every unsupported field. The attention
        fields are read by Qwen3's rules (every layer slides when `use_sliding_window`, as transformers' MoE)."""
        if hf.get("model_type") != "qwen3_moe":
            raise UnsupportedModelError(f"Qwen3MoeConfig reads model_type 'qwen3_moe', got {hf.get('model_type')!r}")
        problems: list[str] = []
        bad_archs = [a for a in hf.get("architectures") or [] if a != ARCHITECTURE]
        if bad_archs:
            problems.append(f"architectures={bad_archs} (expected [{ARCHITECTURE!r}])")
        n = int(hf["num_hidden_layers"])
        dense = {k: v for k, v in hf.items() if k not in _MOE_KEYS and k != "architectures"}
        sliding = bool(hf.get("use_sliding_window", False)) and hf.get("sliding_window")
        dense.update(model_type="qwen3", layer_types=["sliding_attention" if sliding else "full_attention"] * n)
        dense.pop("max_window_layers", None)
        llama_config.raise_unsupported("qwen3_moe", problems)
        try:
            base = Qwen3Config.from_hf(dense)
        except UnsupportedModelError as e:  # the same fields, reported under this model type
            raise UnsupportedModelError(str(e).replace("this qwen3 config", "this qwen3_moe config")) from None
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        fields.update(
            model_type="qwen3_moe",
            num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 128))),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
            moe_intermediate_size=int(hf.get("moe_intermediate_size", 768)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            output_router_logits=bool(hf.get("output_router_logits", False)))
        config = cls(**fields)
        llama_config.raise_unsupported("qwen3_moe", config.moe_problems())
        return config

    def to_hf(self) -> dict[str, Any]:
        """The Qwen3-MoE `config.json` dict that transformers loads into the same model."""
        return {"architectures": [ARCHITECTURE], "model_type": "qwen3_moe", **self.shared_hf(),
                "attention_bias": self.attention_bias, "use_sliding_window": self.sliding_window is not None,
                "sliding_window": self.sliding_window, "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok, "moe_intermediate_size": self.moe_intermediate_size,
                "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": self.decoder_sparse_step,
                "mlp_only_layers": list(self.mlp_only_layers), "router_aux_loss_coef": self.router_aux_loss_coef,
                "output_router_logits": self.output_router_logits}
