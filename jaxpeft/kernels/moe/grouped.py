"""The MoE MLP computed for the active experts only, capacity-free (no token is dropped).

Shape legend: N tokens, H hidden, I expert intermediate width, F = 2I, E experts, K experts per token,
M = N*K (token, expert) pairs, T tile rows, G tiles, P = G*T padded pair slots.

Grouped (any platform): the M pairs are sorted by expert id (stable, so a token's pairs keep their order); each
expert's group is padded to a multiple of T rows, so every tile of T rows belongs to one expert; the tiles'
expert weights are gathered and one batched matmul runs per tile (G, T, H) x (G, F, H); the outputs, weighted by
the router's probabilities, are scatter-added back to their tokens. The padding is static: at most E*(T-1) slots
beyond the M real pairs (G = ceil(M/T) + E, a bound, whatever the routing), and padded slots carry weight 0.
The work is M + E*(T-1) rows against the dense reference's N*E.

ragged_dot (GPU only): the sorted pairs go to `jax.lax.ragged_dot` with the per-expert group sizes, no padding.
On the CPU jax 0.10.2 lowers ragged_dot to a dense dot over every expert (measured by the dispatch's choice; see
`api.supports`), so it is never the CPU default.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.kernels.moe.reference import swiglu


def tile_size(pairs: int, experts: int) -> int:
    """T: a power of two near the mean group size M/E (a tile or two per expert), between 8 and 128."""
    mean = max(1, -(-pairs // experts))
    t = 8
    while t < mean and t < 128:
        t *= 2
    return t


def _sorted_pairs(experts_NxK: jax.Array, e: int):
    """(order_M: pair index of each sorted slot, sizes_E: pairs per expert, expert_M: sorted expert ids)."""
    flat_M = experts_NxK.reshape(-1).astype(jnp.int32)
    order_M = jnp.argsort(flat_M, stable=True)
    sizes_E = jnp.bincount(flat_M, length=e)
    return order_M, sizes_E, flat_M[order_M]


def expert_mlp_grouped(x_NxH: jax.Array, gate_up_ExFxH: jax.Array, down_ExHxI: jax.Array, experts_NxK: jax.Array,
                       weights_NxK: jax.Array, dtype: Any, *, tile: int | None = None) -> jax.Array:
    """The same values as `reference.expert_mlp_dense` (see the module docstring for how)."""
    n, k = experts_NxK.shape
    e = gate_up_ExFxH.shape[0]
    m = n * k
    t = tile or tile_size(m, e)
    g = -(-m // t) + e  # tiles: every expert's padding is below T, so ceil(M/T) + E always suffice
    order_M, sizes_E, expert_M = _sorted_pairs(experts_NxK, e)
    padded_E = -(-sizes_E // t) * t
    start_E = jnp.cumsum(sizes_E) - sizes_E  # first sorted slot of each expert
    pstart_E = jnp.cumsum(padded_E) - padded_E  # first padded slot of each expert
    slot_M = pstart_E[expert_M] + (jnp.arange(m) - start_E[expert_M])  # padded slot of each sorted pair
    p = g * t
    token_P = jnp.zeros((p,), jnp.int32).at[slot_M].set((order_M // k).astype(jnp.int32))
    weight_P = jnp.zeros((p,), weights_NxK.dtype).at[slot_M].set(weights_NxK.reshape(-1)[order_M])
    # Expert of each tile: the expert whose padded range holds the tile's first slot (tiles past the end: the
    # last expert, all their slots weight 0).
    tile_start_G = jnp.arange(g) * t
    tile_expert_G = jnp.clip(jnp.searchsorted(jnp.cumsum(padded_E), tile_start_G, side="right"), 0, e - 1)
    x_GxTxH = x_NxH.astype(dtype)[token_P].reshape(g, t, -1)
    w_gu_GxFxH = gate_up_ExFxH.astype(dtype)[tile_expert_G]
    w_down_GxHxI = down_ExHxI.astype(dtype)[tile_expert_G]
    h_GxTxF = jnp.einsum("gth,gfh->gtf", x_GxTxH, w_gu_GxFxH)
    y_GxTxH = jnp.einsum("gti,ghi->gth", swiglu(h_GxTxF), w_down_GxHxI)
    y_PxH = y_GxTxH.reshape(p, -1).astype(weight_P.dtype) * weight_P[:, None]
    out = jnp.zeros((n, y_PxH.shape[-1]), y_PxH.dtype).at[token_P].add(y_PxH)
    return out.astype(dtype)


def expert_mlp_ragged(x_NxH: jax.Array, gate_up_ExFxH: jax.Array, down_ExHxI: jax.Array, experts_NxK: jax.Array,
                      weights_NxK: jax.Array, dtype: Any) -> jax.Array:
    """The same values through `jax.lax.ragged_dot` over the expert-sorted pairs (for GPUs; see the docstring)."""
    n, k = experts_NxK.shape
    e = gate_up_ExFxH.shape[0]
    order_M, sizes_E, _ = _sorted_pairs(experts_NxK, e)
    token_M = (order_M // k).astype(jnp.int32)
    x_MxH = x_NxH.astype(dtype)[token_M]
    h_MxF = jax.lax.ragged_dot(x_MxH, jnp.swapaxes(gate_up_ExFxH.astype(dtype), 1, 2), sizes_E)
    y_MxH = jax.lax.ragged_dot(swiglu(h_MxF), jnp.swapaxes(down_ExHxI.astype(dtype), 1, 2), sizes_E)
    w_M = weights_NxK.reshape(-1)[order_M]
    y_MxH = y_MxH.astype(w_M.dtype) * w_M[:, None]
    return jnp.zeros((n, y_MxH.shape[-1]), y_MxH.dtype).at[token_M].add(y_MxH).astype(dtype)
