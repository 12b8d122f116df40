"""cuDNN flash attention on a GPU, through `jax.nn.dot_product_attention(implementation="cudnn")`.

What cuDNN's fused kernel takes through that call: bf16/fp16, causal, GQA, right padding (as key
lengths), a sliding window (`local_window_size`). It has no segment ids, no soft-capping, no
left padding, no query offset and no fp32; those cases take the blockwise path (`supports` says why).

Shape legend: B batch, S queries, T keys, H query heads, K kv heads, E head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.kernels.attention.mask import AttentionMask

DTYPES = ("bfloat16", "float16")


def cudnn_attention(q_BxSxHxE: jax.Array, k_BxTxKxE: jax.Array, v_BxTxKxE: jax.Array, mask: AttentionMask,
                    dtype: Any, *, scale: float | None = None) -> jax.Array:
    """Attention through cuDNN; the mask must be causal, right padded, without segments or offset."""
    b, s, h, e = q_BxSxHxE.shape
    kv_lengths_B = jnp.sum(mask.key_valid_BxT > 0, axis=1).astype(jnp.int32)
    window = None if mask.window is None else (mask.window - 1, 0)  # (left, right) keys besides the query's own
    out = jax.nn.dot_product_attention(
        q_BxSxHxE.astype(dtype), k_BxTxKxE.astype(dtype), v_BxTxKxE.astype(dtype),
        scale=e ** -0.5 if scale is None else scale, is_causal=mask.causal, key_value_seq_lengths=kv_lengths_B,
        local_window_size=window, implementation="cudnn")
    return out.reshape(b, s, h * e).astype(dtype)


__all__ = ["DTYPES", "cudnn_attention"]
