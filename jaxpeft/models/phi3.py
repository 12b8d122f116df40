"""Phi-3 / Phi-4-mini: a Llama-family decoder with fused projections, partial rotary and LongRoPE.

What differs from Llama, all of it here:
- `self_attn.qkv_proj` (D, H*E + 2*K*E) is q, k and v side by side, `mlp.gate_up_proj` (D, 2*I) gate then up:
  one linear each, so adapters (LoRA, IA3) target them as PEFT does, by those names;
- `partial_rotary_factor`: RoPE turns the first `rotary_dim` features of each head only;
- LongRoPE (`rope_type: longrope`): inverse frequencies divided by `short_factor`, or by `long_factor` when the
  call's longest position passes `original_max_position_embeddings` (transformers' rule: one choice per call,
  from max(position) + 1), and cos/sin scaled by the attention factor. Generation follows transformers'
  Phi-3 `prepare_inputs_for_generation`: the step whose sequence first reaches
  `original_max_position_embeddings + 1` tokens recomputes the whole cache (`generation_recompute_length`);
- one `sliding_window` for every layer (Llama's rule).

Canonical tree: Llama's, with self_attn/{qkv_proj,o_proj}/kernel and mlp/{gate_up_proj,down_proj}/kernel.
Shape legend: B batch, S length, D hidden, H/K query/kv heads, E head dim, R rotary dim, F = R // 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.models import config as llama_config
from jaxpeft.kernels.attention import attention
from jaxpeft.models import hooks, llama, ops
from jaxpeft.models.causal_lm import write_cache
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.layers import Linear

ARCHITECTURE = "Phi3ForCausalLM"
_PHI3_KEYS = {"resid_pdrop", "embd_pdrop", "original_max_position_embeddings", "auto_map"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phi3Config(LlamaConfig):
    """Shapes and options of a Phi-3 decoder (the Llama fields plus partial rotary and LongRoPE)."""

    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    short_factor: tuple[float, ...] = ()  # LongRoPE only, F values each
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None  # LongRoPE's cos/sin scale; None: transformers' default from the factor
    model_type: str = "phi3"

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    @property
    def gate_up_dim(self) -> int:
        return 2 * self.intermediate_size

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def generation_recompute_length(self) -> int | None:
        return self.original_max_position_embeddings

    def base_inv_freq(self) -> np.ndarray:
        """Inverse frequencies (float32, [F]) over the rotary features; LongRoPE's short set."""
        return self._inv_freq(self.short_factor)

    def long_inv_freq(self) -> np.ndarray:
        return self._inv_freq(self.long_factor)

    def _inv_freq(self, ext: tuple[float, ...]) -> np.ndarray:
        dim = self.rotary_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        powers = (np.float32(self.rope_theta) ** exponent).astype(np.float32)
        if self.rope_type == "longrope":
            powers = (np.asarray(ext, np.float32) * powers).astype(np.float32)
        inv_freq = (1.0 / powers).astype(np.float32)
        if self.rope_type == "linear":
            inv_freq = inv_freq / np.float32(self.rope()["factor"])
        return inv_freq.astype(np.float32)

    def rope_scale(self) -> float:
        """LongRoPE's attention factor (transformers' `_compute_longrope_parameters`); 1.0 otherwise."""
        if self.rope_type != "longrope":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        factor = self.rope().get("factor", self.max_position_embeddings / self.original_max_position_embeddings)
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Phi3Config":
        """Builds a config from a Phi-3 `config.json` dict; one error lists every unsupported field."""
        if hf.get("model_type") != "phi3":
            raise UnsupportedModelError(f"Phi3Config reads model_type 'phi3', got {hf.get('model_type')!r}")
        problems: list[str] = []
        bad_archs = [a for a in hf.get("architectures") or [] if a != ARCHITECTURE]
        if bad_archs:
            problems.append(f"architectures={bad_archs} (expected [{ARCHITECTURE!r}])")
        known = llama_config._HARMLESS | llama_config._ROPE_KEYS | llama_config._MODEL_KEYS | _PHI3_KEYS
        problems += [f"{k}={hf[k]!r} (unknown field)" for k in sorted(set(hf) - known)]
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is implemented)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                problems.append(f"{key}=True (Phi-3 has no biases)")
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
        max_pos = int(hf.get("max_position_embeddings", 4096))
        merged = {**dict(hf.get("rope_scaling") or {}), **dict(hf.get("rope_parameters") or {})}
        partial = float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        original = int(merged.get("original_max_position_embeddings",
                                  hf.get("original_max_position_embeddings", max_pos)))
        if int(head_dim * partial) % 2:
            problems.append(f"partial_rotary_factor={partial} gives an odd rotary width {int(head_dim * partial)} "
                            "(only even widths)")
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
        short = long = ()
        attention_factor = None
        params: dict[str, float] = {}
        if rope_type == "longrope":
            short, long = (tuple(float(x) for x in merged.get(k) or ()) for k in ("short_factor", "long_factor"))
            half = int(head_dim * partial) // 2
            if len(short) != half or len(long) != half:
                problems.append(f"longrope short_factor/long_factor need {half} values each, got {len(short)} and "
                                f"{len(long)}")
            if merged.get("factor") is not None:
                params["factor"] = float(merged["factor"])
            if merged.get("attention_factor") is not None:
                attention_factor = float(merged["attention_factor"])
        elif rope_type in ("default", "linear"):
            rest = {k: v for k, v in merged.items() if k not in ("partial_rotary_factor", "original_max_position_embeddings")}
            rope_type, theta, params = llama_config._parse_rope({"rope_parameters": rest, "rope_theta": theta},
                                                                problems)
        else:
            problems.append(f"rope type {rope_type!r} (Phi-3 supports default, linear and longrope)")
        llama_config.raise_unsupported("phi3", problems)
        eos = hf.get("eos_token_id")
        window = hf.get("sliding_window")
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=theta,
            rope_type=rope_type, rope_params=tuple(sorted(params.items())), max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None, partial_rotary_factor=partial,
            original_max_position_embeddings=original, short_factor=short, long_factor=long,
            attention_factor=attention_factor, bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.get("pad_token_id"))

    def to_hf(self) -> dict[str, Any]:
        """The Phi-3 `config.json` dict that transformers loads into the same model."""
        out = {"architectures": [ARCHITECTURE], "model_type": "phi3", **self.shared_hf()}
        del out["rope_scaling"]
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor, **self.rope()}
        if self.rope_type == "longrope":
            rope.update(short_factor=list(self.short_factor), long_factor=list(self.long_factor),
                        original_max_position_embeddings=self.original_max_position_embeddings)
            if self.attention_factor is not None:
                rope["attention_factor"] = self.attention_factor
        out.update(rope_parameters=rope, partial_rotary_factor=self.partial_rotary_factor,
                   original_max_position_embeddings=self.original_max_position_embeddings,
                   sliding_window=self.sliding_window, attention_bias=False)
        return out


class Attention(nn.Module):
    config: Phi3Config
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask, layer_cache):
        c = self.config
        dense = lambda n, f: Linear(  # noqa: E731
            f, False, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n)
        hooks.check_known("attention", list(self.variables.get("params", {})), ("qkv_proj", "o_proj"))
        b, s, _ = x_BxSxD.shape
        qkv = dense("qkv_proj", c.qkv_dim)(x_BxSxD)
        q = qkv[..., :c.q_dim].reshape(b, s, c.num_attention_heads, c.head_dim)
        k = qkv[..., c.q_dim:c.q_dim + c.kv_dim].reshape(b, s, c.num_key_value_heads, c.head_dim)
        v = qkv[..., c.q_dim + c.kv_dim:].reshape(b, s, c.num_key_value_heads, c.head_dim)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        k, v, new_cache = write_cache(layer_cache, k, v, self.dtype)
        return dense("o_proj", c.hidden_size)(attention(q, k, v, mask, self.dtype)), new_cache


class MLP(nn.Module):
    config: Phi3Config
    dtype: Any
    param_dtype: Any
    dropout_rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        dense = lambda n, f: Linear(  # noqa: E731
            f, False, self.dtype, self.param_dtype, self.dropout_rate, self.deterministic, name=n)
        gate_up = dense("gate_up_proj", c.gate_up_dim)(x_BxSxD)
        gate, up = gate_up[..., :c.intermediate_size], gate_up[..., c.intermediate_size:]
        return dense("down_proj", c.hidden_size)(up * ops.silu(gate))


class DecoderLayer(llama.DecoderLayer):
    attention_cls = Attention
    mlp_cls = MLP


class DecoderStack(llama.DecoderStack):
    layer_cls = DecoderLayer


class Phi3Model(llama.LlamaModel):
    stack_cls = DecoderStack

    def rope_tables(self, positions_BxS: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin (B, S, R): LongRoPE picks its long factors when the call's longest position passes
        original_max_position_embeddings (transformers: max(position_ids) + 1 > original)."""
        c = self.config
        inv_freq = jnp.asarray(c.base_inv_freq())
        if c.rope_type == "longrope":
            past = jnp.max(positions_BxS) + 1 > c.original_max_position_embeddings
            inv_freq = jnp.where(past, jnp.asarray(c.long_inv_freq()), inv_freq)
        return ops.rope_cos_sin(positions_BxS, inv_freq, self.dtype, scale=c.rope_scale())


class Phi3ForCausalLM(llama.LlamaForCausalLM):
    """The Phi-3 causal LM (the shared call, cache and head are `CausalLM`'s)."""

    model_cls = Phi3Model
