"""Flash-style attention in plain JAX: an online softmax over key blocks, memory linear in the sequence.

The dense reference (`dense.dense_attention`) holds B*H*S*T fp32 scores, and autodiff keeps them (and the
probabilities) for the backward: quadratic in the sequence, 600 MB a layer at 4k tokens on SmolLM2.
Here the forward loops over query blocks and, inside, over the key blocks a query block can see
(causality and the window bound the range, so fully masked blocks are never computed), keeping a
running max, sum and weighted sum per query (the online softmax); only the output and the
log-sum-exp per query are kept. The custom VJP recomputes each tile's scores from q, k and the
log-sum-exp (the flash-attention backward): dq is accumulated over key blocks, dk and dv per key block
over the query blocks that see it. The largest live tensor is one tile's B*H*Q*C scores.

Semantics are the dense reference's, including the odd cases:
- GQA without repeating k/v: queries are grouped (B, K, G, S, E) against (B, K, T, E) keys;
- soft-capping (cap * tanh(s / cap), before the mask) with its derivative 1 - (s / cap)^2 in the VJP;
- a query row with no allowed key at all (a left-padding row) gets, as the dense softmax over an
  all-`finfo.min` row does, the mean of v over all T keys, and its gradient goes to v only;
- lengths that are not a multiple of the block: queries and keys are padded internally (padded keys
  never attend, padded queries are dropped).
Scores, softmax statistics and every accumulation are fp32 whatever the dtype; the matmul inputs stay
in the input dtype (bf16 tiles multiply with fp32 accumulation).

Shape legend: B batch, S queries, T keys, H query heads, K kv heads, G = H // K, E head dim,
Q query block, C key block, NQ / NC number of blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.kernels.attention.mask import AttentionMask
from jaxpeft.kernels.frozen import tie_to

DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call (hashable: the custom VJP's nondiff argument)."""

    dtype_name: str
    scale: float
    logit_cap: float | None
    block_q: int
    block_k: int
    s: int
    t: int


def _blocks(n: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering n: one block when n is at most `block`."""
    size = min(block, n)
    return size, -(-n // size)


def _pad_to(x: jax.Array, axis: int, n: int, value: Any = 0) -> jax.Array:
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q_BxSxHxE: jax.Array, k_BxTxKxE: jax.Array, v_BxTxKxE: jax.Array, mask: AttentionMask,
                        dtype: Any, *, scale: float | None = None, logit_cap: float | None = None,
                        block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> jax.Array:
    """The dense reference's output (B, S, H * E) in `dtype`, computed by blocks (see the module docstring)."""
    b, s, h, e = q_BxSxHxE.shape
    t = k_BxTxKxE.shape[1]
    if mask.num_keys != t:
        raise ValueError(f"the mask describes {mask.num_keys} keys but k has {t}")
    st = Static(jnp.dtype(dtype).name, float(e ** -0.5 if scale is None else scale),
                None if logit_cap is None else float(logit_cap), int(block_q), int(block_k), s, t)
    return _attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask, st)


class _Layout:
    """Padded, grouped operands and the block geometry of one call."""

    def __init__(self, q, k, v, mask: AttentionMask, st: Static):
        b, s, h, e = q.shape
        kv = k.shape[2]
        self.bq, self.nq = _blocks(s, st.block_q)
        self.bk, self.nk = _blocks(st.t, st.block_k)
        self.sp, self.tp = self.bq * self.nq, self.bk * self.nk
        self.shape = (b, s, h, e)
        self.g = h // kv
        # q (B, K, G, Sp, E); k, v (B, K, Tp, E): the layout every tile slices from.
        self.q = _pad_to(q.reshape(b, s, kv, self.g, e), 1, self.sp).transpose(0, 2, 3, 1, 4)
        self.k = _pad_to(k, 1, self.tp).transpose(0, 2, 1, 3)
        self.v = _pad_to(v, 1, self.tp).transpose(0, 2, 1, 3)
        self.valid = _pad_to(mask.key_valid_BxT > 0, 1, self.tp, False)
        self.qseg = None if mask.q_segment_BxS is None else _pad_to(mask.q_segment_BxS, 1, self.sp, -1)
        self.kseg = None if mask.k_segment_BxT is None else _pad_to(mask.k_segment_BxT, 1, self.tp, -2)
        self.mask = mask

    def q_tile(self, x, i):  # (B, K, G, Sp, ...) -> block i along Sp
        return jax.lax.dynamic_slice_in_dim(x, i * self.bq, self.bq, axis=3)

    def k_tile(self, x, j):  # (B, K, Tp, E) -> block j along Tp
        return jax.lax.dynamic_slice_in_dim(x, j * self.bk, self.bk, axis=2)

    def allowed(self, i, j) -> jax.Array:
        """(B, 1, 1, Q, C): the mask tile of query block i and key block j."""
        q0, k0 = i * self.bq, j * self.bk
        tile = lambda x, start, n: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)  # noqa
        a = self.mask.tile(q0 + jnp.arange(self.bq), k0 + jnp.arange(self.bk), tile(self.valid, k0, self.bk),
                            tile(self.qseg, q0, self.bq), tile(self.kseg, k0, self.bk))
        return a[:, None, None]

    def key_range(self, i):
        """[lo, hi) of the key blocks query block i can see (causality and the window)."""
        m = self.mask
        lo, hi = 0, self.nk
        first_q = m.offset + i * self.bq
        if m.causal:
            hi = jnp.clip((first_q + self.bq - 1) // self.bk + 1, 0, self.nk)
        if m.window is not None:
            lo = jnp.clip((first_q - m.window + 1) // self.bk, 0, self.nk)
        return lo, hi

    def query_range(self, j):
        """[lo, hi) of the query blocks that can see key block j."""
        m = self.mask
        lo, hi = 0, self.nq
        first_k = j * self.bk
        if m.causal:
            lo = jnp.clip((first_k - m.offset) // self.bq, 0, self.nq)
        if m.window is not None:
            hi = jnp.clip((first_k + self.bk - 2 + m.window - m.offset) // self.bq + 1, 0, self.nq)
        return lo, hi


def _scores(lay: _Layout, st: Static, q_i, k_j):
    """fp32 scores of a tile (B, K, G, Q, C), soft-capped: (capped scores, raw-score derivative factor or None)."""
    s = jnp.einsum("bkgqe,bkce->bkgqc", q_i, k_j, preferred_element_type=jnp.float32) * st.scale
    if st.logit_cap is None:
        return s, None
    capped = jnp.tanh(s / st.logit_cap) * st.logit_cap
    return capped, 1.0 - jnp.square(capped / st.logit_cap)


def _forward(q, k, v, mask: AttentionMask, st: Static):
    lay = _Layout(q, k, v, mask, st)
    b, s, h, e = lay.shape
    kv = k.shape[2]

    def one_query_block(i):
        q_i = lay.q_tile(lay.q, i)

        def body(j, carry):
            m, l, acc = carry
            k_j, v_j = lay.k_tile(lay.k, j), lay.k_tile(lay.v, j)
            sc, _ = _scores(lay, st, q_i, k_j)
            allowed = lay.allowed(i, j)
            sc = jnp.where(allowed, sc, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            m_use = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(allowed, jnp.exp(sc - m_use[..., None]), 0.0)
            corr = jnp.exp(m - m_use)
            acc = acc * corr[..., None] + jnp.einsum("bkgqc,bkce->bkgqe", p.astype(v_j.dtype), v_j,
                                                     preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc

        init = (jnp.full((b, kv, lay.g, lay.bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kv, lay.g, lay.bq), jnp.float32), jnp.zeros((b, kv, lay.g, lay.bq, e), jnp.float32))
        lo, hi = lay.key_range(i)
        m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        empty = l == 0.0
        lse = jnp.where(empty, jnp.inf, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(empty, 1.0, l)))
        return acc / jnp.where(empty, 1.0, l)[..., None], lse, empty

    out, lse, empty = jax.lax.map(one_query_block, jnp.arange(lay.nq))  # (NQ, B, K, G, Q, ...)
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv, lay.g, lay.sp, e)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, lay.g, lay.sp)
    empty = jnp.moveaxis(empty, 0, 3).reshape(b, kv, lay.g, lay.sp)
    # A row with no allowed key: the dense softmax over an all-masked row is uniform over the T keys.
    v_mean = jnp.sum(v.astype(jnp.float32), axis=1)[:, :, None, None, :] / st.t  # (B,K,1,1,E)
    out = jnp.where(empty[..., None], v_mean, out)
    result = out.transpose(0, 3, 1, 2, 4)[:, :s].reshape(b, s, h * e).astype(st.dtype_name)
    return result, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, st):
    return _forward(q, k, v, mask, st)[0]


def _fwd(q, k, v, mask, st):
    out, lse = _forward(q, k, v, mask, st)
    return out, (q, k, v, mask, out, lse)


def _bwd(st, residual, d_out):
    q, k, v, mask, out, lse = residual
    lay = _Layout(q, k, v, mask, st)
    b, s, h, e = lay.shape
    kv = k.shape[2]
    grouped = lambda x: _pad_to(x.reshape(b, s, kv, lay.g, e), 1, lay.sp).transpose(0, 2, 3, 1, 4)  # noqa: E731
    do = grouped(d_out.astype(st.dtype_name))  # (B, K, G, Sp, E)
    o = grouped(out)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (B, K, G, Sp)
    empty = jnp.isinf(lse)

    def one_key_block(dq, j):
        k_j, v_j = lay.k_tile(lay.k, j), lay.k_tile(lay.v, j)

        def body(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = lay.q_tile(lay.q, i), lay.q_tile(do, i)
            lse_i, delta_i = lay.q_tile(lse, i), lay.q_tile(delta, i)
            sc, dcap = _scores(lay, st, q_i, k_j)
            p = jnp.where(lay.allowed(i, j), jnp.exp(sc - lse_i[..., None]), 0.0)
            dv_j = dv_j + jnp.einsum("bkgqc,bkgqe->bkce", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqe,bkce->bkgqc", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            if dcap is not None:
                ds = ds * dcap
            ds = (ds * st.scale).astype(q_i.dtype)
            dq_i = jnp.einsum("bkgqc,bkce->bkgqe", ds, k_j, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, lay.q_tile(dq, i) + dq_i, i * lay.bq, axis=3)
            dk_j = dk_j + jnp.einsum("bkgqc,bkgqe->bkce", ds, q_i, preferred_element_type=jnp.float32)
            return dq, dk_j, dv_j

        zeros = jnp.zeros((b, kv, lay.bk, e), jnp.float32)
        lo, hi = lay.query_range(j)
        dq, dk_j, dv_j = jax.lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    # Tied to the cotangent: a constant init would be built (and kept) from the start of the step by XLA.
    dq0 = tie_to(jnp.zeros((b, kv, lay.g, lay.sp, e), jnp.float32), delta)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, jnp.arange(lay.nk))  # dk, dv: (NC, B, K, C, E)
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kv, lay.tp, e)[:, :, :st.t]
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, kv, lay.tp, e)[:, :, :st.t]
    # Rows with no allowed key took the mean of v: each key gets 1 / T of their output cotangent.
    d_mean = jnp.sum(jnp.where(empty[..., None], do.astype(jnp.float32), 0.0), axis=(2, 3))  # (B, K, E)
    dv = dv + d_mean[:, :, None, :] / st.t
    dq = dq.transpose(0, 3, 1, 2, 4)[:, :s].reshape(b, s, h, e).astype(q.dtype)
    return dq, dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype), None


_attention.defvjp(_fwd, _bwd)

__all__ = ["DEFAULT_BLOCK", "blockwise_attention"]
