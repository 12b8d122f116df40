"""Merging: weighted combinations of LoRA adapters (PEFT's add_weighted_adapter) and task-vector merges."""

from jaxpeft.merge.combine import COMBINATION_TYPES, combine_adapters
from jaxpeft.merge.ops import (dare_linear, dare_ties, disjoint_merge, magnitude_prune, majority_sign_mask,
                               merge_full_models, merge_task_tensors, prune_magnitude, prune_random, task_arithmetic,
                               ties)
from jaxpeft.merge.unload import merge_and_unload, save_merged

__all__ = ["COMBINATION_TYPES", "combine_adapters", "dare_linear", "dare_ties", "disjoint_merge", "magnitude_prune",
           "majority_sign_mask", "merge_and_unload", "merge_full_models", "merge_task_tensors", "prune_magnitude",
           "prune_random", "save_merged", "task_arithmetic", "ties"]
