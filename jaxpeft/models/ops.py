"""The model's primitive ops as pure functions: the one `linear` op, RMSNorm, RoPE (attention: kernels/attention).

Shape legend: B batch, S query length, T key length, D model width, H query heads, K kv heads,
G = H // K query heads per kv head, E head dim, I in features, O out features, R LoRA rank, F rope freqs.

`linear` is the single place a weight meets an activation. It reads a module's leaves (a dict):
`kernel` (I, O) or a quantized kernel under `qkernel`; optional `bias` (O,); and the leaves of any
registered linear adapter (`hooks.LinearAdapter`: e.g. LoRA's, IA3's). Any other leaf is an error, so
an adapter the op does not understand can never be silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxpeft.kernels.dense import dense_matmul, needs_tied_matmul
from jaxpeft.models import hooks


def dense_kernel(leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    """The module's kernel as a dense (I, O) array of `dtype`: a `kernel`, or a quantized kernel under
    `qkernel` (any object with the quantized kernel protocol's `dequantize(dtype)`)."""
    if "kernel" in leaves:
        return jnp.asarray(leaves["kernel"]).astype(dtype)
    if "qkernel" in leaves:
        return leaves["qkernel"].dequantize(dtype)
    raise KeyError(f"no kernel among the leaves {sorted(leaves)}")


def _base_matmul(x: jax.Array, leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    if "kernel" not in leaves and "qkernel" in leaves:
        return leaves["qkernel"].matmul(x, dtype)  # the format's own matmul (NF4: without a dense weight)
    kernel = jnp.asarray(leaves["kernel"])
    if needs_tied_matmul(kernel.dtype, dtype):
        return dense_matmul(x, kernel, jnp.dtype(dtype))  # the converted weight lives only around its dot
    return x @ kernel


def linear(
    x_BxI: jax.Array,
    leaves: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """y = x W (+ b), with whatever registered adapters the leaves carry (`hooks.LinearAdapter`: LoRA/DoRA,
    IA3, ...). `dropout` acts on the input of the adapters that use it."""
    known = {"kernel", "qkernel", "bias", *hooks.linear_leaf_names()}
    unknown = sorted(set(leaves) - known)
    if unknown:
        raise ValueError(f"linear got leaves it does not understand: {unknown} (known: {sorted(known)}); an adapter's "
                         "leaves are honoured once its method has registered a hooks.LinearAdapter for them")
    active = hooks.active_linear(leaves)
    x = x_BxI.astype(dtype)
    for hook in active:
        if hook.scale_input is not None:
            x = hook.scale_input(x, leaves, dtype)
    y = _base_matmul(x, leaves, dtype)
    x_dropped = dropout(x) if dropout is not None else x
    for hook in active:
        if hook.add_to_output is not None:
            y = hook.add_to_output(x, x_dropped, y, leaves, dtype, dropout is not None)
    if "bias" in leaves:
        y = y + jnp.asarray(leaves["bias"]).astype(dtype)
    for hook in active:
        if hook.scale_output is not None:
            y = hook.scale_output(y, leaves, dtype)
    return y


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in fp32 and rounded once to x's dtype (torch's bf16 silu does the same)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch's gelu(approximate="tanh"), Gemma's GeGLU), in fp32."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention and final-logit soft-capping)."""
    return jnp.tanh(x / cap) * cap


def offset_rms_norm(x_BxSxD: jax.Array, weight_D: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """Gemma's RMSNorm: normalise and scale by (1 + w) in fp32, cast back once."""
    x32 = x_BxSxD.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps) * (1.0 + weight_D.astype(jnp.float32))).astype(dtype)


def rms_norm(x_BxSxD: jax.Array, weight_D: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """HF Llama RMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x_BxSxD.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)
    return weight_D.astype(dtype) * normed


def rope_cos_sin(positions_BxS: jax.Array, inv_freq_F: jax.Array, dtype: Any,
                 scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, 2F] in the HF rotate-half layout, computed in fp32 (times `scale`: LongRoPE's
    attention factor)."""
    freqs = positions_BxS.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_BxSxHxE: jax.Array, cos_BxSxE: jax.Array, sin_BxSxE: jax.Array) -> jax.Array:
    """Rotate-half RoPE; tables narrower than E (partial rotary, Phi-3) rotate the first features only."""
    rotary = cos_BxSxE.shape[-1]
    if rotary < x_BxSxHxE.shape[-1]:
        rotated = apply_rope(x_BxSxHxE[..., :rotary], cos_BxSxE, sin_BxSxE)
        return jnp.concatenate([rotated, x_BxSxHxE[..., rotary:]], axis=-1)
    half = x_BxSxHxE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxSxHxE[..., half:], x_BxSxHxE[..., :half]], axis=-1)
    return x_BxSxHxE * cos_BxSxE[:, :, None, :] + rotated * sin_BxSxE[:, :, None, :]

