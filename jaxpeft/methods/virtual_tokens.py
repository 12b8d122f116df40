"""What prompt tuning and prefix tuning share: checks on the number of virtual tokens and on the tree.

Both methods put P virtual tokens in front of every sequence: each registers a `hooks.VirtualTokenSource`
that finds its leaves in the parameter tree, and the model (`models/causal_lm.py`) fills the first P slots
of a KV cache with their keys and values and returns outputs for the real tokens only, whose positions
start at P. Their PEFT folders: `jaxpeft.convert.peft.prompt_learning`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params, kernel_shape

# Leaves of either method: a tree that has one of them cannot take another virtual-token adapter.
VIRTUAL_LEAVES = ("prompt", "prefix_encoder", "prefix_key", "prefix_value")


def check_count(num_virtual_tokens: int, method: str) -> list[str]:
    """The problem with a virtual-token count, if any (for a config's one error listing every problem)."""
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        return [f"num_virtual_tokens={num_virtual_tokens!r}: {method} needs at least 1 virtual token"]
    return []


def check_fits_context(num_virtual_tokens: int, model_config: Any) -> None:
    """The virtual tokens take the first P positions; at least one must be left for real tokens."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and num_virtual_tokens >= limit:
        raise ConfigError(f"num_virtual_tokens={num_virtual_tokens} fills the model's whole context "
                          f"(max_position_embeddings={limit}): the real tokens' positions start after the virtual "
                          f"ones. Use fewer than {limit} virtual tokens (and leave room for your sequences).")


def refuse_virtual(params: Mapping) -> None:
    """Refuses a tree that already carries prompt or prefix leaves (one virtual-token adapter at a time)."""
    found = sorted({"/".join(p) for p in flatten_params(params) if p[0] in VIRTUAL_LEAVES or p[-1] in VIRTUAL_LEAVES})
    if found:
        more = " ..." if len(found) > 4 else ""
        raise ConfigError(f"these parameters already carry virtual-token leaves ({found[:4]}{more}); split that "
                          "adapter off (method.split(...)[1]) before adding another")


def base_shapes(params: Mapping) -> dict[str, int]:
    """Shapes of the base model read off the tree: layers L, hidden D, kv width K*E, vocab V."""
    model = params["model"]
    layers = model["layers"]
    attn = layers["0"]["self_attn"]
    if "k_proj" in attn:
        kv_width = kernel_shape(attn["k_proj"])[1]
    else:  # fused q, k, v (Phi-3's qkv_proj): K*E = (its width - the query width o_proj reads) / 2
        kv_width = (kernel_shape(attn["qkv_proj"])[1] - kernel_shape(attn["o_proj"])[0]) // 2
    vocab, hidden = np.shape(model["embed_tokens"]["embedding"])
    return {"layers": len(layers), "hidden": int(hidden), "kv_width": int(kv_width), "vocab": int(vocab)}
