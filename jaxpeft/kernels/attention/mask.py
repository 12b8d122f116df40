"""Which keys a query may attend to, as a small description instead of a dense (B, S, T) boolean mask.

A dense mask costs B*S*T bytes per distinct window and is quadratic in the sequence length, and an
implementation that works by blocks needs only the block it is computing. `AttentionMask` holds what
the mask is made of: the key slots holding real tokens (B, T), segment ids of packed rows (queries
(B, S), keys (B, T)), the window, the query offset (the slot of query 0: the KV cache index, or the
virtual tokens before the real ones), causality, and `shared_prefix` (key slots every segment sees:
prefix/prompt tuning's virtual tokens). `dense()` gives exactly the boolean mask the models built
before (`causal_lm.causal_mask`); `tile()` evaluates one (query block, key block) tile of it.

Shape legend: B batch, S query length, T key length, Q query block, C key block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """allowed[b, s, t] = valid[b, t] & (t <= offset + s if causal) & (offset + s - t < window)
    & (t < shared_prefix or q_segment[b, s] == k_segment[b, t])."""

    key_valid_BxT: jax.Array
    offset: jax.Array  # int32 scalar: the key slot of query 0
    q_segment_BxS: jax.Array | None = None
    k_segment_BxT: jax.Array | None = None
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    shared_prefix: int = dataclasses.field(default=0, metadata=dict(static=True))
    # Static facts a caller knows and some implementations need (cuDNN): query 0 at key slot 0, and real
    # keys first in every row. Unknown (False) is always safe.
    zero_offset: bool = dataclasses.field(default=False, metadata=dict(static=True))
    right_padded: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # How the attention receiving this mask computes (kernels.attention.api.attention): carried with the
    # mask so that the choice reaches every family's attention without a parameter on every module.
    implementation: str = dataclasses.field(default="auto", metadata=dict(static=True))
    block: int = dataclasses.field(default=512, metadata=dict(static=True))

    def with_options(self, **changes) -> "AttentionMask":
        """The same mask with other static options (implementation, block, right_padded)."""
        return dataclasses.replace(self, **changes)

    @property
    def has_segments(self) -> bool:
        return self.q_segment_BxS is not None

    @property
    def num_keys(self) -> int:
        return self.key_valid_BxT.shape[1]

    def dense(self, s: int) -> jax.Array:
        """The (B, S, T) boolean mask (what `dense.dense_attention` takes)."""
        return self.tile(jnp.arange(s), jnp.arange(self.num_keys), self.key_valid_BxT, self.q_segment_BxS,
                          self.k_segment_BxT)

    def tile(self, q_idx_Q: jax.Array, k_idx_C: jax.Array, key_valid_BxC: jax.Array,
              q_segment_BxQ: jax.Array | None, k_segment_BxC: jax.Array | None) -> jax.Array:
        """The (B, Q, C) tile for queries `q_idx` and key slots `k_idx`, given those rows' validity and segments."""
        q_slot = self.offset + q_idx_Q[:, None]
        k_slot = k_idx_C[None, :]
        allowed = key_valid_BxC[:, None, :] > 0
        if self.causal:
            allowed &= (k_slot <= q_slot)[None]
        if self.window is not None:
            allowed &= (q_slot - k_slot < self.window)[None]
        if q_segment_BxQ is not None:
            same = q_segment_BxQ[:, :, None] == k_segment_BxC[:, None, :]
            if self.shared_prefix:
                same |= (k_slot < self.shared_prefix)[None]
            allowed &= same
        return allowed


def make_mask(key_valid_BxT: jax.Array, *, offset=0, segment_ids_BxS: jax.Array | None = None,
              key_segment_ids_BxT: jax.Array | None = None, window: int | None = None, causal: bool = True,
              shared_prefix: int = 0, right_padded: bool = False, implementation: str = "auto",
              block: int = 512) -> AttentionMask:
    """An `AttentionMask`; key segment ids default to the query ones (a call without a cache: S == T). A
    Python int 0 `offset` marks the mask `zero_offset`."""
    if segment_ids_BxS is not None and key_segment_ids_BxT is None:
        if segment_ids_BxS.shape != key_valid_BxT.shape:
            raise ValueError(f"segment ids {segment_ids_BxS.shape} need key segment ids when the keys "
                             f"{key_valid_BxT.shape} are not the queries; pass key_segment_ids_BxT")
        key_segment_ids_BxT = segment_ids_BxS
    return AttentionMask(key_valid_BxT=jnp.asarray(key_valid_BxT), offset=jnp.asarray(offset, jnp.int32),
                         q_segment_BxS=segment_ids_BxS, k_segment_BxT=key_segment_ids_BxT, causal=causal,
                         window=window, shared_prefix=shared_prefix,
                         zero_offset=isinstance(offset, int) and offset == 0, right_padded=right_padded,
                         implementation=implementation, block=block)


__all__ = ["AttentionMask", "make_mask"]
