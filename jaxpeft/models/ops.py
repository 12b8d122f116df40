"""The model's primitive ops as pure functions: the one `linear` op, RMSNorm, RoPE, attention.

Shape legend: B batch, S query length, T key length, D model width, H query heads, K kv heads,
G = H // K query heads per kv head, E head dim, I in features, O out features, R LoRA rank, F rope freqs.

`linear` is the single place a weight meets an activation. It reads a module's leaves (a dict):
`kernel` (I, O) or a quantized kernel under `qkernel`; optional `bias` (O,); optional LoRA leaves
`lora_a` (I, R), `lora_b` (R, O), `lora_scale` (), and the DoRA `lora_magnitude` (O,); optional IA3
scales `ia3_in` (I,) (multiplies the input) and `ia3_out` (O,) (multiplies the output, bias included,
as PEFT does). Any other leaf is an error, so an adapter the op does not understand can never be
silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

_LORA_KEYS = {"lora_a", "lora_b", "lora_scale", "lora_magnitude"}
_IA3_KEYS = {"ia3_in", "ia3_out"}


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
    return x @ dense_kernel(leaves, dtype)


def linear(
    x_BxI: jax.Array,
    leaves: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """y = x W (+ b), plus whatever adapter the leaves carry (LoRA, DoRA, IA3). `dropout` acts on the LoRA path."""
    known = {"kernel", "qkernel", "bias", *_LORA_KEYS, *_IA3_KEYS}
    unknown = sorted(set(leaves) - known)
    if unknown:
        raise ValueError(f"linear got leaves it does not understand: {unknown} (known: {sorted(known)})")
    x = x_BxI.astype(dtype)
    if "ia3_in" in leaves:  # PEFT: scale in the vector's dtype (fp32), then back to the compute dtype
        x = (x * jnp.asarray(leaves["ia3_in"])).astype(dtype)
    y = _base_matmul(x, leaves, dtype)
    if "lora_a" in leaves:
        a_IxR = jnp.asarray(leaves["lora_a"]).astype(dtype)
        b_RxO = jnp.asarray(leaves["lora_b"]).astype(dtype)
        scale = jnp.asarray(leaves["lora_scale"]).astype(dtype)
        x_lora = dropout(x) if dropout is not None else x
        lora = ((x_lora @ a_IxR) @ b_RxO) * scale
        if "lora_magnitude" in leaves:
            y = _dora(x, x_lora, y, lora, leaves, dtype, dropout is not None)
        else:
            y = y + lora
    if "bias" in leaves:
        y = y + jnp.asarray(leaves["bias"]).astype(dtype)
    if "ia3_out" in leaves:
        y = (y * jnp.asarray(leaves["ia3_out"])).astype(dtype)
    return y


def lora_delta(leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    """The LoRA update of a module's kernel, scale · A B, as an (I, O) array of `dtype`."""
    a_IxR = jnp.asarray(leaves["lora_a"]).astype(dtype)
    b_RxO = jnp.asarray(leaves["lora_b"]).astype(dtype)
    return (a_IxR @ b_RxO) * jnp.asarray(leaves["lora_scale"]).astype(dtype)


def _dora(x, x_lora, y, lora, leaves, dtype, has_dropout):
    """DoRA as PEFT computes it: magnitude / ||W + s·BA|| (norm over inputs, no gradient) rescales the output."""
    w_IxO = dense_kernel(leaves, dtype)
    delta_IxO = lora_delta(leaves, dtype)
    norm_O = jax.lax.stop_gradient(jnp.linalg.norm(w_IxO + jax.lax.stop_gradient(delta_IxO), axis=0))
    mag_scale_O = jnp.asarray(leaves["lora_magnitude"]).astype(dtype) / norm_O
    # With dropout PEFT recomputes the base term on the dropped input.
    base = (x_lora @ w_IxO) if has_dropout else y
    return y + (mag_scale_O - 1) * base + mag_scale_O * lora


def rms_norm(x_BxSxD: jax.Array, weight_D: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """HF Llama RMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x_BxSxD.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)
    return weight_D.astype(dtype) * normed


def rope_cos_sin(positions_BxS: jax.Array, inv_freq_F: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, 2F] in the HF rotate-half layout, computed in fp32."""
    freqs = positions_BxS.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_BxSxHxE: jax.Array, cos_BxSxE: jax.Array, sin_BxSxE: jax.Array) -> jax.Array:
    half = x_BxSxHxE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxSxHxE[..., half:], x_BxSxHxE[..., :half]], axis=-1)
    return x_BxSxHxE * cos_BxSxE[:, :, None, :] + rotated * sin_BxSxE[:, :, None, :]


def attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    allowed_BxSxT: jax.Array,
    dtype: Any,
) -> jax.Array:
    """Grouped-query softmax attention; `allowed` is the boolean mask (causal, padding, window)."""
    b, s, h, e = q_BxSxHxE.shape
    k = k_BxTxKxE.shape[2]
    q = q_BxSxHxE.reshape(b, s, k, h // k, e)
    scores = jnp.einsum("bskge,btke->bkgst", q, k_BxTxKxE).astype(jnp.float32) * (e ** -0.5)
    scores = jnp.where(allowed_BxSxT[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgst,btke->bskge", probs, v_BxTxKxE)
    return out.reshape(b, s, h * e)
