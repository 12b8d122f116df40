"""`merge_and_unload`: fold a trained adapter into the base weights and drop its leaves, for any method that can.

The method registry decides: `method.merge` folds (LoRA and DoRA: W + s·AB, rescaled for DoRA; a
quantized base kernel is dequantized into a dense one), and every leaf the method added (`is_added`)
must be gone afterwards, so the result is a plain tree that `save_hf_folder` writes and transformers
loads. Methods that change the computation rather than the weights (prompt and prefix tuning,
bottleneck adapters) are not `mergeable` and are refused with the reason.
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import dotted, flatten_params
from jaxpeft.methods.base import Method, get_method


def merge_and_unload(params: Mapping, method: str | Method, config: Any = None) -> dict:
    """`params` (base + the method's leaves) with the adapter merged in and no adapter leaves left.

    `method` is a registered name ("lora", ...) or a `Method`; `config` is the method's config (LoRA reads
    everything it needs from its leaves and accepts None). Raises ConfigError for a method that cannot
    merge, and if leaves the method added survive its merge (a method bug, named leaf by leaf).
    """
    m = get_method(method) if isinstance(method, str) else method
    if not m.mergeable:
        raise ConfigError(f"{m.name} cannot be merged into the base weights (it changes the computation, not the "
                          "weights); keep the adapter and the base separate instead of merge_and_unload")
    merged = m.merge(params, config)
    left = [dotted(p) for p in flatten_params(merged) if m.is_added(p, config)]
    if left:
        raise ConfigError(f"{m.name}.merge left adapter leaves behind:\n{bullet_list(left[:20])}\n"
                          "This is a bug in the method's merge; report it with the method config.")
    return merged
