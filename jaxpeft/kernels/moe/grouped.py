"""The MoE MLP computed for the active experts only, capacity-free (no token is dropped).

Shape legend: N tokens, H hidden, I expert intermediate width, F = 2I, E experts, K experts per token,
M = N*K (token, expert) pairs, T tile rows, G tiles, P = G*T padded pair slots.

Grouped (any platform): the M pairs are sorted by expert id (stable, so a token's pairs keep their order); each
expert's group is padded to a multiple of T rows, so every tile of T rows belongs to one expert; the tiles run one
after another under `lax.scan`, each reading its expert's weights by index and doing one (T, H) x (H, F) matmul
(gathering every tile's weights into a (G, F, H) batch instead copies the weights G times: 1.5x slower measured,
bench numbers in BUILD_NOTES); the outputs, weighted by the router's probabilities, are scatter-added back to their
tokens. The padding is static: at most E*(T-1) slots
beyond the M real pairs (G = ceil(M/T) + E, a bound, whatever the routing), and padded slots carry weight 0.
The work is M + E*(T-1) rows against the dense reference's N*E.

ragged_dot (GPU only): the sorted pairs go to `jax.lax.ragged_dot` with the per-expert group sizes, no padding.
On the CPU jax 0.10.2 lowers ragged_dot to a dense dot over every expert (measured by the dispatch's choice; see
`api.supports`), so it is never the CPU default.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxpeft.kernels.moe.reference import swiglu


def tile_size(pairs: int, experts: int) -> int:
    """T: the power of two at or below half the mean group size M/E (two or more tiles per expert, so the static
    padding bound E*(T-1) stays near M/2), between 8 and 128."""
    half = max(1, pairs // (2 * experts))
    t = 8
    while t * 2 <= half and t < 128:
        t *= 2
    return t


def _sorted_pairs(experts_NxK: jax.Array, e: int):
    """(order_M: pair index of each sorted slot, sizes_E: pairs per expert, expert_M: sorted expert ids)."""
    flat_M = experts_NxK.reshape(-1).astype(jnp.int32)
    order_M = jnp.argsort(flat_M, stable=True)
    sizes_E = jnp.bincount(flat_M, length=e)
    return order_M, sizes_E, flat_M[order_M]


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


def expert_mlp_grouped(x_NxH: jax.Array, gate_up_ExFxH: jax.Array, down_ExHxI: jax.Array, experts_NxK: jax.Array,
                    weights_NxK: jax.Array, dtype: Any, *, tile: int | None = None) -> jax.Array:
    """The same values as `reference.expert_mlp_dense` (see the module docstring for how)."""
    n, k = experts_NxK.shape
    e = gate_up_ExFxH.shape[0]
    m = n * k
    t = tile or tile_size(m, e)
    g = -(-m // t) + e
    order_M, sizes_E, expert_M = _sorted_pairs(experts_NxK, e)
    padded_E = -(-sizes_E // t) * t
    start_E = jnp.cumsum(sizes_E) - sizes_E
    pstart_E = jnp.cumsum(padded_E) - padded_E
    slot_M = pstart_E[expert_M] + (jnp.arange(m) - start_E[expert_M])
    p = g * t
    token_P = jnp.zeros((p,), jnp.int32).at[slot_M].set((order_M // k).astype(jnp.int32))
    weight_P = jnp.zeros((p,), weights_NxK.dtype).at[slot_M].set(weights_NxK.reshape(-1)[order_M])
    tile_expert_G = jnp.clip(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(g) * t, side="right"), 0, e - 1)
    x_GxTxH = x_NxH.astype(dtype)[token_P].reshape(g, t, -1)
    gate_up, down = gate_up_ExFxH.astype(dtype), down_ExHxI.astype(dtype)

    # Saved for the backward: each tile's h only (named), not the expert weights it sliced: scan would otherwise
    # stack every tile's (F, H) and (H, I) slices, G/E times the expert stacks (measured 3x on a 2-layer crosscheck).
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("moe_tile_h"))
    def one(_, xs):
        x_TxH, expert = xs
        h_TxF = checkpoint_name(x_TxH @ gate_up[expert].T, "moe_tile_h")
        return None, swiglu(h_TxF) @ down[expert].T

    _, y_GxTxH = jax.lax.scan(one, None, (x_GxTxH, tile_expert_G))
    y_PxH = y_GxTxH.reshape(p, -1).astype(weight_P.dtype) * weight_P[:, None]
    return jnp.zeros((n, y_PxH.shape[-1]), y_PxH.dtype).at[token_P].add(y_PxH).astype(dtype)
