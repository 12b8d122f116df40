"""Preference losses as pure functions of per-sequence log-probabilities: DPO (sigmoid, with conservative
label smoothing), IPO and ORPO, each returning (loss, metrics) with TRL's metric names.

Shape legend: B preference pairs. Inputs are fp32 (B,) arrays:
    policy_chosen, policy_rejected   summed log p(completion | prompt) under the policy (adapter on)
    ref_chosen, ref_rejected         the same under the reference (adapter off, or the frozen init adapter)
    chosen_tokens, rejected_tokens   completion token counts (IPO's length normalisation)

The formulas are TRL 1.16's (`trl/trainer/dpo_trainer.py` `_compute_loss`; ORPO in
`trl/experimental/orpo/orpo_trainer.py`), checked against TRL's own code in tests/test_preference_losses.py:
- dpo: -log sigmoid(beta * delta), delta = (pc - rc) - (pr - rr). With label_smoothing eps > 0 the
  conservative DPO of Mitchell (2023): -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta).
  Note TRL 1.16's `sigmoid` loss no longer reads `label_smoothing` (only `robust`, `exo_pair`, `aot` do); its
  `aot` loss with one pair per batch is exactly this form, which is what the parity test compares against.
- ipo: ((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 beta))^2, per-token normalised as TRL does.
- orpo: takes the *average* per-token log-probs (TRL's ORPO uses `average_log_prob=True`) and the chosen
  rows' NLL (mean cross-entropy over every non-pad token, prompt included, as TRL's ORPO computes it):
  log_odds = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr)); loss = nll - mean(beta * log sigmoid(log_odds)).
- sft_weight w > 0 (dpo, ipo): TRL's multi-loss `loss_type=[<dpo: "sigmoid" | "ipo">, "sft"]`,
  `loss_weights=[1, w]` (RPO, Pang et al. 2024): adds w times the chosen completions' mean token NLL over
  the batch, -sum(pc) / sum(n_c), which keeps the chosen answers likely while the margin grows.
Rewards are beta * log-ratio (ORPO: beta * average log-prob), with no gradient, as TRL logs them.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

LOSSES = ("dpo", "ipo", "orpo")
_LN2 = 0.6931471805599453


def _reward_metrics(chosen_rewards, rejected_rewards, logps_chosen, logps_rejected) -> dict[str, jax.Array]:
    cr, rr = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
    return {"rewards/chosen": jnp.mean(cr), "rewards/rejected": jnp.mean(rr),
            "rewards/accuracies": jnp.mean((cr > rr).astype(jnp.float32)),  # strict: 0 at init, as TRL
            "rewards/margins": jnp.mean(cr - rr),
            "logps/chosen": jnp.mean(jax.lax.stop_gradient(logps_chosen)),
            "logps/rejected": jnp.mean(jax.lax.stop_gradient(logps_rejected))}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO's sigmoid loss (conservative DPO when `label_smoothing` > 0), averaged over the B pairs."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return jnp.mean(per_pair), _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                                               policy_rejected)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, chosen_tokens, rejected_tokens,
             beta: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """IPO: the squared distance of the per-token log-ratio difference from 1 / (2 beta)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio / jnp.maximum(chosen_tokens, 1.0) - rejected_ratio / jnp.maximum(rejected_tokens, 1.0)
    per_pair = (delta - 1.0 / (2.0 * beta)) ** 2
    return jnp.mean(per_pair), _reward_metrics(beta * chosen_ratio, beta * rejected_ratio, policy_chosen,
                                               policy_rejected)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2."""
    return jnp.where(x < -_LN2, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(policy_chosen_avg, policy_rejected_avg, chosen_nll, *, beta: float = 0.1
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ORPO: NLL of the chosen rows minus beta times the mean log-sigmoid of the log odds ratio."""
    log_odds = (policy_chosen_avg - policy_rejected_avg) - (log1mexp(policy_chosen_avg)
                                                            - log1mexp(policy_rejected_avg))
    ratio = jax.nn.log_sigmoid(log_odds)
    loss = chosen_nll - jnp.mean(beta * ratio)
    metrics = _reward_metrics(beta * policy_chosen_avg, beta * policy_rejected_avg, policy_chosen_avg,
                              policy_rejected_avg)
    metrics.update({"nll_loss": jax.lax.stop_gradient(chosen_nll),
                    "log_odds_ratio": jax.lax.stop_gradient(jnp.mean(ratio)),
                    "log_odds_chosen": jax.lax.stop_gradient(jnp.mean(log_odds))})
    return loss, metrics


def chosen_sft_loss(policy_chosen, chosen_tokens) -> jax.Array:
    """TRL's `sft` loss type: the mean NLL over every chosen completion token of the batch."""
    return -jnp.sum(policy_chosen) / jnp.maximum(jnp.sum(chosen_tokens), 1.0)


def preference_loss(kind: str, seq: Mapping[str, jax.Array], *, beta: float, label_smoothing: float = 0.0,
                    sft_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss `kind` (dpo | ipo | orpo) from the per-sequence quantities of `sequence_stats`:
    seq = {policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
    chosen_nll} (ORPO needs no ref_*); `sft_weight` > 0 adds TRL's `sft` term (dpo and ipo)."""
    if kind in ("dpo", "ipo"):
        if kind == "dpo":
            loss, metrics = dpo_loss(seq["policy_chosen"], seq["policy_rejected"], seq["ref_chosen"],
                                     seq["ref_rejected"], beta=beta, label_smoothing=label_smoothing)
        else:
            loss, metrics = ipo_loss(seq["policy_chosen"], seq["policy_rejected"], seq["ref_chosen"],
                                     seq["ref_rejected"], chosen_tokens=seq["chosen_tokens"],
                                     rejected_tokens=seq["rejected_tokens"], beta=beta)
        if sft_weight:
            loss = loss + sft_weight * chosen_sft_loss(seq["policy_chosen"], seq["chosen_tokens"])
        return loss, metrics
    if kind == "orpo":
        return orpo_loss(seq["policy_chosen"] / jnp.maximum(seq["chosen_tokens"], 1.0),
                         seq["policy_rejected"] / jnp.maximum(seq["rejected_tokens"], 1.0), seq["chosen_nll"],
                         beta=beta)
    raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSSES}")
