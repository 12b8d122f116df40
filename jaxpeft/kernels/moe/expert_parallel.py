"""Expert parallelism: the MoE MLP with its expert stacks split over the mesh's `expert` axis and the tokens sent
to the devices that hold their experts (two `all_to_all`s under `jax.shard_map`), capacity-free.

Shape legend: n tokens on one device, H hidden, I expert width, F = 2I, E experts, L = E / X experts per device, X the
expert axis size, K experts per token, m = n*K (token, expert) pairs of one device, R = X*m rows a device receives,
T tile rows, G tiles.

Layout inside `shard_map`: tokens (and their routing) are split over every batch axis, (data, fsdp, expert), so the
expert devices are data-parallel outside the MoE block; the stacks (E, F, H) / (E, H, I) are split on E over `expert`
(device x of an expert group holds experts [x*L, (x+1)*L)) and replicated over the other axes (so no weight is ever
gathered: each stack's gradient is summed over data/fsdp/tensor by shard_map's transpose).

The exchange has a static bound (no capacity factor, no dropped token): every device sends every one of its m pairs
to every expert device, (X, m, H), where slot [x, j] holds pair j's hidden state when its expert lives on x and zeros
(marked "no pair") elsewhere; `all_to_all` hands device x the X slots addressed to it, (X, m, H). Memory: the send
and the receive buffers are X*m*H each (X times the real pairs; the output exchange the same again), the price of a
one-phase exchange with a static shape (a count exchange first could bound it tighter, not done). The compute on the
receiving side does not pay it: the R rows are sorted by local expert with the "no pair" rows last, padded to tiles
as in `grouped.py`, and a tile of "no pair" rows is skipped by `lax.cond`, so the matmuls cover the real pairs plus
at most L*(T-1) padding rows. The outputs go back by a second `all_to_all` and each pair takes its expert device's
slot; the router weights and the scatter-add onto the tokens are done where the tokens live.

The context (`expert_parallel(mesh)`) is set by the train runner while it traces the step on a mesh whose expert
axis is larger than one; elsewhere `current_mesh()` is None and the model runs the single-device path unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.moe.grouped import tile_size
from jaxpeft.kernels.moe.reference import swiglu

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", EXPERT_AXIS)  # the axes that split the rows of a batch (and so the tokens)

_MESH: contextvars.ContextVar = contextvars.ContextVar("jaxpeft_expert_mesh", default=None)


@contextlib.contextmanager
def expert_parallel(mesh: Any) -> Iterator[None]:
    """Within this context the MoE blocks traced run expert-parallel on `mesh` (when its expert axis is > 1)."""
    on = mesh is not None and EXPERT_AXIS in mesh.axis_names and int(mesh.shape[EXPERT_AXIS]) > 1
    token = _MESH.set(mesh if on else None)
    try:
        yield
    finally:
        _MESH.reset(token)


def current_mesh() -> Any:
    """The mesh set by `expert_parallel`, or None (the single-device path)."""
    return _MESH.get()


def _grouped_rows(x_RxH: jax.Array, gate_up_LxFxH: jax.Array, down_LxHxI: jax.Array, ids_R: jax.Array,
                  tile: int, dtype: Any, batch_axes: tuple[str, ...]) -> jax.Array:
    """y_R = expert_{ids[r]}(x[r]) for ids in [0, L), zeros for id L ("no pair"); tiles of "no pair" rows skipped."""
    r, h = x_RxH.shape
    l = gate_up_LxFxH.shape[0]
    groups, t = l + 1, tile
    g = -(-r // t) + groups
    order_R = jnp.argsort(ids_R, stable=True)
    ids_sorted = ids_R[order_R]
    sizes = jnp.bincount(ids_R, length=groups)
    padded = -(-sizes // t) * t
    start, pstart = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    slot_sorted = pstart[ids_sorted] + (jnp.arange(r) - start[ids_sorted])
    slot_R = jnp.zeros((r,), jnp.int32).at[order_R].set(slot_sorted.astype(jnp.int32))
    p = g * t
    x_GxTxH = jnp.zeros((p, h), dtype).at[slot_R].set(x_RxH.astype(dtype)).reshape(g, t, h)
    tile_id_G = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), jnp.arange(g) * t, side="right"), 0, groups - 1)
    gate_up, down = gate_up_LxFxH.astype(dtype), down_LxHxI.astype(dtype)
    # The stacks made varying over the token axes here, outside the scan: their gradient's sum over those axes (the
    # transpose of this cast) then runs once after the scan on every device, not inside a `cond` branch that only
    # some devices take (a collective there deadlocks).
    gate_up, down = jax.lax.pcast((gate_up, down), batch_axes, to="varying")

    def one(_, xs):
        x_TxH, ex = xs
        safe = jnp.minimum(ex, l - 1)

        def run():
            return swiglu(x_TxH @ gate_up[safe].T) @ down[safe].T

        return None, jax.lax.cond(ex < l, run, lambda: jnp.zeros_like(x_TxH))  # (T, H): down maps I to H

    _, y_GxTxH = jax.lax.scan(one, None, (x_GxTxH, tile_id_G))
    return y_GxTxH.reshape(p, -1)[slot_R]


def _local(x_nxH, gate_up_LxFxH, down_LxHxI, experts_nxK, weights_nxK, *, x_size: int, dtype: Any,
           batch_axes: tuple[str, ...]):
    n, k = experts_nxK.shape
    l = gate_up_LxFxH.shape[0]
    m = n * k
    flat_m = experts_nxK.reshape(-1).astype(jnp.int32)
    dest_m, local_m = flat_m // l, flat_m % l
    token_m = jnp.arange(m, dtype=jnp.int32) // k
    x_mxH = x_nxH.astype(dtype)[token_m]
    to_XxM = dest_m[None, :] == jnp.arange(x_size, dtype=jnp.int32)[:, None]
    send_XxMxH = jnp.where(to_XxM[..., None], x_mxH[None], jnp.zeros((), dtype))
    send_ids_XxM = jnp.where(to_XxM, local_m[None], l)
    recv_XxMxH = jax.lax.all_to_all(send_XxMxH, EXPERT_AXIS, 0, 0)
    recv_ids_XxM = jax.lax.all_to_all(send_ids_XxM, EXPERT_AXIS, 0, 0)
    y_R = _grouped_rows(recv_XxMxH.reshape(x_size * m, -1), gate_up_LxFxH, down_LxHxI, recv_ids_XxM.reshape(-1),
                        tile_size(m, l), dtype, batch_axes)
    back_XxMxH = jax.lax.all_to_all(y_R.reshape(x_size, m, -1), EXPERT_AXIS, 0, 0)
    y_mxH = back_XxMxH[dest_m, jnp.arange(m)]
    w_m = weights_nxK.reshape(-1)
    y_mxH = y_mxH.astype(w_m.dtype) * w_m[:, None]
    return jnp.zeros((n, y_mxH.shape[-1]), y_mxH.dtype).at[token_m].add(y_mxH).astype(dtype)


def expert_mlp_expert_parallel(x_NxH: jax.Array, gate_up_ExFxH: jax.Array, down_ExHxI: jax.Array,
                               experts_NxK: jax.Array, weights_NxK: jax.Array, dtype: Any, mesh: Any) -> jax.Array:
    """The values of `reference.expert_mlp_dense`, expert-parallel on `mesh` (see the module docstring)."""
    x_size = int(mesh.shape[EXPERT_AXIS])
    e = gate_up_ExFxH.shape[0]
    if e % x_size:
        raise ConfigError(f"expert:{x_size} does not divide the model's {e} experts (each expert device holds "
                          f"experts / expert of them); choose an expert axis size that divides {e}.")
    rows = 1
    for a in TOKEN_AXES:
        rows *= int(mesh.shape.get(a, 1))
    if x_NxH.shape[0] % rows:
        raise ConfigError(f"{x_NxH.shape[0]} tokens do not split over the {rows} devices of data x fsdp x expert; "
                          f"use a batch whose rows are a multiple of {rows}.")
    tokens = P(tuple(a for a in TOKEN_AXES if a in mesh.axis_names), None)
    stacks = P(EXPERT_AXIS, None, None)
    batch_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names and a != EXPERT_AXIS)
    fn = functools.partial(_local, x_size=x_size, dtype=dtype, batch_axes=batch_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(tokens, stacks, stacks, tokens, tokens), out_specs=tokens)(
        x_NxH, gate_up_ExFxH, down_ExHxI, experts_NxK, weights_NxK)
