"""What every decoder-only causal LM shares: masks, positions, the KV cache, virtual tokens, the head.

A family subclasses `CausalLM` and builds, in `setup`, two things:
    self.model   the decoder body: `model(input_ids_BxS, positions_BxS, allowed, cache, embeds_BxSxD=None)`
                 -> (final hidden states (B, S, D), {layer name: {"k", "v"}} the new cache layers);
                 `embeds_BxSxD` replaces the token embeddings, `input_ids` may then be None; `allowed` is
                 `layer_masks`' {window: `AttentionMask`}, layer i reading `allowed[config.layer_windows()[i]]`
                 and passing it to `kernels.attention.attention`.
    self.lm_head a Linear, unless the config ties the embeddings (then `self.model.embed_tokens.attend`).
Everything else is here, once: default positions that skip left padding, the causal / padding / window /
segment mask (a structured `kernels.attention.AttentionMask`, never a dense (B, S, T) array: the blockwise
attention evaluates it tile by tile; it also carries the `attention` implementation the model was built
with), the cache's slots and write index, and virtual tokens. Virtual tokens (a registered
`hooks.VirtualTokenSource`: prefix or prompt tuning) enter as a cache whose first P slots hold their keys
and values; real tokens follow them at positions P.., and outputs come back for the real tokens only.

Shape legend: B batch, S query length, T key length (the cache length when a KV cache is used),
D hidden, V vocab, K kv heads, E head dim, P virtual tokens.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.kernels.attention import CHOICES as ATTENTION_CHOICES
from jaxpeft.kernels.attention import DEFAULT_BLOCK, AttentionMask, auto_for_remat, make_mask
from jaxpeft.models import hooks

Cache = dict[str, Any]
TOP_MODULES = ("model", "lm_head")


class CausalLM(nn.Module):
    """The causal LM. `__call__` returns logits (or final hidden states) and, with a cache, the new cache."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # models/remat.py: recompute layers in the backward; "offload": to host (GPU)
    dropout_rate: float = 0.0  # dropout on adapter paths (e.g. LoRA), active when not deterministic
    deterministic: bool = True
    attention: str = "auto"  # kernels.attention implementation: auto | dense | blockwise | cudnn
    attention_block: int = DEFAULT_BLOCK  # query / key block of the blockwise attention

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
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention={self.attention!r}: expected one of {list(ATTENTION_CHOICES)}")
        options = dict(implementation=auto_for_remat(self.attention, s, self.remat), block=self.attention_block)
        unpadded = attention_mask_BxS is None  # then trivially right padded (cuDNN's key lengths apply)
        if attention_mask_BxS is None:
            attention_mask_BxS = jnp.ones((b, s), jnp.int32)
        hooks.check_known("top", list(self.variables.get("params", {})), TOP_MODULES)
        virtual = self.num_virtual_tokens()
        own_cache = cache is None and virtual > 0
        if own_cache:
            cache = self.new_cache(b, s, self.dtype)
        if cache is None:
            if positions_BxS is None:
                positions_BxS = default_positions(attention_mask_BxS)
            allowed = layer_masks(self.config, attention_mask_BxS, segment_ids_BxS, 0, s, right_padded=unpadded,
                                  **options)
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
            key_segments = None
            if own_cache and segment_ids_BxS is not None:  # packed rows: every segment sees the virtual tokens
                key_segments = jnp.concatenate([jnp.zeros((b, virtual), segment_ids_BxS.dtype), segment_ids_BxS], 1)
            else:
                segment_ids_BxS = None
            allowed = layer_masks(self.config, key_mask, segment_ids_BxS, index, s, key_segment_ids_BxT=key_segments,
                                  shared_prefix=virtual if key_segments is not None else 0, **options)
        hidden, new_layers = self.model(input_ids_BxS, positions_BxS, allowed, cache)
        new_cache = None
        if cache is not None and not own_cache:
            new_cache = {**cache, "layers": new_layers, "index": cache["index"] + s, "mask": key_mask}
        out = hidden if return_hidden else self.head(hidden)
        return (out, new_cache) if new_cache is not None else out

    def num_virtual_tokens(self) -> int:
        """P: the virtual tokens the parameters carry (a registered VirtualTokenSource's leaves), 0 without them."""
        return hooks.virtual_source(self.variables.get("params", {}))[1]

    def new_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        """An empty KV cache for `max_len` tokens per row. With virtual tokens it has P more slots in front,
        filled with their keys and values, and its index starts at P."""
        dtype = dtype or self.dtype
        params = self.variables.get("params", {})
        source, virtual = hooks.virtual_source(params)
        cache = init_cache(self.config, batch, max_len, dtype)
        if source is None:
            return cache
        for i, (k_PxKxE, v_PxKxE) in enumerate(source.layer_kv(params, self.config, self._embeddings_kv)):
            layer = cache["layers"][str(i)]
            for name, x in (("k", k_PxKxE), ("v", v_PxKxE)):
                front = jnp.broadcast_to(x.astype(dtype)[None], (batch, *x.shape))
                layer[name] = jnp.concatenate([front, layer[name]], axis=1)
        cache["mask"] = jnp.concatenate([jnp.ones((batch, virtual), jnp.int32), cache["mask"]], axis=1)
        cache["index"] = jnp.asarray(virtual, jnp.int32)
        cache["virtual"] = jnp.zeros((virtual,), jnp.int32)  # its shape marks a cache made for these params
        return cache

    def _embeddings_kv(self, embeds_PxD: jax.Array) -> list[hooks.LayerKV]:
        """Per layer (keys, values) (P, K, E) of embeddings run alone through the decoder at positions 0..P-1."""
        c = self.config
        embeds_1xPxD = jnp.asarray(embeds_PxD)[None]
        p = embeds_1xPxD.shape[1]
        allowed = layer_masks(c, jnp.ones((1, p), jnp.int32), None, 0, p, implementation=self.attention,
                              block=self.attention_block)
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


def write_cache(layer_cache: Cache | None, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array, dtype: Any):
    """(keys, values) to attend over and the layer's new cache: without a cache the call's own; with one, this
    call's keys and values written at the cache index and the whole cache read back in `dtype`."""
    if layer_cache is None:
        return k_BxSxKxE, v_BxSxKxE, None
    index = layer_cache["index"]
    k = jax.lax.dynamic_update_slice(layer_cache["k"], k_BxSxKxE.astype(layer_cache["k"].dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(layer_cache["v"], v_BxSxKxE.astype(layer_cache["v"].dtype), (0, index, 0, 0))
    return k.astype(dtype), v.astype(dtype), {"k": k, "v": v}


def layer_masks(config: Any, key_mask_BxT, segment_ids_BxS, offset, s, **options) -> dict[int | None, AttentionMask]:
    """{window: `causal_mask`} for each distinct attention window of the layers (`config.layer_windows()`);
    layer i attends with `masks[config.layer_windows()[i]]`. `options` go to `make_mask` (key segment ids,
    shared prefix, implementation, block)."""
    return {w: causal_mask(key_mask_BxT, segment_ids_BxS, w, offset, s, **options)
            for w in dict.fromkeys(config.layer_windows())}


def causal_mask(key_mask_BxT, segment_ids_BxS, window, offset, s, **options) -> AttentionMask:
    """allowed[b, s, t]: key slot t is real, not in the future of query slot offset+s, and in the window (and,
    for packed rows, in the query's segment); `.dense(s)` is that (B, S, T) boolean array."""
    del s  # the mask's queries are whatever the attention receives
    return make_mask(key_mask_BxT, offset=offset, segment_ids_BxS=segment_ids_BxS, window=window, **options)


def init_cache(config: Any, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache of `max_len` slots per row."""
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    layers = {str(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
              for i in range(config.num_hidden_layers)}
    return {"layers": layers, "index": jnp.zeros((), jnp.int32), "mask": jnp.zeros((batch, max_len), jnp.int32)}
