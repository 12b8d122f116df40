"""The MoE router's load-balancing loss as a term of the training loss (transformers' `router_aux_loss_coef *
aux_loss`, added when the config sets `output_router_logits`, as transformers' `*ForCausalLM.forward` does).

Kept apart from the causal-LM loss (`step.py` calls `term` once per micro-batch and averages over them): it runs
the model with the `intermediates` collection mutable and reads the router logits each sparse layer sows
(`models/moe.py`). That is a second forward of the body when enabled (XLA may share it with the loss's own
forward; not measured); models without routers, or with the loss off, add exactly 0 and run nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxpeft.models.moe import load_balancing_loss, router_logits_of


def enabled(model: Any) -> bool:
    c = model.config
    return bool(getattr(c, "output_router_logits", False)) and getattr(c, "num_experts", 0) > 0


def aux_loss(model: Any, params: Mapping, batch: Mapping[str, jax.Array], rngs=None) -> jax.Array:
    """transformers' `aux_loss` (the load-balancing loss before the coefficient) of one batch, padding left out."""
    c = model.config
    _, state = model.apply(
        {"params": params}, batch["input_ids"], attention_mask_BxS=batch["attention_mask"],
        positions_BxS=batch.get("positions"), segment_ids_BxS=batch.get("segment_ids"), return_hidden=True,
        rngs=rngs, mutable=["intermediates"])
    return load_balancing_loss(router_logits_of(state), c.num_experts, c.num_experts_per_tok,
                               batch["attention_mask"])


def term(model: Any, params: Mapping, batch: Mapping[str, jax.Array], rngs=None) -> jax.Array:
    """router_aux_loss_coef * aux_loss when the model's config asks for it, else 0."""
    if not enabled(model):
        return jnp.float32(0.0)
    return model.config.router_aux_loss_coef * aux_loss(model, params, batch, rngs)
