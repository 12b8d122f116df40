"""A Llama-family decoder in Flax linen over a parameter tree keyed like the HF module paths.

Canonical parameter tree (`params` below; the Flax variables are `{"params": params}`):

    model/embed_tokens/embedding                 (V, D)      HF model.embed_tokens.weight
    model/layers/<i>/input_layernorm/weight      (D,)        HF model.layers.<i>.input_layernorm.weight
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel (I, O)  HF ....weight transposed; q/k/v `bias` (Qwen2)
    model/layers/<i>/self_attn/{q,k}_norm/weight (E,)        Qwen3 only (config.qk_norm)
    model/layers/<i>/post_attention_layernorm/weight (D,)
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel  (I, O)
    model/norm/weight                             (D,)
    lm_head/kernel                                (D, V)      absent when embeddings are tied

The model knows no PEFT method: adapter leaves are honoured through the hooks methods register
(`models/hooks.py`): linear adapters inside `ops.linear`, residual hooks at the end of each sublayer,
virtual-token sources through the KV cache of `causal_lm.CausalLM`, which holds the masks, positions,
cache and head every family shares. This file is only what makes a Llama a Llama.

Layers are unrolled (one subtree per layer) so that per-layer choices (rank patterns, layers to
transform) are plain tree edits and the HF name of every leaf is its path joined with dots.

Shape legend: B batch, S query length, T key length (the cache length when a KV cache is used),
D hidden, V vocab, H/K query/kv heads, E head dim.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.kernels.attention import attention
from jaxpeft.models import hooks, ops
from jaxpeft.models.causal_lm import Cache, CausalLM, write_cache
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.layers import Embed, Linear, RMSNorm
from jaxpeft.models.remat import run_layer

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
QK_NORMS = ("q_norm", "k_norm")
LAYER_MODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask, layer_cache):
        c = self.config
        dense = lambda n, f, bias: Linear(  # noqa: E731
            f, bias, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n
        )
        own = ATTENTION_MODULES + (QK_NORMS if c.qk_norm else ())
        hooks.check_known("attention", list(self.variables.get("params", {})), own)
        b, s, _ = x_BxSxD.shape
        q = dense("q_proj", c.q_dim, c.attention_bias)(x_BxSxD).reshape(b, s, c.num_attention_heads, c.head_dim)
        k = dense("k_proj", c.kv_dim, c.attention_bias)(x_BxSxD).reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = dense("v_proj", c.kv_dim, c.attention_bias)(x_BxSxD).reshape(b, s, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:  # Qwen3: one RMSNorm over each head's E features, before RoPE
            q = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        k, v, new_cache = write_cache(layer_cache, k, v, self.dtype)
        out = attention(q, k, v, mask, self.dtype)
        return dense("o_proj", c.hidden_size, c.o_proj_bias)(out), new_cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        dense = lambda n, f: Linear(  # noqa: E731
            f, False, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n
        )
        gate = dense("gate_proj", c.intermediate_size)(x_BxSxD)
        up = dense("up_proj", c.intermediate_size)(x_BxSxD)
        return dense("down_proj", c.hidden_size)(ops.silu(gate) * up)


class DecoderLayer(nn.Module):
    """input norm, attention, residual, post-attention norm, MLP, residual; a family with other attention or MLP
    modules (Phi-3's fused ones) subclasses it with its own `attention_cls` / `mlp_cls`."""

    attention_cls: ClassVar[type] = Attention
    mlp_cls: ClassVar[type] = MLP
    config: LlamaConfig
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
        dropout = None  # on a residual hook's output, when training
        if self.dropout_rate > 0 and not self.deterministic:
            dropout = lambda v: nn.Dropout(self.dropout_rate)(v, deterministic=False)  # noqa: E731
        residual_add = lambda site, r, o: hooks.residual_add(site, params, r, o, dtype=self.dtype,  # noqa: E731
                                                             dropout=dropout)

        x = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(h_BxSxD)
        attn, new_cache = self.attention_cls(c, *args, name="self_attn")(x, cos, sin, mask, layer_cache)
        h = residual_add("attention", h_BxSxD, attn)
        x = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(h)
        return residual_add("mlp", h, self.mlp_cls(c, *args, name="mlp")(x)), new_cache


class DecoderStack(nn.Module):
    """The layers, named "0", "1", ... so that their paths read like HF's `model.layers.<i>`."""

    layer_cls: ClassVar[type] = DecoderLayer
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool
    remat: bool | str  # models/remat.py: False, True, "offload"

    @nn.compact
    def __call__(self, h, cos, sin, allowed, cache):
        new_layers = {}
        windows = self.config.layer_windows()
        for i in range(self.config.num_hidden_layers):
            layer_cache = None
            if cache is not None:
                layer_cache = {**cache["layers"][str(i)], "index": cache["index"]}
            layer = self.layer_cls(self.config, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                                   name=str(i))
            h, new_layers[str(i)] = run_layer(self, layer, (h, cos, sin, allowed[windows[i]], layer_cache), self.remat)
        return h, new_layers


class LlamaModel(nn.Module):
    stack_cls: ClassVar[type] = DecoderStack
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    dropout_rate: float = 0.0
    deterministic: bool = True

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype)
        self.layers = self.stack_cls(c, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                                   self.remat)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, input_ids_BxS, positions_BxS, allowed, cache: Cache | None, embeds_BxSxD=None):
        # `embeds_BxSxD` replaces the token embeddings (prompt tuning's virtual tokens); `allowed` is
        # causal_lm.layer_masks' {window: mask}.
        h = self.embed_tokens(input_ids_BxS) if embeds_BxSxD is None else embeds_BxSxD.astype(self.dtype)
        cos, sin = self.rope_tables(positions_BxS)
        h, new_layers = self.layers(h, cos, sin, allowed, cache)
        return self.norm(h), new_layers

    def rope_tables(self, positions_BxS: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The (cos, sin) tables of the call's positions."""
        return ops.rope_cos_sin(positions_BxS, rope_inv_freq(self.config, positions_BxS), self.dtype)


class LlamaForCausalLM(CausalLM):
    """The Llama-family causal LM (the shared call, cache and head are `CausalLM`'s)."""

    model_cls: ClassVar[type] = LlamaModel
    config: LlamaConfig

    def setup(self) -> None:
        self.model = self.model_cls(
            self.config, self.dtype, self.param_dtype, self.remat, self.dropout_rate, self.deterministic
        )
        if not self.config.tie_word_embeddings:
            self.lm_head = Linear(self.config.vocab_size, False, self.dtype, self.param_dtype, self.dropout_rate,
                                  self.deterministic)


def rope_inv_freq(config: LlamaConfig, positions_BxS: jax.Array) -> jax.Array:
    """Inverse frequencies; the `dynamic` type grows its base with the longest position in the call."""
    inv_freq = jnp.asarray(config.base_inv_freq())
    if config.rope_type != "dynamic":
        return inv_freq
    factor = config.rope()["factor"]
    max_pos = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions_BxS) + 1, max_pos).astype(jnp.float32)
    dim = config.head_dim
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base ** exponent)
