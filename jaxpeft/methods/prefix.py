"""Prefix tuning (Li & Liang 2021) as PEFT's PREFIX_TUNING: trained key/value prefixes in every layer.

`init` adds, for every layer i,
    model/layers/<i>/self_attn/prefix_key    (P, K*E)
    model/layers/<i>/self_attn/prefix_value  (P, K*E)
(P virtual tokens, K kv heads, E head dim: GQA-aware, as PEFT sizes them), or, with `prefix_projection`,
PEFT's reparameterisation used during training,
    prefix_encoder/embedding            (P, K*E)
    prefix_encoder/transform_0/{kernel (K*E, H'), bias (H',)}    then tanh
    prefix_encoder/transform_2/{kernel (H', L*2*K*E), bias}
whose output is split into the per-layer prefixes. The model puts the prefixes in the first P slots of
its KV cache: they are not rotated (PEFT passes them as past keys/values), every real token attends to
all of them, and real positions start at P. Only the projected prefixes are saved, so an exported
folder says `prefix_projection: false` and loads back as per-layer leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft import prompt_learning
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, flatten_params, unflatten_params
from jaxpeft.methods import virtual_tokens as vt
from jaxpeft.methods.base import Method
from jaxpeft.models import hooks

PREFIX_LEAVES = ("prefix_key", "prefix_value")
ENCODER = "prefix_encoder"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixConfig:
    """Prefix-tuning hyper-parameters, named as in PEFT's PrefixTuningConfig."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # train through PEFT's Embedding -> Linear -> Tanh -> Linear
    encoder_hidden_size: int | None = None  # H' of that MLP (default: K*E, PEFT's default)
    init_weights: str | None = None  # None: N(0, 1) like PEFT's torch Embedding; "zero": zero prefixes

    def __post_init__(self) -> None:
        problems = vt.check_count(self.num_virtual_tokens, "prefix tuning")
        if self.encoder_hidden_size is not None:
            if not self.prefix_projection:
                problems.append(f"encoder_hidden_size={self.encoder_hidden_size} sizes the prefix_projection MLP; "
                                "set prefix_projection=True or drop it")
            elif self.encoder_hidden_size < 1:
                problems.append(f"encoder_hidden_size={self.encoder_hidden_size}: must be at least 1")
        if self.init_weights not in (None, "zero"):
            problems.append(f"init_weights={self.init_weights!r}: use None (random) or 'zero'")
        if problems:
            raise ConfigError("invalid prefix-tuning config:\n" + bullet_list(problems))


class Prefix(Method):
    name = "prefix"
    config_cls = PrefixConfig
    identity_at_init = False  # the prefixes change attention from the first step
    peft_type = "PREFIX_TUNING"

    def prepare(self, config: PrefixConfig, *, model_config: Any, tokenizer: Any = None) -> PrefixConfig:
        vt.check_fits_context(config.num_virtual_tokens, model_config)
        return config

    def init(self, key: jax.Array, params: Mapping, config: PrefixConfig) -> dict:
        vt.refuse_virtual(params)
        shapes = vt.base_shapes(params)
        p, w, n = config.num_virtual_tokens, shapes["kv_width"], shapes["layers"]
        zero = config.init_weights == "zero"
        flat = flatten_params(params)
        if not config.prefix_projection:
            keys = jax.random.split(key, 2 * n)
            for i in range(n):
                for j, leaf in enumerate(PREFIX_LEAVES):
                    value = jnp.zeros((p, w)) if zero else jax.random.normal(keys[2 * i + j], (p, w), jnp.float32)
                    flat[("model", "layers", str(i), "self_attn", leaf)] = value
            return unflatten_params(flat)
        hidden = config.encoder_hidden_size or w
        k_emb, k0, k0b, k2, k2b = jax.random.split(key, 5)

        def torch_uniform(k, shape, fan_in):  # torch Linear's default init: U(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

        out = 2 * n * w
        flat[(ENCODER, "embedding")] = jax.random.normal(k_emb, (p, w), jnp.float32)
        flat[(ENCODER, "transform_0", "kernel")] = torch_uniform(k0, (w, hidden), w)
        flat[(ENCODER, "transform_0", "bias")] = torch_uniform(k0b, (hidden,), w)
        flat[(ENCODER, "transform_2", "kernel")] = jnp.zeros((hidden, out)) if zero else torch_uniform(
            k2, (hidden, out), hidden)
        flat[(ENCODER, "transform_2", "bias")] = jnp.zeros((out,)) if zero else torch_uniform(k2b, (out,), hidden)
        return unflatten_params(flat)

    def is_adapter(self, path: Path, config: Any) -> bool:
        return path[0] == ENCODER or path[-1] in PREFIX_LEAVES

    def save(self, path: Any, params: Mapping, config: PrefixConfig, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        """A PEFT PREFIX_TUNING folder: the (projected) prefixes as `prompt_embeddings` (P, L*2*K*E)."""
        try:
            layers = prefix_layers(params, model_config)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"nothing to save: {e}. Pass the full tree with the adapter, e.g. "
                              "Prefix().combine(adapter, base), or run Prefix().init first") from e
        p = int(layers[0][0].shape[0])
        if p != config.num_virtual_tokens:
            raise ConfigError(f"the prefixes hold {p} virtual tokens but the config says {config.num_virtual_tokens}; "
                              "pass the PrefixConfig the adapter was created with")
        embeddings = np.concatenate([np.asarray(x, np.float32) for kv in layers for x in kv], axis=1)
        cfg = prompt_learning.peft_common(model_config, peft_type=self.peft_type, num_virtual_tokens=p,
                             token_dim=model_config.kv_dim, heads=model_config.num_key_value_heads,
                             base_model_name_or_path=base_model_name_or_path)
        # The projection MLP is a training device: the folder holds its output, so PEFT must not rebuild it.
        cfg.update(prefix_projection=False, encoder_hidden_size=config.encoder_hidden_size or model_config.kv_dim,
                   modules_to_save=None)
        prompt_learning.write_folder(path, cfg, embeddings, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, PrefixConfig]:
        """Reads a PEFT PREFIX_TUNING folder (ours or PEFT's, with or without prefix_projection) onto `params`."""
        raw, emb = prompt_learning.read_folder(path, self.peft_type)
        c = model.config
        n, w = c.num_hidden_layers, c.kv_dim
        prompt_learning.check_fits_model(path, {
            "num_layers": (raw.get("num_layers"), n),
            "token_dim (kv heads x head dim)": (raw.get("token_dim"), w),
            "num_attention_heads (kv heads)": (raw.get("num_attention_heads"), c.num_key_value_heads),
            "prompt_embeddings shape": (tuple(emb.shape), (raw.get("num_virtual_tokens", emb.shape[0]), 2 * n * w)),
        })
        config = PrefixConfig(num_virtual_tokens=int(emb.shape[0]))
        vt.check_fits_context(config.num_virtual_tokens, c)
        vt.refuse_virtual(params)
        flat = flatten_params(params)
        for i in range(n):
            for j, leaf in enumerate(PREFIX_LEAVES):
                block = emb[:, (2 * i + j) * w:(2 * i + j + 1) * w]
                flat[("model", "layers", str(i), "self_attn", leaf)] = jnp.asarray(block)
        return model, unflatten_params(flat), config



def prefix_source(params: Any) -> jax.Array | None:
    """The leaf whose first axis is prefix tuning's P: the `prefix_encoder` embedding or layer 0's
    `prefix_key`; None when the parameters carry no prefix."""
    if ENCODER in params:
        return params[ENCODER]["embedding"]
    attn = params.get("model", {}).get("layers", {}).get("0", {}).get("self_attn", {})
    return attn.get("prefix_key")


def prefix_projection(encoder: Any) -> jax.Array:
    """PEFT's prefix reparameterisation, Embedding -> Linear -> Tanh -> Linear, in fp32: the (P, L*2*K*E)
    prefixes from `embedding` (P, K*E), `transform_0` (K*E -> H') and `transform_2` (H' -> L*2*K*E)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    t0, t2 = encoder["transform_0"], encoder["transform_2"]
    h = jnp.tanh(f32(encoder["embedding"]) @ f32(t0["kernel"]) + f32(t0["bias"]))
    return h @ f32(t2["kernel"]) + f32(t2["bias"])


def prefix_layers(params: Any, config: Any) -> list[tuple[jax.Array, jax.Array]]:
    """Prefix tuning's (key, value) prefixes per layer, each (P, K*E): the `prefix_key`/`prefix_value` leaves
    of every layer's self_attn, or the `prefix_encoder` output split as PEFT lays it out (column block 2l is
    layer l's keys, 2l+1 its values)."""
    n, w = config.num_hidden_layers, config.kv_dim
    if ENCODER in params:
        flat = prefix_projection(params[ENCODER])
        if flat.shape[1] != 2 * n * w:
            raise ValueError(f"prefix_encoder gives {flat.shape[1]} columns; this model needs 2 x {n} layers x "
                             f"{w} (kv heads x head dim) = {2 * n * w}")
        return [(flat[:, 2 * i * w:(2 * i + 1) * w], flat[:, (2 * i + 1) * w:(2 * i + 2) * w]) for i in range(n)]
    layers = params["model"]["layers"]
    attn = [layers[str(i)]["self_attn"] for i in range(n)]
    if "prefix_key" not in attn[0]:
        raise ValueError("the parameters carry no prefix (model/layers/0/self_attn/prefix_key or prefix_encoder)")
    want = (jnp.shape(attn[0]["prefix_key"])[0], w)
    shapes = [tuple(jnp.shape(a[k])) if k in a else None for a in attn for k in PREFIX_LEAVES]
    bad = [f"layer {i // 2} {('key', 'value')[i % 2]}: {got}" for i, got in enumerate(shapes) if got != want]
    if bad:
        raise ValueError(f"prefix tuning needs prefix_key and prefix_value of shape {want} in every layer; found "
                         f"{bad}")
    return [(a["prefix_key"], a["prefix_value"]) for a in attn]


def _count(params: Mapping) -> int:
    source = prefix_source(params)
    return 0 if source is None else int(source.shape[0])


def _layer_kv(params: Mapping, config: Any, run_embeddings: Any) -> list[hooks.LayerKV]:
    """The prefixes as they are (not rotated: PEFT passes them as past keys), reshaped to (P, K, E)."""
    del run_embeddings
    k, e = config.num_key_value_heads, config.head_dim
    return [(key.reshape(-1, k, e), value.reshape(-1, k, e)) for key, value in prefix_layers(params, config)]


VIRTUAL_SOURCE = hooks.VirtualTokenSource(name="prefix", description="prefix tuning", count=_count,
                                          layer_kv=_layer_kv, top_keys=(ENCODER,), attention_leaves=PREFIX_LEAVES)
