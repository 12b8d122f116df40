"""One table of model families, keyed by the HF `model_type`: everything outside a family's module that
needs to know its structure reads it from here.

A `Family` names its config class (read from `config.json` with `from_hf`), its Flax module, and one
decoder layer's parts: each linear (its path in the layer, which is also its HF name, its in/out
features as config attributes, the config flag that gives it a bias, its llama.cpp GGUF name, its
logical sharding axes, the activation it reads in the backward) and each norm (path, GGUF name). The
parts outside the layers (embedding, final norm, output head) are the same for every family today and
are `Family` defaults.

Readers: `convert/hf.py` and `convert/bnb.py` (the expected HF tensor names), `convert/gguf.py` (GGUF
names), `convert/load.py` / `convert/bnb.py` / `plan/xla.py` (`build_model`), `train/sharding.py`
(`kernel_axes`), `plan/shapes.py` and `plan/analytic.py` (`layer_linears`, norms).

Adding a family: a module file (its config class with `from_hf`/`to_hf`, its Flax module keeping the
`(config, dtype=, param_dtype=, remat=, dropout_rate=, deterministic=)` constructor) and one entry in
`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.models import gemma, mixtral, moe, phi3, qwen3, qwen3_moe
from jaxpeft.models.config import ARCHITECTURES, LlamaConfig
from jaxpeft.models.llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class LinearPart:
    """One linear module of a decoder layer.

    name: its path inside the layer, dotted ("self_attn.q_proj"; the HF name is
    `model.layers.<i>.<name>.weight`). in_features / out_features: config attributes giving its (I, O).
    bias: the config flag that gives it a bias (None: never). gguf: llama.cpp's tensor name inside
    `blk.<i>` ("attn_q"). axes: the logical sharding axes of its (I, O) kernel (`train/sharding.RULES`).
    reads: the activation it reads, kept for its weight gradient (the planner's label; linears that read
    the same tensor share it).
    """

    name: str
    in_features: str
    out_features: str
    gguf: str
    axes: tuple[str, str]
    reads: str
    bias: str | None = None

    @property
    def short(self) -> str:
        """The module's own name ("q_proj"), the last part of its path."""
        return self.name.rsplit(".", 1)[-1]

    def shape(self, config: Any) -> tuple[int, int]:
        return int(getattr(config, self.in_features)), int(getattr(config, self.out_features))

    def has_bias(self, config: Any) -> bool:
        return self.bias is not None and bool(getattr(config, self.bias))


@dataclasses.dataclass(frozen=True)
class NormPart:
    """One norm of a decoder layer: its path inside the layer, its llama.cpp GGUF name, and the config attribute
    giving its width."""

    name: str
    gguf: str
    features: str = "hidden_size"


@dataclasses.dataclass(frozen=True)
class ExpertsPart:
    """The sparse MLP of an MoE family's sparse layers (`config.is_sparse_layer(i)`), replacing its dense `mlp.*`
    linears there: the router (a linear `mlp.gate`, (H, E)) and the fused expert stacks
    `mlp.experts.<param>.weight` (`models/moe.py`). `file_router` / `file_experts` are the names checkpoint files
    use inside a layer (`file_experts[part]` with `{e}`, part in gate/up/down; `convert/experts.py`)."""

    file_router: str
    file_experts: Mapping[str, str]
    router: LinearPart = LinearPart("mlp.gate", "hidden_size", "num_experts", "ffn_gate_inp", ("embed", "experts"),
                                    "normed x (input of the router and experts)")
    experts: str = "mlp.experts"
    params: tuple[str, ...] = moe.EXPERT_PARAMS


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: config class, Flax module and the parts of its decoder layers (module docstring)."""

    model_type: str
    architecture: str  # the HF class name in config.json's `architectures`
    config_class: type
    module_class: type
    linears: tuple[LinearPart, ...]
    norms: tuple[NormPart, ...]
    gguf_architecture: str | None = None  # GGUF `general.architecture` read as this family (None: none)
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    head_axes: tuple[str, str] = ("embed", "vocab")
    gguf_globals: tuple[tuple[str, str], ...] = (
        ("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head"))
    # Default targets per method when the user names none (PEFT's per-model tables where it has one).
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    ia3_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] = ("down_proj",)
    experts: ExpertsPart | None = None  # MoE families only

    def layer_linears(self, config: Any, layer: int) -> tuple[LinearPart, ...]:
        """The linears of decoder layer `layer`: on an MoE family's sparse layers the router replaces `mlp.*`."""
        if self.experts is None or not config.is_sparse_layer(layer):
            return self.linears
        return tuple(m for m in self.linears if not m.name.startswith("mlp.")) + (self.experts.router,)

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}"

    def hf_names(self, config: Any) -> set[str]:
        """Every tensor name an HF checkpoint of this family with `config` holds."""
        names = {f"{self.embed}.weight", f"{self.final_norm}.weight"}
        if not config.tie_word_embeddings:
            names.add(f"{self.head}.weight")
        for i in range(config.num_hidden_layers):
            p = self.layer_prefix(i)
            names |= {f"{p}.{n.name}.weight" for n in self.norms}
            linears = self.layer_linears(config, i)
            names |= {f"{p}.{m.name}.weight" for m in linears}
            names |= {f"{p}.{m.name}.bias" for m in linears if m.has_bias(config)}
            if self.experts is not None and config.is_sparse_layer(i):
                names |= {f"{p}.{self.experts.experts}.{q}.weight" for q in self.experts.params}
        return names

    def gguf_names(self) -> tuple[dict[str, str], dict[str, str]]:
        """({GGUF global tensor: HF name}, {GGUF tensor inside blk.<i>: HF name inside the layer}), `.weight`s."""
        globals_ = {f"{g}.weight": f"{h}.weight" for g, h in self.gguf_globals}
        layer = {f"{p.gguf}.weight": f"{p.name}.weight" for p in (*self.linears, *self.norms)}
        return globals_, layer


_LLAMA_LINEARS = (
    LinearPart("self_attn.q_proj", "hidden_size", "q_dim", "attn_q", ("embed", "heads"),
               "normed x (input of q/k/v)", bias="attention_bias"),
    LinearPart("self_attn.k_proj", "hidden_size", "kv_dim", "attn_k", ("embed", "kv_heads"),
               "normed x (input of q/k/v)", bias="attention_bias"),
    LinearPart("self_attn.v_proj", "hidden_size", "kv_dim", "attn_v", ("embed", "kv_heads"),
               "normed x (input of q/k/v)", bias="attention_bias"),
    LinearPart("self_attn.o_proj", "q_dim", "hidden_size", "attn_output", ("heads", "embed"),
               "attention output (input of o_proj)", bias="o_proj_bias"),
    LinearPart("mlp.gate_proj", "hidden_size", "intermediate_size", "ffn_gate", ("embed", "mlp"),
               "normed x (input of gate/up)"),
    LinearPart("mlp.up_proj", "hidden_size", "intermediate_size", "ffn_up", ("embed", "mlp"),
               "normed x (input of gate/up)"),
    LinearPart("mlp.down_proj", "intermediate_size", "hidden_size", "ffn_down", ("mlp", "embed"),
               "silu(gate)*up (input of down_proj)"),
)
_LLAMA_NORMS = (NormPart("input_layernorm", "attn_norm"), NormPart("post_attention_layernorm", "ffn_norm"))


def _llama_like(model_type: str, gguf_architecture: str | None = None) -> Family:
    return Family(model_type=model_type, architecture=ARCHITECTURES[model_type], config_class=LlamaConfig,
                  module_class=LlamaForCausalLM, linears=_LLAMA_LINEARS, norms=_LLAMA_NORMS,
                  gguf_architecture=gguf_architecture)


_QK_NORMS = (NormPart("self_attn.q_norm", "attn_q_norm", "head_dim"),
             NormPart("self_attn.k_norm", "attn_k_norm", "head_dim"))

_GEMMA_NORMS = (NormPart("input_layernorm", "attn_norm"), NormPart("post_attention_layernorm", "post_attention_norm"),
                NormPart("pre_feedforward_layernorm", "ffn_norm"),
                NormPart("post_feedforward_layernorm", "post_ffw_norm"))


def _gemma(model_type: str, norms: tuple[NormPart, ...], gguf_architecture: str) -> Family:
    return Family(model_type=model_type, architecture=gemma.ARCHITECTURES[model_type], config_class=gemma.GemmaConfig,
                  module_class=gemma.GemmaForCausalLM, linears=_LLAMA_LINEARS, norms=norms,
                  ia3_targets=("q_proj", "v_proj", "down_proj"), gguf_architecture=gguf_architecture)


_PHI3_LINEARS = (
    LinearPart("self_attn.qkv_proj", "hidden_size", "qkv_dim", "attn_qkv", ("embed", "heads"),
               "normed x (input of qkv_proj)"),
    LinearPart("self_attn.o_proj", "q_dim", "hidden_size", "attn_output", ("heads", "embed"),
               "attention output (input of o_proj)"),
    LinearPart("mlp.gate_up_proj", "hidden_size", "gate_up_dim", "ffn_up", ("embed", "mlp"),
               "normed x (input of gate_up_proj)"),
    LinearPart("mlp.down_proj", "intermediate_size", "hidden_size", "ffn_down", ("mlp", "embed"),
               "silu(gate)*up (input of down_proj)"),
)

FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama", gguf_architecture="llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": dataclasses.replace(_llama_like("qwen2"), ia3_targets=("q_proj", "v_proj", "down_proj")),
    "qwen3": Family(model_type="qwen3", architecture=qwen3.ARCHITECTURE, config_class=qwen3.Qwen3Config,
                    module_class=LlamaForCausalLM, linears=_LLAMA_LINEARS, norms=_LLAMA_NORMS + _QK_NORMS,
                    ia3_targets=("q_proj", "v_proj", "down_proj"), gguf_architecture="qwen3"),
    "gemma2": _gemma("gemma2", _GEMMA_NORMS, "gemma2"),
    "gemma3_text": _gemma("gemma3_text", _GEMMA_NORMS + _QK_NORMS, "gemma3"),
    # PEFT has no Phi-3 defaults: LoRA on the fused attention input and output, IA3 on qkv and down.
    "phi3": Family(model_type="phi3", architecture=phi3.ARCHITECTURE, config_class=phi3.Phi3Config,
                   module_class=phi3.Phi3ForCausalLM, linears=_PHI3_LINEARS, norms=_LLAMA_NORMS,
                   lora_targets=("qkv_proj", "o_proj"), ia3_targets=("qkv_proj", "down_proj"),
                   gguf_architecture="phi3"),
    # MoE: Llama's / Qwen3's attention; LoRA q/v by default (PEFT's mixtral entry); IA3 k/v only (PEFT's mixtral
    # entry adds the per-expert w2 Linear, which transformers 5.24 no longer has).
    "mixtral": Family(model_type="mixtral", architecture=mixtral.ARCHITECTURE, config_class=mixtral.MixtralConfig,
                      module_class=moe.MoeForCausalLM, linears=_LLAMA_LINEARS, norms=_LLAMA_NORMS,
                      experts=ExpertsPart(mixtral.FILE_ROUTER, mixtral.FILE_EXPERTS),
                      ia3_targets=("k_proj", "v_proj"), ia3_feedforward=()),
    "qwen3_moe": Family(model_type="qwen3_moe", architecture=qwen3_moe.ARCHITECTURE,
                        config_class=qwen3_moe.Qwen3MoeConfig, module_class=moe.MoeForCausalLM,
                        linears=_LLAMA_LINEARS, norms=_LLAMA_NORMS + _QK_NORMS,
                        experts=ExpertsPart(qwen3_moe.FILE_ROUTER, qwen3_moe.FILE_EXPERTS),
                        ia3_targets=("k_proj", "v_proj"), ia3_feedforward=()),
}


def family_of(model_type: str | None) -> Family:
    """The family of an HF `model_type`; an unknown one is an error listing the supported types."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; jaxpeft supports {sorted(FAMILIES)} (and the text part "
            f"of {sorted(MULTIMODAL)}). Use a checkpoint of one of those architectures.")
    return FAMILIES[model_type]


def gguf_family(architecture: str | None) -> Family:
    """The family a GGUF file's `general.architecture` is read as; an unknown one names those supported."""
    for family in FAMILIES.values():
        if family.gguf_architecture is not None and family.gguf_architecture == architecture:
            return family
    supported = sorted(f.gguf_architecture for f in FAMILIES.values() if f.gguf_architecture)
    raise UnsupportedModelError(
        f"GGUF architecture {architecture!r} is not supported; only {supported} can be read (llama: Llama, "
        "SmolLM2, Mistral-style dense models).")


# Multimodal model types whose text part loads as a family here: {model_type: text_part(hf) -> (text config.json
# dict, rename(tensor names) -> {name: name in the text model, or None to skip})}.
MULTIMODAL = {"gemma3": gemma.multimodal_text_part}


def text_part(hf: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any]:
    """(config.json dict of the family model to load, tensor renaming or None): a multimodal checkpoint's text part."""
    if hf.get("model_type") in MULTIMODAL:
        return MULTIMODAL[hf["model_type"]](hf)
    return hf, None


def config_from_hf(hf: Mapping[str, Any]) -> Any:
    """The config of an HF `config.json` dict, read by its family's config class."""
    return family_of(hf.get("model_type")).config_class.from_hf(hf)


def build_model(config: Any, **kwargs: Any) -> Any:
    """The Flax module of `config`'s family: `module_class(config, dtype=..., param_dtype=..., remat=..., ...)`."""
    return family_of(config.model_type).module_class(config, **kwargs)


def default_targets(model_type: str, method: str) -> dict[str, tuple[str, ...]]:
    """The family's default targets of `method` ("lora" or "ia3") as config keyword arguments."""
    family = family_of(model_type)
    if method == "lora":
        return {"target_modules": family.lora_targets}
    if method == "ia3":
        return {"target_modules": family.ia3_targets, "feedforward_modules": family.ia3_feedforward}
    raise ValueError(f"no per-family default targets for method {method!r}; only 'lora' and 'ia3' have them")


def kernel_axes() -> dict[str, tuple[str, str]]:
    """{linear module name: logical (I, O) axes} over every family (names agree on axes across families)."""
    out: dict[str, tuple[str, str]] = {}
    for family in FAMILIES.values():
        parts = list(family.linears) + ([family.experts.router] if family.experts else [])
        for name, axes in [(m.short, m.axes) for m in parts] + [(family.head, family.head_axes)]:
            if out.setdefault(name, axes) != axes:
                raise ValueError(f"{name}: families disagree on its sharding axes ({out[name]} vs {axes}); "
                                 "give the module a distinct name or the same axes")
    return out


__all__ = ["ExpertsPart", "FAMILIES", "Family", "LinearPart", "NormPart", "build_model", "config_from_hf", "default_targets",
           "family_of", "gguf_family", "kernel_axes", "text_part"]
