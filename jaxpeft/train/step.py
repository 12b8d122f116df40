"""The jitted train and eval steps: causal-LM loss on target tokens only, gradient accumulation.

Shape legend: A accumulation micro-steps, B micro-batch rows, S sequence length, D hidden, K the
static number of target slots per micro-batch (targets are gathered, so the vocabulary projection
runs on K rows instead of B*S), V vocab. The head and cross-entropy run over chunks of those K rows
(train/chunked_loss.py, `loss_chunk`), so K x V logits never exist at once for a large vocabulary.

Loss-mask convention (see data/encode.py): loss_mask[b, t] == 1 means token t is a target, predicted
by the hidden state at t - 1.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxpeft.core.partition import combine
from jaxpeft.train import router_loss
from jaxpeft.train.chunked_loss import target_nll

Batch = Mapping[str, jax.Array]


def target_slots(loss_mask_BxS, max_targets: int):
    """Flat indices (into the B*(S-1) shifted positions) of the targets, padded to K, and their validity."""
    flat = loss_mask_BxS[:, 1:].reshape(-1) > 0
    idx_K = jnp.nonzero(flat, size=max_targets, fill_value=0)[0]
    valid_K = jnp.arange(max_targets) < jnp.sum(flat)
    return idx_K, valid_K


def head_fn(model: Any, params: Mapping) -> Callable[[jax.Array], jax.Array]:
    """hidden rows -> logits through the model's own `head` (tied or not, soft-capped or not)."""
    return lambda h_CxD: model.apply({"params": params}, h_CxD, method="head")


def token_nll_sum(model: Any, params: Mapping, batch: Batch, max_targets: int, rngs=None, *,
                  loss_chunk: int | None = None):
    """(sum of target-token NLL, number of target tokens) for one micro-batch; `loss_chunk` as
    `chunked_loss.resolve_chunk` (None: auto, 0: all K targets at once)."""
    ids = batch["input_ids"]
    hidden = model.apply(
        {"params": params}, ids, attention_mask_BxS=batch["attention_mask"],
        positions_BxS=batch.get("positions"), segment_ids_BxS=batch.get("segment_ids"),
        return_hidden=True, rngs=rngs,
    )
    b, s, d = hidden.shape
    idx_K, valid_K = target_slots(batch["loss_mask"], max_targets)
    h_KxD = hidden[:, :-1].reshape(b * (s - 1), d)[idx_K]
    targets_K = ids[:, 1:].reshape(-1)[idx_K]
    nll_K = target_nll(head_fn(model, params), h_KxD, targets_K, vocab=model.config.vocab_size,
                       loss_chunk=loss_chunk, n_valid=jnp.sum(valid_K))
    return jnp.sum(jnp.where(valid_K, nll_K, 0.0)), jnp.sum(valid_K)


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    max_targets: int,
    train_model: Any | None = None,
    loss_chunk: int | None = None,
) -> Callable:
    """Returns step(state, frozen, batch_AxBxS) -> (state, metrics); jitted, the state donated.

    `state` = {"params": trainable leaves, "opt_state", "step", "rng"}; gradients are taken with respect to
    the trainable leaves only. `train_model` (e.g. with dropout on) defaults to `model`.
    """
    return jax.jit(train_step_fn(model, tx, max_targets=max_targets, train_model=train_model, loss_chunk=loss_chunk),
                   donate_argnums=(0,))


def train_step_fn(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    max_targets: int,
    train_model: Any | None = None,
    axis_name: str | None = None,
    loss_chunk: int | None = None,
) -> Callable:
    """The unjitted step of `make_train_step` (train/sharding.py jits it with shardings, or pmaps it).

    With `axis_name` (pmap) the target count, loss and gradients are summed over that axis, so every
    device computes the step of the whole batch; dropout keys are folded with the device index. `loss_chunk`:
    targets per chunk of the head + cross-entropy (train/chunked_loss.py; None: auto, 0: off).
    """
    train_model = train_model or model

    def loss_fn(trainable, frozen, micro, key, n_total, accum):
        params = combine(frozen, trainable)
        nll, n = token_nll_sum(train_model, params, micro, max_targets, rngs={"dropout": key}, loss_chunk=loss_chunk)
        # MoE: the router's load-balancing term, averaged over the micro-batches (and pmap devices; 0 without routers).
        aux = router_loss.term(train_model, params, micro, rngs={"dropout": key}) / accum
        if axis_name is not None and router_loss.enabled(train_model):
            aux = aux / jax.lax.psum(1, axis_name)
        return nll / n_total + aux, n

    def step(state, frozen, batch):
        rng, step_key = jax.random.split(state["rng"])
        n_total = jnp.sum(batch["loss_mask"][:, :, 1:] > 0)
        if axis_name is not None:
            n_total = jax.lax.psum(n_total, axis_name)
            step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
        n_total = jnp.maximum(n_total, 1).astype(jnp.float32)
        accum = batch["input_ids"].shape[0]
        keys = jax.random.split(step_key, accum)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])

        def micro_step(carry, xs):
            grads, loss = carry
            micro, key = xs
            (l, _), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, micro, key, n_total, accum)
            return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l), None

        (grads, loss), _ = jax.lax.scan(micro_step, (zeros, jnp.float32(0.0)), (batch, keys))
        if axis_name is not None:
            grads, loss = jax.lax.psum((grads, loss), axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        # A finite loss can still come with an update that overflows; checking the new trainable
        # leaves keeps such a state out of the checkpoints.
        finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": n_total,
                           "finite": finite.astype(jnp.float32)}

    return step


def make_eval_step(model: Any, *, max_targets: int, loss_chunk: int | None = None) -> Callable:
    """Returns eval(params, batch_BxS) -> (nll sum, target count), jitted."""

    def run(params, batch):
        return token_nll_sum(model, params, batch, max_targets, loss_chunk=loss_chunk)

    return jax.jit(run)


def init_state(trainable: Mapping, tx: optax.GradientTransformation, seed: int) -> dict:
    """A fresh train state. The trainable leaves are copied: the step donates its state, and the caller's
    arrays must stay valid."""
    trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), trainable)
    return {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0),
            "rng": jax.random.PRNGKey(seed)}
