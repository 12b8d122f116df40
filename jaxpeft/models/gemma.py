"""Gemma 2 and Gemma 3 (text) decoders in Flax linen, over a parameter tree keyed like the HF module paths.

What differs from Llama (models/llama.py), all of it here:
- RMSNorm scales by (1 + w) in fp32 (`ops.offset_rms_norm`); four norms a layer: input, post-attention,
  pre-feed-forward, post-feed-forward; each sublayer's output is normed before the residual add, so a
  residual hook (bottleneck adapter) sits after the post-norm;
- token embeddings times sqrt(hidden), the factor rounded to the compute dtype (as transformers' scaled
  embedding); embeddings given directly (prompt tuning's) are not scaled, as in transformers 5;
- GeGLU with tanh-approximated GELU; attention scale `query_pre_attn_scalar ** -0.5`;
- soft-capping of attention scores and of the final logits (Gemma 2; Gemma 3 caps only the logits:
  transformers 5.24 reads its `attn_logit_softcapping` but never applies it, and neither do we);
- per-layer kinds (`layer_types`): sliding layers attend within `sliding_window`; Gemma 3 gives each kind its
  own RoPE (full: `rope_*`, sliding: `local_rope_*`), and adds (1 + w) q/k norms over each head.

Canonical tree: Llama's (embed_tokens/embedding, layers/<i>/self_attn/{q,k,v,o}_proj/kernel, mlp/...,
model/norm/weight, lm_head/kernel when untied) plus layers/<i>/{pre,post}_feedforward_layernorm/weight and,
Gemma 3, self_attn/{q,k}_norm/weight (E,).

Shape legend: B batch, S query length, T key length, D hidden, H/K query/kv heads, E head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.models import config as llama_config
from jaxpeft.kernels.attention import attention
from jaxpeft.models import hooks, ops
from jaxpeft.models.causal_lm import Cache, CausalLM, write_cache
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.layers import Embed, Linear
from jaxpeft.models.remat import run_layer

ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LAYER_MODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "mlp")
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
_GEMMA_KEYS = {"hidden_activation", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
               "use_bidirectional_attention", "cache_implementation", "rope_local_base_freq", "sliding_window_pattern",
               "attn_implementation", "_sliding_window_pattern"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig(LlamaConfig):
    """A Gemma 2 / Gemma 3 text decoder: the Llama fields (RoPE of the full layers) and Gemma's own."""

    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # RoPE of the sliding layers (Gemma 3: its own base; Gemma 2: the same as the full layers').
    local_rope_theta: float = 10000.0
    local_rope_type: str = "default"
    local_rope_params: tuple[tuple[str, float], ...] = ()
    tie_word_embeddings: bool = True
    model_type: str = "gemma2"

    def local_inv_freq(self) -> np.ndarray:
        return dataclasses.replace(self, rope_theta=self.local_rope_theta, rope_type=self.local_rope_type,
                                   rope_params=self.local_rope_params).base_inv_freq()

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "GemmaConfig":
        """Builds a config from a Gemma 2 / Gemma 3 text `config.json` dict; one error lists every unsupported
        field."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(f"GemmaConfig reads {sorted(ARCHITECTURES)}, got {model_type!r}")
        problems: list[str] = []
        bad_archs = [a for a in hf.get("architectures") or [] if a != ARCHITECTURES[model_type]]
        if bad_archs:
            problems.append(f"architectures={bad_archs} (expected [{ARCHITECTURES[model_type]!r}])")
        known = llama_config._HARMLESS | llama_config._ROPE_KEYS | llama_config._MODEL_KEYS | _GEMMA_KEYS
        problems += [f"{k}={hf[k]!r} (unknown field)" for k in sorted(set(hf) - known)]
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _ACTIVATIONS:
            problems.append(f"hidden_activation={act!r} (only {list(_ACTIVATIONS)})")
        if hf.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention=True (only causal attention)")
        for key in ("mlp_bias", "partial_rotary_factor", "pretraining_tp", "use_sliding_window"):
            if key in hf and hf[key] not in (False, 1, 1.0, None):
                problems.append(f"{key}={hf[key]!r} (not part of Gemma)")
        n = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types")
        if layer_types is None:  # transformers' defaults: Gemma 2 alternates; Gemma 3 has 5 sliding then 1 full
            every = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
            layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        if len(layer_types) != n or set(layer_types) - {"full_attention", "sliding_attention"}:
            problems.append(f"layer_types={layer_types!r} (need {n} of full_attention / sliding_attention)")
        full, local = _rope(hf, model_type, problems)
        llama_config.raise_unsupported(model_type, problems)
        heads = int(hf["num_attention_heads"])
        bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        window = hf.get("sliding_window")
        caps = {k: (float(hf[k]) if hf.get(k) is not None else None)
                for k in ("attn_logit_softcapping", "final_logit_softcapping")}
        if model_type == "gemma3_text" and caps["attn_logit_softcapping"] is not None:
            # transformers 5.24's Gemma 3 attention never passes the cap to its attention functions; follow it.
            logging.info("gemma3_text: attn_logit_softcapping=%s is ignored, as transformers ignores it",
                         caps["attn_logit_softcapping"])
            caps["attn_logit_softcapping"] = None
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_type=full[0], rope_theta=full[1], rope_params=tuple(sorted(full[2].items())),
            local_rope_type=local[0], local_rope_theta=local[1], local_rope_params=tuple(sorted(local[2].items())),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            attention_bias=bias, o_proj_bias=bias, qk_norm=model_type == "gemma3_text",
            sliding_window=int(window) if window else None, layer_types=tuple(layer_types),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)), **caps, model_type=model_type,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers loads into the same model."""
        out = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type, **self.shared_hf()}
        del out["hidden_act"], out["rope_theta"], out["rope_scaling"]
        full = out.pop("rope_parameters")
        local = {"rope_type": self.local_rope_type, "rope_theta": self.local_rope_theta,
                 **dict(self.local_rope_params)}
        rope = full if self.model_type == "gemma2" else {"full_attention": full, "sliding_attention": local}
        out.update(hidden_activation="gelu_pytorch_tanh", rope_parameters=rope, attention_bias=self.attention_bias,
                   query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar), sliding_window=self.sliding_window,
                   layer_types=list(self.layer_types), attn_logit_softcapping=self.attn_logit_softcapping,
                   final_logit_softcapping=self.final_logit_softcapping)
        return out


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # transformers' config class types the scalar as int


def multimodal_text_part(hf: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the `gemma3_text` config.json dict, a renaming of tensor names) of a `gemma3` (Gemma3ForConditionalGeneration)
    checkpoint: its language model, weights under `model.language_model.` (transformers 5) or
    `language_model.model.` (older files); the vision tower and projector are left out, with a log line."""
    text = {"model_type": "gemma3_text", **dict(hf.get("text_config") or {})}
    text["architectures"] = [ARCHITECTURES["gemma3_text"]]
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    if text.get("final_logit_softcapping") is not None:  # Gemma3ForConditionalGeneration never applies it
        logging.info("gemma3 checkpoint: final_logit_softcapping=%s dropped, as Gemma3ForConditionalGeneration "
                     "computes its logits without it", text["final_logit_softcapping"])
        text["final_logit_softcapping"] = None
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is not None:
            text.setdefault(key, hf[key])

    def rename(names) -> dict[str, str | None]:
        out, skipped = {}, 0
        for name in names:
            for prefix in ("model.language_model.", "language_model.model."):
                if name.startswith(prefix):
                    out[name] = "model." + name[len(prefix):]
                    break
            else:
                if name in ("lm_head.weight", "language_model.lm_head.weight"):
                    out[name] = "lm_head.weight"
                else:
                    out[name], skipped = None, skipped + 1
        logging.info("gemma3 checkpoint: loading its language model as gemma3_text; %d vision tower / projector "
                     "tensors skipped", skipped)
        return out

    return text, rename


def _rope(hf: Mapping[str, Any], model_type: str, problems: list[str]):
    """((type, theta, params) of the full layers, of the sliding layers): transformers-5 `rope_parameters`
    (flat for Gemma 2, keyed by layer type for Gemma 3) or the legacy rope_theta / rope_scaling /
    rope_local_base_freq keys."""
    rp = dict(hf.get("rope_parameters") or {})
    if model_type == "gemma2":
        full = llama_config._parse_rope(hf, problems)
        return full, full
    if "full_attention" in rp or "sliding_attention" in rp:
        f = {"rope_theta": 1000000.0, **(rp.get("full_attention") or {})}
        s = {"rope_theta": 10000.0, **(rp.get("sliding_attention") or {})}
        return (llama_config._parse_rope({"rope_parameters": f}, problems),
                llama_config._parse_rope({"rope_parameters": s}, problems))
    full = llama_config._parse_rope({"rope_theta": 1000000.0, **hf}, problems)
    local = ("default", float(hf.get("rope_local_base_freq", 10000.0)), {})
    return full, local


class GemmaNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return ops.offset_rms_norm(x, weight, self.eps, self.dtype)


class Attention(nn.Module):
    config: GemmaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask, layer_cache):
        c = self.config
        dense = lambda n, f: Linear(  # noqa: E731
            f, c.attention_bias, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n)
        own = ("q_proj", "k_proj", "v_proj", "o_proj") + (("q_norm", "k_norm") if c.qk_norm else ())
        hooks.check_known("attention", list(self.variables.get("params", {})), own)
        b, s, _ = x_BxSxD.shape
        q = dense("q_proj", c.q_dim)(x_BxSxD).reshape(b, s, c.num_attention_heads, c.head_dim)
        k = dense("k_proj", c.kv_dim)(x_BxSxD).reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = dense("v_proj", c.kv_dim)(x_BxSxD).reshape(b, s, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:  # Gemma 3
            q = GemmaNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            k = GemmaNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        k, v, new_cache = write_cache(layer_cache, k, v, self.dtype)
        out = attention(q, k, v, mask, self.dtype, scale=c.query_pre_attn_scalar ** -0.5,
                            logit_cap=c.attn_logit_softcapping)
        return dense("o_proj", c.hidden_size)(out), new_cache


class MLP(nn.Module):
    config: GemmaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        dense = lambda n, f: Linear(  # noqa: E731
            f, False, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n)
        gate = dense("gate_proj", c.intermediate_size)(x_BxSxD)
        up = dense("up_proj", c.intermediate_size)(x_BxSxD)
        return dense("down_proj", c.hidden_size)(ops.gelu_tanh(gate) * up)


class DecoderLayer(nn.Module):
    config: GemmaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, h_BxSxD, cos, sin, mask, layer_cache):
        c = self.config
        args = (self.dtype, self.param_dtype, self.dropout_rate, self.deterministic)
        params = self.variables.get("params", {})
        hooks.check_known("layer", list(params), LAYER_MODULES)
        dropout = None
        if self.dropout_rate > 0 and not self.deterministic:
            dropout = lambda v: nn.Dropout(self.dropout_rate)(v, deterministic=False)  # noqa: E731
        residual_add = lambda site, r, o: hooks.residual_add(site, params, r, o, dtype=self.dtype,  # noqa: E731
                                                             dropout=dropout)
        norm = lambda name: GemmaNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731

        attn, new_cache = Attention(c, *args, name="self_attn")(norm("input_layernorm")(h_BxSxD), cos, sin,
                                                                mask, layer_cache)
        h = residual_add("attention", h_BxSxD, norm("post_attention_layernorm")(attn))
        mlp = MLP(c, *args, name="mlp")(norm("pre_feedforward_layernorm")(h))
        return residual_add("mlp", h, norm("post_feedforward_layernorm")(mlp)), new_cache


class GemmaModel(nn.Module):
    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    dropout_rate: float = 0.0
    deterministic: bool = True

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype)
        self.layers = DecoderStack(c, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                                   self.remat)
        self.norm = GemmaNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, input_ids_BxS, positions_BxS, allowed, cache: Cache | None, embeds_BxSxD=None):
        c = self.config
        if embeds_BxSxD is None:  # sqrt(D) rounded to the compute dtype first, as transformers does
            h = self.embed_tokens(input_ids_BxS) * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        else:
            h = embeds_BxSxD.astype(self.dtype)
        rope = {"full": ops.rope_cos_sin(positions_BxS, jnp.asarray(c.base_inv_freq()), self.dtype),
                "sliding": ops.rope_cos_sin(positions_BxS, jnp.asarray(c.local_inv_freq()), self.dtype)}
        h, new_layers = self.layers(h, rope, allowed, cache)
        return self.norm(h), new_layers


class DecoderStack(nn.Module):
    """The layers, named "0", "1", ...; layer i reads the mask and RoPE tables of its kind."""

    config: GemmaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool
    remat: bool | str  # models/remat.py: False, True, "offload"

    @nn.compact
    def __call__(self, h, rope, allowed, cache):
        new_layers = {}
        windows = self.config.layer_windows()
        for i in range(self.config.num_hidden_layers):
            layer_cache = None if cache is None else {**cache["layers"][str(i)], "index": cache["index"]}
            cos, sin = rope["full" if windows[i] is None else "sliding"]
            layer = DecoderLayer(self.config, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                                 name=str(i))
            h, new_layers[str(i)] = run_layer(self, layer, (h, cos, sin, allowed[windows[i]], layer_cache), self.remat)
        return h, new_layers


class GemmaForCausalLM(CausalLM):
    """Gemma 2 / Gemma 3 text causal LM: the shared call and cache are `CausalLM`'s; the head soft-caps."""

    config: GemmaConfig

    def setup(self) -> None:
        self.model = GemmaModel(self.config, self.dtype, self.param_dtype, self.remat, self.dropout_rate,
                                self.deterministic)
        if not self.config.tie_word_embeddings:
            self.lm_head = Linear(self.config.vocab_size, False, self.dtype, self.param_dtype, self.dropout_rate,
                                  self.deterministic)

    def head(self, hidden_BxSxD: jax.Array) -> jax.Array:
        logits = super().head(hidden_BxSxD)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else ops.softcap(logits, cap)
