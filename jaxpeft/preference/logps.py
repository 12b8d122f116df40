"""Per-sequence log-probabilities of the completions of a concatenated preference batch.

Shape legend: B pairs, R = 2B rows (the B chosen rows first, then the B rejected ones, one forward), S
sequence, D hidden, K static target slots, V vocab. The loss-mask convention is data/encode.py's:
loss_mask[r, t] == 1 when token t is a completion token, predicted by the hidden state at t - 1.

The reference of DPO and IPO is the same parameter tree with the adapter switched off (`reference_params`):
a tree edit that drops the adapter's own leaves (or swaps in the frozen initial adapter, kept as `ref_*`
siblings), so the base weights are shared, never copied, and both passes run in one jitted step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxpeft.core.tree import Path, flatten_params, unflatten_params
from jaxpeft.train.chunked_loss import target_nll
from jaxpeft.train.step import head_fn, target_slots

REF_PREFIX = "ref_"  # frozen copy of an --init_adapter leaf, beside it: lora_a -> ref_lora_a


def row_logps(model: Any, params: Mapping, batch: Mapping[str, jax.Array], max_targets: int, *, rngs=None,
              with_nll_rows: int = 0, loss_chunk: int | None = None) -> dict[str, jax.Array]:
    """{"logps": (R,) summed completion log-probs, "tokens": (R,) completion token counts} and, with
    `with_nll_rows` = n > 0, "nll": the mean cross-entropy over every attended token (prompt included) of the
    first n rows (ORPO's chosen NLL). The head runs over chunks of `loss_chunk` targets (train/chunked_loss.py;
    None: auto, 0: all at once)."""
    ids_RxS = batch["input_ids"]
    hidden_RxSxD = model.apply({"params": params}, ids_RxS, attention_mask_BxS=batch["attention_mask"],
                               positions_BxS=batch.get("positions"), return_hidden=True, rngs=rngs)
    r, s, d = hidden_RxSxD.shape
    idx_K, valid_K = target_slots(batch["loss_mask"], max_targets)
    h_KxD = hidden_RxSxD[:, :-1].reshape(r * (s - 1), d)[idx_K]
    targets_K = ids_RxS[:, 1:].reshape(-1)[idx_K]
    head, vocab = head_fn(model, params), model.config.vocab_size
    logp_K = -target_nll(head, h_KxD, targets_K, vocab=vocab, loss_chunk=loss_chunk)
    logp_K = jnp.where(valid_K, logp_K, 0.0)
    rows_K = idx_K // (s - 1)
    out = {"logps": jax.ops.segment_sum(logp_K, rows_K, num_segments=r),
           "tokens": jnp.sum(batch["loss_mask"][:, 1:] > 0, axis=1).astype(jnp.float32)}
    if with_nll_rows:
        n = with_nll_rows
        h_NxD = hidden_RxSxD[:n, :-1].reshape(n * (s - 1), d)
        tgt_N = ids_RxS[:n, 1:].reshape(-1)
        nll_N = target_nll(head, h_NxD, tgt_N, vocab=vocab, loss_chunk=loss_chunk)
        mask_N = batch["attention_mask"][:n, 1:].reshape(-1) > 0
        out["nll"] = jnp.sum(jnp.where(mask_N, nll_N, 0.0)) / jnp.maximum(jnp.sum(mask_N), 1)
    return out


def reference_params(params: Mapping, is_added: Callable[[Path], bool]) -> dict:
    """The tree with the adapter switched off: every leaf `is_added(path)` says the adapter added is dropped,
    unless a frozen `ref_<leaf>` sibling holds the initial adapter, which then takes its place. No array is
    copied."""
    flat = flatten_params(params)
    with_ref = {p[:-1] for p in flat if p[-1].startswith(REF_PREFIX)}
    out = {}
    for path, leaf in flat.items():
        name = path[-1]
        if name.startswith(REF_PREFIX):
            out[path[:-1] + (name[len(REF_PREFIX):],)] = leaf
        elif is_added(path) and path[:-1] not in with_ref:
            continue  # the adapter's own leaf: switched off
        elif path[:-1] + (REF_PREFIX + name,) not in flat:
            out[path] = leaf
    return unflatten_params(out)


def policy_params(params: Mapping) -> dict:
    """The tree without the frozen `ref_*` copies (the policy's own view)."""
    return unflatten_params({p: v for p, v in flatten_params(params).items() if not p[-1].startswith(REF_PREFIX)})


def sequence_stats(model: Any, params: Mapping, batch: Mapping[str, jax.Array], *, max_targets: int,
                   is_added: Callable[[Path], bool], loss: str, rngs=None, ref_model: Any = None,
                   loss_chunk: int | None = None) -> dict[str, jax.Array]:
    """What `losses.preference_loss` reads, for one concatenated micro-batch of R = 2B rows: the policy's
    summed completion log-probs, the reference's (no gradient; not for ORPO), the completion token counts and
    (ORPO) the chosen rows' NLL."""
    b = batch["input_ids"].shape[0] // 2
    pol = row_logps(model, policy_params(params), batch, max_targets, rngs=rngs,
                    with_nll_rows=b if loss == "orpo" else 0, loss_chunk=loss_chunk)
    seq = {"policy_chosen": pol["logps"][:b], "policy_rejected": pol["logps"][b:],
           "chosen_tokens": pol["tokens"][:b], "rejected_tokens": pol["tokens"][b:]}
    if loss == "orpo":
        seq["chosen_nll"] = pol["nll"]
    else:
        ref_tree = jax.lax.stop_gradient(reference_params(params, is_added))
        ref = row_logps(ref_model or model, ref_tree, batch, max_targets, loss_chunk=loss_chunk)["logps"]
        seq["ref_chosen"], seq["ref_rejected"] = ref[:b], ref[b:]
    return seq
