"""Memory planning: an analytic plan of a train step's memory, and its cross-check against XLA."""

from jaxpeft.plan.analytic import GB, METHODS, Item, MemoryPlan, PlanConfig, layer_count_scaled, nf4_bytes, plan_memory
from jaxpeft.plan.shapes import ARTICLE_GB, PRESETS, resolve_model

__all__ = ["ARTICLE_GB", "GB", "METHODS", "PRESETS", "Item", "MemoryPlan", "PlanConfig", "layer_count_scaled",
           "nf4_bytes", "plan_memory", "resolve_model"]
