"""The dense reference of the MoE MLP: every expert on every token, combined with the router's weights.

Shape legend: N tokens, H hidden, I expert intermediate width, E experts, K experts per token.
Expert weights in transformers 5.24's fused layout (torch (out, in) per expert):
    gate_up_ExFxH  (E, 2I, H)   rows [0, I) the gate projection, [I, 2I) the up projection
    down_ExHxI     (E, H, I)
It is the spec of the grouped implementations and the "dense-all-experts" side of bench/moe_step.py: its cost
is E/K times the active experts' work, never what a model should run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def swiglu(gate_up_xF: jax.Array) -> jax.Array:
    """silu(gate) * up of a fused (..., 2I) projection (silu in fp32, as ops.silu)."""
    gate, up = jnp.split(gate_up_xF, 2, axis=-1)
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up


def expert_mlp_dense(x_NxH: jax.Array, gate_up_ExFxH: jax.Array, down_ExHxI: jax.Array, experts_NxK: jax.Array,
                     weights_NxK: jax.Array, dtype: Any) -> jax.Array:
    """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]), computing all E experts on all N tokens."""
    x = x_NxH.astype(dtype)
    h_ExNxF = jnp.einsum("nh,efh->enf", x, gate_up_ExFxH.astype(dtype))
    y_ExNxH = jnp.einsum("eni,ehi->enh", swiglu(h_ExNxF), down_ExHxI.astype(dtype))
    e = gate_up_ExFxH.shape[0]
    # combine_NxE[n, e]: the router weight of expert e for token n (0 where e is not among its K).
    combine_NxE = jnp.sum(jax.nn.one_hot(experts_NxK, e, dtype=weights_NxK.dtype) * weights_NxK[..., None], axis=1)
    out = jnp.einsum("enh,ne->nh", y_ExNxH.astype(combine_NxE.dtype), combine_NxE)
    return out.astype(dtype)
