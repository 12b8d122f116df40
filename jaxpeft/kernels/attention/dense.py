"""The dense attention: every score materialised. The reference the other implementations are tested against.

Shape legend: B batch, S queries, T keys, H query heads, K kv heads, G = H // K, E head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dense_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    allowed_BxSxT: jax.Array,
    dtype: Any,
    *,
    scale: float | None = None,
    logit_cap: float | None = None,
) -> jax.Array:
    """Grouped-query softmax attention; `allowed` is the boolean mask (causal, padding, window).

    `scale` multiplies the scores (default E ** -0.5); `logit_cap` soft-caps them before the mask (Gemma 2)."""
    b, s, h, e = q_BxSxHxE.shape
    k = k_BxTxKxE.shape[2]
    q = q_BxSxHxE.reshape(b, s, k, h // k, e)
    # Scores and the weighted sum accumulate in fp32 and are not rounded to a bf16 `dtype` before the
    # softmax (as torch's CPU and flash SDPA kernels do); only the probabilities and the output are.
    scores = jnp.einsum("bskge,btke->bkgst", q, k_BxTxKxE, preferred_element_type=jnp.float32) * (
        e ** -0.5 if scale is None else scale)
    if logit_cap is not None:
        scores = jnp.tanh(scores / logit_cap) * logit_cap
    scores = jnp.where(allowed_BxSxT[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgst,btke->bskge", probs, v_BxTxKxE, preferred_element_type=jnp.float32).astype(dtype)
    return out.reshape(b, s, h * e)


__all__ = ["dense_attention"]
