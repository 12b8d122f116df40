"""A Llama-family decoder in Flax linen over a parameter tree keyed like the HF module paths.

Canonical parameter tree (`params` below; the Flax variables are `{"params": params}`):

    model/embed_tokens/embedding                 (V, D)      HF model.embed_tokens.weight
    model/layers/<i>/input_layernorm/weight      (D,)        HF model.layers.<i>.input_layernorm.weight
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel (I, O)  HF ....weight transposed; q/k/v `bias` (Qwen2)
    model/layers/<i>/post_attention_layernorm/weight (D,)
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel  (I, O)
    model/norm/weight                             (D,)
    lm_head/kernel                                (D, V)      absent when embeddings are tied

Layers are unrolled (one subtree per layer) so that per-layer choices (rank patterns, layers to
transform) are plain tree edits and the HF name of every leaf is its path joined with dots.

Shape legend: B batch, S query length, T key length (the cache length when a KV cache is used),
D hidden, V vocab, H/K query/kv heads, E head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models import ops
from jaxpeft.models.config import LlamaConfig

Cache = dict[str, Any]


class Linear(nn.Module):
    """A linear layer whose maths is `ops.linear` over whatever leaves its scope holds."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_initializing():
            self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
            if self.use_bias:
                self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        # Read leaves without `self.param` so adapter siblings and quantized kernels pass through.
        leaves = self.variables["params"]
        dropout = None
        if self.dropout_rate > 0 and not self.deterministic and "lora_a" in leaves:
            dropout = lambda v: nn.Dropout(self.dropout_rate)(v, deterministic=False)  # noqa: E731
        return ops.linear(x, leaves, dtype=self.dtype, dropout=dropout)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return ops.rms_norm(x, weight, self.eps, self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.param_dtype
        )

    def __call__(self, ids_BxS: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids_BxS, axis=0).astype(self.dtype)

    def attend(self, h_BxSxD: jax.Array) -> jax.Array:
        return h_BxSxD @ self.embedding.astype(self.dtype).T


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, allowed_BxSxT, layer_cache):
        c = self.config
        dense = lambda n, f, bias: Linear(  # noqa: E731
            f, bias, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n
        )
        b, s, _ = x_BxSxD.shape
        q = dense("q_proj", c.q_dim, c.attention_bias)(x_BxSxD).reshape(b, s, c.num_attention_heads, c.head_dim)
        k = dense("k_proj", c.kv_dim, c.attention_bias)(x_BxSxD).reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = dense("v_proj", c.kv_dim, c.attention_bias)(x_BxSxD).reshape(b, s, c.num_key_value_heads, c.head_dim)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            index = layer_cache["index"]
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
            new_cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        out = ops.attention(q, k, v, allowed_BxSxT, self.dtype)
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
        return dense("down_proj", c.hidden_size)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, h_BxSxD, cos, sin, allowed_BxSxT, layer_cache):
        c = self.config
        args = (self.dtype, self.param_dtype, self.dropout_rate, self.deterministic)
        params = self.variables.get("params", {})

        def residual_add(location, residual_BxSxD, out_BxSxD):
            # A bottleneck adapter (methods/bottleneck.py) at this sublayer's end, when the params hold one.
            if location not in params:
                return residual_BxSxD + out_BxSxD
            from jaxpeft.methods.bottleneck import apply_bottleneck

            dropout = None
            if self.dropout_rate > 0 and not self.deterministic:
                dropout = lambda v: nn.Dropout(self.dropout_rate)(v, deterministic=False)  # noqa: E731
            return apply_bottleneck(out_BxSxD, residual_BxSxD, params[location], dtype=self.dtype, dropout=dropout)

        x = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(h_BxSxD)
        attn, new_cache = Attention(c, *args, name="self_attn")(x, cos, sin, allowed_BxSxT, layer_cache)
        h = residual_add("attention_adapter", h_BxSxD, attn)
        x = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(h)
        return residual_add("output_adapter", h, MLP(c, *args, name="mlp")(x)), new_cache


class LlamaModel(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype)
        self.layers = DecoderStack(c, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                                   self.remat)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, input_ids_BxS, positions_BxS, allowed_BxSxT, cache: Cache | None):
        h = self.embed_tokens(input_ids_BxS)
        inv_freq = rope_inv_freq(self.config, positions_BxS)
        cos, sin = ops.rope_cos_sin(positions_BxS, inv_freq, self.dtype)
        h, new_layers = self.layers(h, cos, sin, allowed_BxSxT, cache)
        return self.norm(h), new_layers


class DecoderStack(nn.Module):
    """The layers, named "0", "1", ... so that their paths read like HF's `model.layers.<i>`."""

    config: LlamaConfig
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool
    remat: bool

    @nn.compact
    def __call__(self, h, cos, sin, allowed_BxSxT, cache):
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        new_layers = {}
        for i in range(self.config.num_hidden_layers):
            layer_cache = None
            if cache is not None:
                layer_cache = {**cache["layers"][str(i)], "index": cache["index"]}
            layer = layer_cls(self.config, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic,
                              name=str(i))
            h, new_layers[str(i)] = layer(h, cos, sin, allowed_BxSxT, layer_cache)
        return h, new_layers


class LlamaForCausalLM(nn.Module):
    """The causal LM. `__call__` returns logits (or final hidden states) and, with a cache, the new cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    dropout_rate: float = 0.0  # dropout on adapter paths (LoRA), active when not deterministic
    deterministic: bool = True

    def setup(self) -> None:
        self.model = LlamaModel(
            self.config, self.dtype, self.param_dtype, self.remat, self.dropout_rate, self.deterministic
        )
        if not self.config.tie_word_embeddings:
            self.lm_head = Linear(self.config.vocab_size, False, self.dtype, self.param_dtype, self.dropout_rate,
                                  self.deterministic)

    def __call__(
        self,
        input_ids_BxS: jax.Array,
        *,
        attention_mask_BxS: jax.Array | None = None,
        positions_BxS: jax.Array | None = None,
        segment_ids_BxS: jax.Array | None = None,
        cache: Cache | None = None,
        return_hidden: bool = False,
    ):
        b, s = input_ids_BxS.shape
        if attention_mask_BxS is None:
            attention_mask_BxS = jnp.ones((b, s), jnp.int32)
        if cache is None:
            if positions_BxS is None:
                positions_BxS = default_positions(attention_mask_BxS)
            allowed = causal_mask(attention_mask_BxS, segment_ids_BxS, self.config.sliding_window, 0, s)
        else:
            # The cache mask holds which slots hold real tokens; this call writes slots index..index+S.
            index = cache["index"]
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask_BxS.astype(cache["mask"].dtype),
                                                    (0, index))
            if positions_BxS is None:
                counted = default_positions(key_mask)
                positions_BxS = jax.lax.dynamic_slice_in_dim(counted, index, s, axis=1)
            allowed = causal_mask(key_mask, None, self.config.sliding_window, index, s)
        hidden, new_layers = self.model(input_ids_BxS, positions_BxS, allowed, cache)
        new_cache = None
        if cache is not None:
            new_cache = {"layers": new_layers, "index": cache["index"] + s, "mask": key_mask}
        out = hidden if return_hidden else self.head(hidden)
        return (out, new_cache) if cache is not None else out

    def head(self, hidden_BxSxD: jax.Array) -> jax.Array:
        """Logits from final hidden states: the tied embedding or `lm_head`."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden_BxSxD)
        return self.lm_head(hidden_BxSxD)


def default_positions(attention_mask_BxS: jax.Array) -> jax.Array:
    """Positions that count real tokens only, so left-padded rows start at 0 (as HF generate does)."""
    return jnp.maximum(jnp.cumsum(attention_mask_BxS, axis=1) - 1, 0).astype(jnp.int32)


def causal_mask(key_mask_BxT, segment_ids_BxS, window, offset, s) -> jax.Array:
    """allowed[b, s, t]: key slot t is real, not in the future of query slot offset+s, and in the window."""
    t = key_mask_BxT.shape[1]
    q_slot = offset + jnp.arange(s)[:, None]
    k_slot = jnp.arange(t)[None, :]
    allowed = (k_slot <= q_slot)[None] & (key_mask_BxT[:, None, :] > 0)
    if window is not None:
        allowed &= (q_slot - k_slot < window)[None]
    if segment_ids_BxS is not None:
        allowed &= segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
    return allowed


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


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache of `max_len` slots per row."""
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    layers = {str(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
              for i in range(config.num_hidden_layers)}
    return {"layers": layers, "index": jnp.zeros((), jnp.int32), "mask": jnp.zeros((batch, max_len), jnp.int32)}
