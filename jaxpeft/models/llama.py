"""A Llama-family decoder in Flax linen over a parameter tree keyed like the HF module paths.

Canonical parameter tree (`params` below; the Flax variables are `{"params": params}`):

    model/embed_tokens/embedding                 (V, D)      HF model.embed_tokens.weight
    model/layers/<i>/input_layernorm/weight      (D,)        HF model.layers.<i>.input_layernorm.weight
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel (I, O)  HF ....weight transposed; q/k/v `bias` (Qwen2)
    model/layers/<i>/post_attention_layernorm/weight (D,)
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel  (I, O)
    model/norm/weight                             (D,)
    lm_head/kernel                                (D, V)      absent when embeddings are tied

Adapter leaves the model honours besides those of `ops.linear`: prompt tuning's `prompt/embeddings`
(P, D), prefix tuning's `model/layers/<i>/self_attn/prefix_{key,value}` (P, K*E) or `prefix_encoder/...`
(see `prefix_layers`). Their P virtual tokens fill the first P slots of the KV cache (`new_cache`), real
positions start at P, and outputs come back for the real tokens only.

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

    def __call__(self, input_ids_BxS, positions_BxS, allowed_BxSxT, cache: Cache | None, embeds_BxSxD=None):
        # `embeds_BxSxD` replaces the token embeddings (prompt tuning's virtual tokens).
        h = self.embed_tokens(input_ids_BxS) if embeds_BxSxD is None else embeds_BxSxD.astype(self.dtype)
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
        virtual = self.num_virtual_tokens()
        # Virtual tokens (prompt or prefix tuning) enter as a cache whose first P slots hold their keys and
        # values; the real tokens follow them, so only the real tokens' outputs come back.
        own_cache = cache is None and virtual > 0
        if own_cache:
            cache = self.new_cache(b, s, self.dtype)
        if cache is None:
            if positions_BxS is None:
                positions_BxS = default_positions(attention_mask_BxS)
            allowed = causal_mask(attention_mask_BxS, segment_ids_BxS, self.config.sliding_window, 0, s)
        else:
            if virtual and cache.get("virtual", jnp.zeros((0,))).shape != (virtual,):
                raise ValueError(f"the parameters carry {virtual} virtual tokens (prompt/prefix tuning) but the cache "
                                 "has no slots filled with them; make it with model.new_cache (method='new_cache')")
            # The cache mask holds which slots hold real tokens; this call writes slots index..index+S.
            index = cache["index"]
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask_BxS.astype(cache["mask"].dtype),
                                                    (0, index))
            if positions_BxS is None:
                counted = default_positions(key_mask)
                positions_BxS = jax.lax.dynamic_slice_in_dim(counted, index, s, axis=1)
            elif virtual:
                positions_BxS = positions_BxS + virtual  # as PEFT: given positions count after the virtual tokens
            allowed = causal_mask(key_mask, None, self.config.sliding_window, index, s)
            if own_cache and segment_ids_BxS is not None:  # packed rows: every segment sees the virtual tokens
                same = segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
                allowed = jnp.concatenate([allowed[:, :, :virtual], allowed[:, :, virtual:] & same], axis=2)
        hidden, new_layers = self.model(input_ids_BxS, positions_BxS, allowed, cache)
        new_cache = None
        if cache is not None and not own_cache:
            new_cache = {**cache, "layers": new_layers, "index": cache["index"] + s, "mask": key_mask}
        out = hidden if return_hidden else self.head(hidden)
        return (out, new_cache) if new_cache is not None else out

    def num_virtual_tokens(self) -> int:
        """P: the virtual tokens the parameters carry (prompt tuning's `prompt/embeddings` (P, D), prefix
        tuning's per-layer `prefix_key`/`prefix_value` (P, K*E) or its `prefix_encoder`), 0 without them."""
        params = self.variables.get("params", {})
        if "prompt" in params and (prefix_source(params) is not None):
            raise ValueError("the parameters carry both prompt tuning (prompt/embeddings) and prefix tuning leaves; "
                             "use one virtual-token method at a time")
        if "prompt" in params:
            return int(params["prompt"]["embeddings"].shape[0])
        source = prefix_source(params)
        return 0 if source is None else int(source.shape[0])

    def new_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        """An empty KV cache for `max_len` tokens per row. With virtual tokens (prompt/prefix tuning) it has P
        more slots in front, filled with their keys and values, and its index starts at P."""
        dtype = dtype or self.dtype
        virtual = self.num_virtual_tokens()
        if not virtual:
            return init_cache(self.config, batch, max_len, dtype)
        c = self.config
        kv = self._virtual_kv()
        cache = init_cache(c, batch, max_len, dtype)
        for i, (k_PxKxE, v_PxKxE) in enumerate(kv):
            layer = cache["layers"][str(i)]
            for name, x in (("k", k_PxKxE), ("v", v_PxKxE)):
                front = jnp.broadcast_to(x.astype(dtype)[None], (batch, *x.shape))
                layer[name] = jnp.concatenate([front, layer[name]], axis=1)
        cache["mask"] = jnp.concatenate([jnp.ones((batch, virtual), jnp.int32), cache["mask"]], axis=1)
        cache["index"] = jnp.asarray(virtual, jnp.int32)
        cache["virtual"] = jnp.zeros((virtual,), jnp.int32)  # its shape marks a cache made for these params
        return cache

    def _virtual_kv(self) -> list[tuple[jax.Array, jax.Array]]:
        """Per layer (keys, values) [P, K, E] of the virtual tokens. Prefix tuning's prefixes are used as they
        are (not rotated: PEFT passes them as past keys). Prompt tuning's virtual tokens attend only to each
        other, so one pass over them alone (positions 0..P-1) gives their keys and values for every row."""
        c = self.config
        params = self.variables["params"]
        if "prompt" not in params:
            return [(k.reshape(-1, c.num_key_value_heads, c.head_dim), v.reshape(-1, c.num_key_value_heads, c.head_dim))
                    for k, v in prefix_layers(params, c)]
        embeds_1xPxD = jnp.asarray(params["prompt"]["embeddings"])[None]
        p = embeds_1xPxD.shape[1]
        allowed = causal_mask(jnp.ones((1, p), jnp.int32), None, c.sliding_window, 0, p)
        cache = init_cache(c, 1, p, self.dtype)
        _, layers = self.model(None, jnp.arange(p, dtype=jnp.int32)[None], allowed, cache, embeds_1xPxD)
        return [(layers[str(i)]["k"][0], layers[str(i)]["v"][0]) for i in range(c.num_hidden_layers)]

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


def prefix_source(params: Any) -> jax.Array | None:
    """The leaf whose first axis is prefix tuning's P: the `prefix_encoder` embedding or layer 0's
    `prefix_key`; None when the parameters carry no prefix."""
    if "prefix_encoder" in params:
        return params["prefix_encoder"]["embedding"]
    attn = params.get("model", {}).get("layers", {}).get("0", {}).get("self_attn", {})
    return attn.get("prefix_key")


def prefix_projection(encoder: Any) -> jax.Array:
    """PEFT's prefix reparameterisation, Embedding -> Linear -> Tanh -> Linear, in fp32: the (P, L*2*K*E)
    prefixes from `embedding` (P, K*E), `transform_0` (K*E -> H') and `transform_2` (H' -> L*2*K*E)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    t0, t2 = encoder["transform_0"], encoder["transform_2"]
    h = jnp.tanh(f32(encoder["embedding"]) @ f32(t0["kernel"]) + f32(t0["bias"]))
    return h @ f32(t2["kernel"]) + f32(t2["bias"])


def prefix_layers(params: Any, config: LlamaConfig) -> list[tuple[jax.Array, jax.Array]]:
    """Prefix tuning's (key, value) prefixes per layer, each (P, K*E): the `prefix_key`/`prefix_value` leaves
    of every layer's self_attn, or the `prefix_encoder` output split as PEFT lays it out (column block 2l is
    layer l's keys, 2l+1 its values)."""
    n, w = config.num_hidden_layers, config.kv_dim
    if "prefix_encoder" in params:
        flat = prefix_projection(params["prefix_encoder"])
        if flat.shape[1] != 2 * n * w:
            raise ValueError(f"prefix_encoder gives {flat.shape[1]} columns; this model needs 2 x {n} layers x "
                             f"{w} (kv heads x head dim) = {2 * n * w}")
        return [(flat[:, 2 * i * w:(2 * i + 1) * w], flat[:, (2 * i + 1) * w:(2 * i + 2) * w]) for i in range(n)]
    layers = params["model"]["layers"]
    attn = [layers[str(i)]["self_attn"] for i in range(n)]
    if "prefix_key" not in attn[0]:
        raise ValueError("the parameters carry no prefix (model/layers/0/self_attn/prefix_key or prefix_encoder)")
    want = (jnp.shape(attn[0]["prefix_key"])[0], w)
    shapes = [tuple(jnp.shape(a[k])) if k in a else None for a in attn for k in ("prefix_key", "prefix_value")]
    bad = [f"layer {i // 2} {('key', 'value')[i % 2]}: {got}" for i, got in enumerate(shapes) if got != want]
    if bad:
        raise ValueError(f"prefix tuning needs prefix_key and prefix_value of shape {want} in every layer; found "
                         f"{bad}")
    return [(a["prefix_key"], a["prefix_value"]) for a in attn]


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
