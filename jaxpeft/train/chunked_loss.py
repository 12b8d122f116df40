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

With `n_valid` (how many of the K slots hold real targets; the step packs them first), only the chunks that hold
real targets run (`valid_target_nll`): K is a static bound sized for the worst batch, and a batch with fewer
targets pays for ceil(n_valid / C) chunks, not for K rows, without a recompile. Its VJP is written by hand: with
a frozen head (LoRA, QLoRA, every adapter method) the forward computes each row's gradient with respect to its
hidden state in the same pass as its loss (one head projection and one back-projection per real chunk, as
the plain autodiff costs), and the backward only scales those rows by their cotangents; a trainable head
(full fine-tuning, an adapter on the head) recomputes each chunk in the backward for the weight gradient.

Shape legend: K target slots, C targets per chunk, N = ceil(K / C) chunks, D hidden, V vocab.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxpeft.core.errors import ConfigError

# Auto mode: the largest chunk (a multiple of 8, at most AUTO_MAX_CHUNK) whose float32 logits fit this budget;
# a K that fits one chunk runs unchunked. SmolLM2's 49,152 vocabulary: chunks of 1,024; Gemma's 262,144: 256.
AUTO_CHUNK_BYTES = 256 * 2**20
AUTO_MAX_CHUNK = 1024
# With `n_valid`, chunks of at most this many targets: the work is ceil(n_valid / C) * C rows, so a small C wastes
# little on the last chunk; below ~128 rows the head's two matmuls (C x D by D x V, C x V by V x D) lose per-row speed
# on the CPU (SmolLM2 head, jit, 2 cores: 0.92 ms a row at C=64, 0.76 at 128, 0.69 at 512; 2026-12-02).
VALID_MAX_CHUNK = 128

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
               loss_chunk: int | None = None, n_valid: jax.Array | None = None) -> jax.Array:
    """(K,) float32 cross-entropy of each target: logsumexp(logits) - logits[target], over chunks of targets.

    `head` maps hidden rows to logits (e.g. `lambda h: model.apply({"params": p}, h, method="head")`);
    `loss_chunk` as `resolve_chunk`. The last chunk is padded with zero rows whose results are dropped.
    `n_valid`: the real targets are slots 0 .. n_valid - 1; slots past them come back as 0 and only the chunks
    holding real targets are computed (`valid_target_nll`; not with `loss_chunk=0`, which is one K block)."""
    k, d = h_KxD.shape
    if n_valid is not None and loss_chunk != 0:
        auto = resolve_chunk(loss_chunk, k, vocab) or k
        return valid_target_nll(head, h_KxD, targets_K, n_valid,
                                chunk=auto if loss_chunk is not None else min(auto, VALID_MAX_CHUNK))
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


def valid_target_nll(head: Head, h_KxD: jax.Array, targets_K: jax.Array, n_valid: jax.Array, *,
                     chunk: int) -> jax.Array:
    """`target_nll` computed over the first ceil(n_valid / chunk) chunks only (a loop with a traced trip count);
    the other slots are 0. Differentiable in `h_KxD` and in whatever `head` closes over (its weights)."""
    k, d = h_KxD.shape
    chunk = max(1, min(chunk, k))
    n = -(-k // chunk)
    h = jnp.pad(h_KxD, ((0, n * chunk - k), (0, 0)))
    t = jnp.pad(targets_K, (0, n * chunk - k))
    # The head's weights become explicit arguments, so the hand-written VJP can give their gradient too.
    fn, consts = jax.closure_convert(lambda hc, tc: _nll(head, hc, tc), h[:chunk], t[:chunk])
    count = jnp.clip(jnp.asarray(n_valid, jnp.int32), 0, k)
    return _valid_nll(fn, chunk, h, t, count, *consts)[:k]


def _chunks(count: jax.Array, chunk: int) -> jax.Array:
    return (count + chunk - 1) // chunk


def _rows(x: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk)


def _put(x: jax.Array, rows: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, rows.astype(x.dtype), i * chunk, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _valid_nll(fn, chunk, h, t, count, *consts):
    def body(i, out):
        return _put(out, fn(_rows(h, i, chunk), _rows(t, i, chunk), *consts), i, chunk)

    return jax.lax.fori_loop(0, _chunks(count, chunk), body, jnp.zeros(h.shape[0], jnp.float32))


def _valid_nll_fwd(fn, chunk, h, t, count, *consts):
    h, t, count = h.value, t.value, count.value
    values = tuple(c.value for c in consts)
    trained = tuple(c.perturbed for c in consts)
    if any(trained):  # a trainable head: keep the inputs; the backward recomputes each chunk
        return _valid_nll(fn, chunk, h, t, count, *values), (h, t, count, values, trained)

    def body(i, carry):  # the loss and d loss / d h of each row, one chunk at a time
        out, dh = carry
        t_c = _rows(t, i, chunk)
        nll, vjp = jax.vjp(lambda x: fn(x, t_c, *values), _rows(h, i, chunk))
        return _put(out, nll, i, chunk), _put(dh, vjp(jnp.ones_like(nll))[0], i, chunk)

    out, dh = jax.lax.fori_loop(0, _chunks(count, chunk), body,
                                (jnp.zeros(h.shape[0], jnp.float32), jnp.zeros_like(h)))
    return out, (dh, (None,) * len(consts))


def _valid_nll_bwd(fn, chunk, res, g):
    none = (None, None, None) + (None,) * len(res[-1] if len(res) == 2 else res[3])
    if isinstance(g, SymbolicZero):
        return none
    if len(res) == 2:  # frozen head: the per-row gradients, scaled by each row's cotangent
        return (res[0] * g[:, None].astype(res[0].dtype),) + none[1:]
    h, t, count, values, trained = res

    def body(i, carry):
        dh, grads = carry
        t_c, g_c = _rows(t, i, chunk), _rows(g, i, chunk)

        def chunk_nll(x, *weights):
            it = iter(weights)
            return fn(x, t_c, *(next(it) if tr else v for v, tr in zip(values, trained)))

        _, vjp = jax.vjp(chunk_nll, _rows(h, i, chunk), *(v for v, tr in zip(values, trained) if tr))
        d_h, *d_w = vjp(g_c)
        return _put(dh, d_h, i, chunk), tuple(a + b.astype(a.dtype) for a, b in zip(grads, d_w))

    zeros = tuple(jnp.zeros(v.shape, jnp.promote_types(v.dtype, jnp.float32)) for v, tr in zip(values, trained) if tr)
    dh, grads = jax.lax.fori_loop(0, _chunks(count, chunk), body, (jnp.zeros_like(h), zeros))
    it = iter(grads)
    return (dh, None, None) + tuple(next(it).astype(v.dtype) if tr else None for v, tr in zip(values, trained))


_valid_nll.defvjp(_valid_nll_fwd, _valid_nll_bwd, symbolic_zeros=True)
