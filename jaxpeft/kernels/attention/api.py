"""One attention entry point over three implementations, each behind a `supports(case)` gate.

Implementations (the `kernels/nf4_matmul` shape: an `IMPLEMENTATIONS` table, a tested gate, the XLA
path as the reference):
- "dense": `dense.dense_attention`, the reference: every score materialised (B*H*S*T fp32, kept for the
  backward). Simplest and fastest for short sequences and for decoding (S = 1).
- "blockwise": `blockwise.blockwise_attention`, the online softmax over key blocks with a recomputing
  VJP, in plain JAX: linear memory on any backend, every mask case.
- "cudnn": `cudnn.cudnn_attention` (GPU only): bf16/fp16, causal, GQA, right padding, sliding windows.
- "auto" picks cudnn where it is supported, else blockwise when the queries and the keys are both at
  least `BLOCKWISE_MIN_LEN` long (`REMAT_BLOCKWISE_MIN_LEN` for a rematerialised CPU step: `auto_for_remat`),
  else dense.

The mask case a call needs (`Case`) is static (shapes, dtype, which mask parts are present), so the
choice is made at trace time. Forcing an implementation that does not support the case raises
NotImplementedError with the reason.

Shape legend: B batch, S queries, T keys, H query heads, K kv heads, E head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.attention.blockwise import blockwise_attention
from jaxpeft.kernels.attention.cudnn import DTYPES as CUDNN_DTYPES
from jaxpeft.kernels.attention.cudnn import cudnn_attention
from jaxpeft.kernels.attention.dense import dense_attention
from jaxpeft.kernels.attention.mask import AttentionMask

IMPLEMENTATIONS = ("dense", "blockwise", "cudnn")
CHOICES = ("auto", *IMPLEMENTATIONS)
# Below this many queries (or keys) auto keeps the dense path: its S*T scores are small, and decoding
# (S = 1) gains nothing from blocks. At 512 the dense scores already cost more than blocks: SmolLM2's LoRA
# step on 4 packed rows of 512 took 14.6 s dense, 11.5 s in blocks of 512, 10.1 s in blocks of 256 (2-core
# EPYC, 2026-12-02); at 96-256 tokens the two are within 3 % and dense compiles 1.5-2.5 s faster.
BLOCKWISE_MIN_LEN = 512
# With remat, auto keeps dense below this length: the blockwise VJP under remat compiled for minutes at 1k
# tokens on the CPU (BUILD_NOTES' known limits), so it is chosen there only where its memory is needed.
REMAT_BLOCKWISE_MIN_LEN = 1024


@dataclasses.dataclass(frozen=True)
class Case:
    """What an implementation needs to know about one call, all static."""

    s: int
    t: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool = True
    window: int | None = None
    segments: bool = False
    logit_cap: float | None = None
    shared_prefix: int = 0
    right_padded: bool = False  # the caller guarantees every row's real keys come first (or no padding)
    zero_offset: bool = True  # query 0 sits at key slot 0 (no cache index, no virtual tokens before it)
    platform: str = "cpu"


def _on_gpu(platform: str) -> bool:
    return platform in ("gpu", "cuda", "rocm")


def supports(implementation: str, case: Case) -> tuple[bool, str]:
    """Whether `implementation` computes `case`; (ok, reason listing every problem)."""
    problems = []
    if case.heads % case.kv_heads:
        problems.append(f"{case.heads} query heads are not a multiple of {case.kv_heads} kv heads")
    if implementation == "cudnn":
        if not _on_gpu(case.platform):
            problems.append(f"platform {case.platform}: cuDNN runs on a GPU only")
        if case.dtype not in CUDNN_DTYPES:
            problems.append(f"dtype {case.dtype}: cuDNN flash attention takes {list(CUDNN_DTYPES)}")
        if not case.causal:
            problems.append("non-causal masks are not wired here")
        if case.segments:
            problems.append("segment ids (packed rows): no cuDNN input for them through jax.nn")
        if case.logit_cap is not None:
            problems.append("soft-capping: cuDNN has no score transform")
        if not case.right_padded:
            problems.append("padding not known to be on the right (left padding cannot be key lengths)")
        if not case.zero_offset or case.shared_prefix:
            problems.append("a query offset (KV cache / virtual tokens): cuDNN's causal mask starts at slot 0")
        if case.s != case.t:
            problems.append(f"{case.s} queries against {case.t} keys: the causal diagonal assumes S == T")
        if case.head_dim % 8 or case.head_dim > 256:
            problems.append(f"head dim {case.head_dim}: cuDNN needs a multiple of 8 up to 256")
    elif implementation not in ("dense", "blockwise"):
        problems.append(f"unknown implementation {implementation!r}: expected one of {list(IMPLEMENTATIONS)}")
    return (not problems, "; ".join(problems) if problems else "supported")


def choose(case: Case, implementation: str = "auto") -> str:
    """The implementation `attention` runs for `case` (see the module docstring)."""
    if implementation not in CHOICES:
        raise ConfigError(f"attention implementation {implementation!r}: expected one of {list(CHOICES)}")
    if implementation == "auto":
        if supports("cudnn", case)[0]:
            return "cudnn"
        long = min(case.s, case.t) >= BLOCKWISE_MIN_LEN
        return "blockwise" if long and supports("blockwise", case)[0] else "dense"
    ok, reason = supports(implementation, case)
    if not ok:
        raise NotImplementedError(f"attention implementation {implementation!r} does not support this call: "
                                  f"{reason}. Use --attention=auto (or blockwise, which takes every case).")
    return implementation


def auto_for_remat(implementation: str, s: int, remat: Any) -> str:
    """The implementation a model with `remat` on passes for `s`-token calls: "dense" instead of "auto" on the CPU
    below REMAT_BLOCKWISE_MIN_LEN (see there); anything else unchanged."""
    if implementation == "auto" and remat and s < REMAT_BLOCKWISE_MIN_LEN and jax.default_backend() == "cpu":
        return "dense"
    return implementation


def case_of(q_BxSxHxE: jax.Array, k_BxTxKxE: jax.Array, mask: AttentionMask, dtype: Any, *,
            logit_cap: float | None = None) -> Case:
    """The static `Case` of one call."""
    _, s, h, e = q_BxSxHxE.shape
    return Case(s=s, t=k_BxTxKxE.shape[1], heads=h, kv_heads=k_BxTxKxE.shape[2], head_dim=e,
                dtype=jnp.dtype(dtype).name, causal=mask.causal, window=mask.window, segments=mask.has_segments,
                logit_cap=logit_cap, shared_prefix=mask.shared_prefix, right_padded=mask.right_padded,
                zero_offset=mask.zero_offset, platform=jax.default_backend())


def attention(q_BxSxHxE: jax.Array, k_BxTxKxE: jax.Array, v_BxTxKxE: jax.Array, mask: AttentionMask, dtype: Any,
              *, scale: float | None = None, logit_cap: float | None = None,
              implementation: str | None = None) -> jax.Array:
    """Grouped-query attention (B, S, H * E) in `dtype` by the implementation `choose` picks.

    `implementation` defaults to the mask's (`AttentionMask.implementation`, "auto" unless the model was
    built with another); the blockwise block size is the mask's `block`."""
    name = choose(case_of(q_BxSxHxE, k_BxTxKxE, mask, dtype, logit_cap=logit_cap),
                  mask.implementation if implementation is None else implementation)
    if name == "dense":
        return dense_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask.dense(q_BxSxHxE.shape[1]), dtype, scale=scale,
                               logit_cap=logit_cap)
    if name == "cudnn":
        return cudnn_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask, dtype, scale=scale)
    return blockwise_attention(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, mask, dtype, scale=scale, logit_cap=logit_cap,
                               block_q=mask.block, block_k=mask.block)


__all__ = ["BLOCKWISE_MIN_LEN", "CHOICES", "Case", "IMPLEMENTATIONS", "REMAT_BLOCKWISE_MIN_LEN", "attention",
           "auto_for_remat", "case_of", "choose", "supports"]
