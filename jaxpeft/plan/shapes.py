"""Model shapes for the memory planner: the presets, HF `config.json` folders, and the article's table.

A plan needs shapes only, so a model is its family's config (no weights are read). The presets are the
published configurations: Llama-2 (vocab 32000, untied embeddings, SwiGLU; 70B uses grouped-query
attention with 8 kv heads and intermediate size 28672), Llama-3 8B/70B, Qwen3-8B, Gemma-2-9B, Gemma-3-12B (text),
Phi-3-mini-4k, and the MoE models Mixtral-8x7B-v0.1 (8 experts, top-2) and Qwen3-30B-A3B (128 experts, top-8)
(tests/test_families.py checks each preset's parameter count against transformers').
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from jaxpeft.core.errors import CheckpointError, ConfigError
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import config_from_hf, family_of
from jaxpeft.models.gemma import GemmaConfig
from jaxpeft.models.mixtral import MixtralConfig
from jaxpeft.models.phi3 import Phi3Config
from jaxpeft.models.qwen3 import Qwen3Config
from jaxpeft.models.qwen3_moe import Qwen3MoeConfig


def _llama2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=4096)


def _llama3(hidden: int, layers: int, heads: int) -> LlamaConfig:
    """Meta-Llama-3-8B / -70B: vocab 128256, 8 kv heads, RoPE theta 500000, context 8192."""
    return LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size={4096: 14336, 8192: 28672}[hidden],
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                       head_dim=hidden // heads, rope_theta=500000.0, max_position_embeddings=8192)


def _qwen3_8b() -> LlamaConfig:
    """Qwen/Qwen3-8B: head_dim 128 with 32 heads over hidden 4096, 8 kv heads, untied, q/k norms."""
    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=40960)


def _gemma(model_type: str, **kw) -> LlamaConfig:
    n = kw["num_hidden_layers"]
    every = 2 if model_type == "gemma2" else 6  # Gemma 2 alternates; Gemma 3 has 5 sliding layers, then 1 full
    kinds = tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(n))
    return GemmaConfig(model_type=model_type, num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6,
                       query_pre_attn_scalar=256.0, qk_norm=model_type == "gemma3_text", layer_types=kinds, **kw)


def _phi3_mini() -> LlamaConfig:
    """microsoft/Phi-3-mini-4k-instruct: fused qkv_proj / gate_up_proj, 32 heads of 96, window 2047."""
    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=96, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, sliding_window=2047)


def _mixtral_8x7b() -> LlamaConfig:
    """mistralai/Mixtral-8x7B-v0.1: Mistral's attention (8 kv heads), 8 experts of width 14336, top-2."""
    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                         max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=14336, norm_topk_prob=True)


def _qwen3_30b_a3b() -> LlamaConfig:
    """Qwen/Qwen3-30B-A3B: Qwen3's attention (head_dim 128, 4 kv heads), 128 experts of width 768, top-8; every
    layer sparse (decoder_sparse_step 1, no mlp_only_layers), untied."""
    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          router_weights_in_compute_dtype=True)


PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": _llama2(4096, 11008, 32, 32, 32),
    "llama-13b": _llama2(5120, 13824, 40, 40, 40),
    "llama-70b": _llama2(8192, 28672, 80, 64, 8),
    "llama-3-8b": _llama3(4096, 32, 32),
    "llama-3-70b": _llama3(8192, 80, 64),
    "qwen3-8b": _qwen3_8b(),
    # google/gemma-2-9b; google/gemma-3-12b-pt's language model (the vision tower is not planned).
    "gemma-2-9b": _gemma("gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                         num_attention_heads=16, sliding_window=4096, attn_logit_softcapping=50.0,
                         final_logit_softcapping=30.0, max_position_embeddings=8192),
    "gemma-3-12b": _gemma("gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                          num_hidden_layers=48, num_attention_heads=16, sliding_window=1024, rope_theta=1000000.0,
                          rope_type="linear", rope_params=(("factor", 8.0),), max_position_embeddings=131072),
    "phi-3-mini": _phi3_mini(),
    "mixtral-8x7b": _mixtral_8x7b(),
    "qwen3-30b-a3b": _qwen3_30b_a3b(),
}

# The seed article's memory table (REFERENCE.md), in GB; None where the article gives no figure.
ARTICLE_GB: dict[str, dict[str, float | None]] = {
    "llama-7b": {"full": 56.0, "lora": 16.0, "qlora": 6.0},
    "llama-13b": {"full": 104.0, "lora": None, "qlora": None},
    "llama-70b": {"full": 560.0, "lora": 160.0, "qlora": 48.0},
}


_REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


class LinearShape(NamedTuple):
    """One linear module: its dotted HF name, in and out features, and whether it has a bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool


def layer_linears(config: LlamaConfig, layer: int) -> list[LinearShape]:
    """The linear modules of decoder layer `layer` (from the family table), named as in the parameter tree; on an
    MoE model's sparse layers the router replaces the dense MLP's linears (the experts are `layer_experts`)."""
    family = family_of(config.model_type)
    prefix = family.layer_prefix(layer)
    return [LinearShape(f"{prefix}.{m.name}", *m.shape(config), m.has_bias(config))
            for m in family.layer_linears(config, layer)]


class ExpertShape(NamedTuple):
    """One fused expert stack (`models/moe.py`): its dotted name, experts, and each expert's in and out features."""

    name: str
    experts: int
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.experts * self.in_features * self.out_features


def layer_experts(config: LlamaConfig, layer: int) -> list[ExpertShape]:
    """The expert stacks of decoder layer `layer`: gate_up (E, 2I, H) and down (E, H, I) on an MoE model's sparse
    layers, none elsewhere."""
    family = family_of(config.model_type)
    if family.experts is None or not config.is_sparse_layer(layer):
        return []
    e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    prefix = f"{family.layer_prefix(layer)}.{family.experts.experts}"
    return [ExpertShape(f"{prefix}.gate_up_proj", e, h, 2 * i), ExpertShape(f"{prefix}.down_proj", e, i, h)]


def resolve_model(name: str) -> tuple[str, LlamaConfig]:
    """(label, config) for a preset name or an HF folder / config.json path; reads no weights."""
    if name in PRESETS:
        return name, PRESETS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"--model={name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing HF model folder "
            "or config.json file. Pass one of the presets, or the path of a folder that holds config.json.")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); pass the config.json of a Hugging Face model.") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} holds a JSON {type(hf).__name__}, not a config object; pass a model's "
                              "config.json.")
    hf = {k: v for k, v in hf.items() if k != "quantization_config"}  # a plan chooses its own quantization
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConfigError(f"{path} lacks {missing}, which a memory plan needs; pass the config.json of a "
                          "Llama-family Hugging Face model.")
    return str(path.parent), config_from_hf(hf)
