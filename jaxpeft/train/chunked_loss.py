"""The target-only head and cross-entropy over chunks of targets, so K x V logits never exist at once.

The step gathers the K target positions and projects only those (train/step.py), but with a large vocabulary
that one K x V float32 block is still the step's largest tensor: 8,192 targets of Gemma's 262,144-token
vocabulary are 8.6 GB, and its backward holds another of the same size. Here the K rows go through the head
in chunks of C (`jax.lax.map`), each chunk's body under `jax.checkpoint`, so the forward keeps only the
per-target NLL and the backward rebuilds one chunk's C x V logits at a time: the head's memory is C x V, not
K x V, and the result is the same maths row by row (only the order in which the head's weight gradient is
summed over the rows changes).

The head is whatever the model's `head` method does (tied embedding or `lm_head`, an adapter on it, Gemma's
final-logit soft-capping, a bf16 compute dtype): this module calls it, it never reimplements it.

Shape legend: K target slots, C targets per chunk, N = ceil(K / C) chunks, D hidden, V vocab.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError

# Auto mode: the largest chunk (a multiple of 8, at most AUTO_MAX_CHUNK) whose float32 logits fit this budget;
# a K that fits one chunk runs unchunked. SmolLM2's 49,152 vocabulary: chunks of 1,024; Gemma's 262,144: 256.
AUTO_CHUNK_BYTES = 256 * 2**20
AUTO_MAX_CHUNK = 1024

Head = Callable[[jax.Array], jax.Array]  # h_CxD -> logits_CxV


def check_loss_chunk(loss_chunk: int | None) -> None:
    """Raises ConfigError unless `loss_chunk` is None (auto), 0 (off) or a positive chunk size."""
    if loss_chunk is not None and (isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0):
        raise ConfigError(f"loss_chunk={loss_chunk!r}: expected None (auto), 0 (off: all targets at once) or a "
                          "positive number of targets per chunk")


def resolve_chunk(loss_chunk: int | None, targets: int, vocab: int) -> int:
    """The chunk size to use for `targets` rows of a `vocab`-wide head: 0 means one unchunked block.

    None picks by memory (AUTO_CHUNK_BYTES of float32 logits a chunk); a chunk at least `targets` long is the
    unchunked path, so small runs compile exactly as before."""
    check_loss_chunk(loss_chunk)
    if loss_chunk is None:
        loss_chunk = max(8, min(AUTO_MAX_CHUNK, AUTO_CHUNK_BYTES // (4 * max(vocab, 1)) // 8 * 8))
    return 0 if loss_chunk == 0 or loss_chunk >= targets else loss_chunk


def _nll(head: Head, h_CxD: jax.Array, targets_C: jax.Array) -> jax.Array:
    logits_CxV = head(h_CxD).astype(jnp.float32)
    return jax.nn.logsumexp(logits_CxV, axis=-1) - jnp.take_along_axis(logits_CxV, targets_C[:, None], -1)[:, 0]


def target_nll(head: Head, h_KxD: jax.Array, targets_K: jax.Array, *, vocab: int,
               loss_chunk: int | None = None) -> jax.Array:
    """(K,) float32 cross-entropy of each target: logsumexp(logits) - logits[target], over chunks of targets.

    `head` maps hidden rows to logits (e.g. `lambda h: model.apply({"params": p}, h, method="head")`);
    `loss_chunk` as `resolve_chunk`. The last chunk is padded with zero rows whose results are dropped."""
    k, d = h_KxD.shape
    chunk = resolve_chunk(loss_chunk, k, vocab)
    if chunk == 0:
        return _nll(head, h_KxD, targets_K)
    n = -(-k // chunk)
    pad = n * chunk - k
    h_NxCxD = jnp.pad(h_KxD, ((0, pad), (0, 0))).reshape(n, chunk, d)
    t_NxC = jnp.pad(targets_K, (0, pad)).reshape(n, chunk)
    # prevent_cse=False is safe (and cheaper) under a loop: the recomputation cannot be merged away there.
    body = jax.checkpoint(lambda xs: _nll(head, *xs), prevent_cse=False)
    return jax.lax.map(body, (h_NxCxD, t_NxC)).reshape(n * chunk)[:k]
