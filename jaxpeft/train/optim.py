"""Optimizers over the trainable partition only, and the masked full-tree variant that guards it.

The train step differentiates with respect to the trainable partition, so gradients and optimizer
state exist only for trainable leaves. `masked` wraps any optax transform for users who pass the
whole tree: frozen leaves get `set_to_zero` (no state, no update).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import optax

from jaxpeft.core.partition import FROZEN, TRAINABLE, check_labels


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 2e-4
    warmup_steps: int = 10
    total_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to 0 at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(cfg.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.total_steps, warmup + 1), 0.0)


def adamw(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clipping + AdamW with warm-up/cosine; no weight decay on vectors (biases, norms, DoRA magnitudes)."""
    decay_mask = lambda tree: jax.tree_util.tree_map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def masked(tx: optax.GradientTransformation, labels: Mapping) -> optax.GradientTransformation:
    """`tx` on trainable leaves, `set_to_zero` on frozen ones: for code that hands optax the whole tree."""
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def checked_masked(tx: optax.GradientTransformation, params: Mapping, labels: Mapping):
    """`masked`, after checking that every leaf carries a label (an unlabelled leaf is an error)."""
    check_labels(params, labels)
    return masked(tx, labels)
