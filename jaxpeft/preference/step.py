"""The jitted preference train step and the held-out preference evaluation.

Shape legend: A accumulation micro-steps, R = 2B rows per micro-batch (B chosen rows, then B rejected), S
sequence. The step has train/step.py's shape (state, frozen, batch_AxRxS) -> (state, metrics), so the Trainer
and its runners (the mesh, checkpoints, resume) run it unchanged. Policy and reference log-probs come from
the same tree in the same jitted step: the reference is the tree with the adapter switched off
(`logps.reference_params`), never a second copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.core.errors import ConfigError
from jaxpeft.core.partition import combine
from jaxpeft.preference.data import pair_rows
from jaxpeft.preference.logps import policy_params, row_logps, sequence_stats
from jaxpeft.preference.losses import LOSSES, preference_loss

ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceConfig:
    """The preference objective (TRL's names): loss dpo (TRL's sigmoid) | ipo | orpo, beta, label smoothing
    (dpo only), the prompt budget, the frozen initial adapter the reference uses (None: the base), and the
    weight of TRL's `sft` loss added to dpo / ipo (RPO; 0: none)."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    max_prompt_len: int | None = None
    init_adapter: str | None = None
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r}: expected one of {LOSSES}")
        if not self.beta > 0:
            problems.append(f"beta={self.beta}: expected > 0")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing={self.label_smoothing}: expected in [0, 0.5)")
        if self.label_smoothing and self.loss != "dpo":
            problems.append(f"label_smoothing applies to loss=dpo only, not {self.loss}")
        if not self.sft_weight >= 0:
            problems.append(f"sft_weight={self.sft_weight}: expected >= 0")
        if self.sft_weight and self.loss == "orpo":
            problems.append("sft_weight applies to loss=dpo or ipo; orpo has its own NLL term (weighted by 1)")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            problems.append(f"max_prompt_len={self.max_prompt_len}: expected >= 1")
        if problems:
            raise ConfigError("invalid preference settings: " + "; ".join(problems))

    def metric_names(self) -> tuple[str, ...]:
        return REWARD_METRICS + (ORPO_METRICS if self.loss == "orpo" else ())


def preference_step_fn(model: Any, tx: optax.GradientTransformation, pref: PreferenceConfig, *, max_targets: int,
                       is_added: Callable, train_model: Any | None = None, loss_chunk: int | None = None
                       ) -> Callable:
    """step(state, frozen, batch_AxRxS) -> (state, metrics): the mean of the micro-batches' losses, their
    gradients summed (each divided by A), TRL's metrics averaged over the micro-batches. `loss_chunk`: targets
    per chunk of the head (train/chunked_loss.py; None: auto, 0: off)."""
    train_model = train_model or model

    def loss_fn(trainable, frozen, micro, key):
        seq = sequence_stats(train_model, combine(frozen, trainable), micro, max_targets=max_targets,
                             is_added=is_added, loss=pref.loss, rngs={"dropout": key}, ref_model=model,
                             loss_chunk=loss_chunk)
        return preference_loss(pref.loss, seq, beta=pref.beta, label_smoothing=pref.label_smoothing,
                               sft_weight=pref.sft_weight)

    def step(state, frozen, batch):
        rng, step_key = jax.random.split(state["rng"])
        accum = batch["input_ids"].shape[0]
        keys = jax.random.split(step_key, accum)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        names = pref.metric_names()

        def micro_step(carry, xs):
            grads, loss, sums = carry
            micro, key = xs
            (l, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen, micro, key)
            grads = jax.tree_util.tree_map(lambda a, b: a + b / accum, grads, g)
            return (grads, loss + l / accum, {k: sums[k] + m[k] / accum for k in names}), None

        init = (zeros, jnp.float32(0.0), {k: jnp.float32(0.0) for k in names})
        (grads, loss, sums), _ = jax.lax.scan(micro_step, init, (batch, keys))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                           "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
                           "finite": finite.astype(jnp.float32), **sums}

    return step


class PreferenceEvaluator:
    """Held-out preference accuracy: the fraction of pairs with summed log p(chosen) > log p(rejected) under
    the given parameters (the policy, or the base before training), in fixed-shape batches of `pairs` pairs."""

    def __init__(self, model: Any, pairs: Sequence[Mapping[str, Sequence[int]]], *, seq_len: int, pad_id: int,
                 batch_pairs: int = 16) -> None:
        self.pairs, self.seq_len, self.pad_id = list(pairs), seq_len, pad_id
        self.batch_pairs = max(1, min(batch_pairs, len(self.pairs)))
        k = 2 * self.batch_pairs * (seq_len - 1)

        def logps(params, batch):
            return row_logps(model, policy_params(params), batch, k)["logps"]

        self._logps = jax.jit(logps)

    def __call__(self, params: Mapping) -> dict[str, float]:
        if not self.pairs:
            return {}
        b, wins, margin = self.batch_pairs, 0, 0.0
        for start in range(0, len(self.pairs), b):
            chunk = self.pairs[start:start + b]
            batch = pair_rows(list(chunk) + [chunk[-1]] * (b - len(chunk)), self.seq_len, self.pad_id)
            lp = np.asarray(self._logps(params, {k: jnp.asarray(v) for k, v in batch.items()}))
            n = len(chunk)
            diff = lp[:n] - lp[b:b + n]
            wins += int(np.sum(diff > 0))
            margin += float(np.sum(diff))
        n = len(self.pairs)
        return {"eval_preference_accuracy": wins / n, "eval_logp_margin": margin / n}
