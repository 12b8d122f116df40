"""What a PEFT method registers for the model to call. The model and its ops know no method by name.

Three kinds of hook, each registered by the method that owns it (`jaxpeft.methods.register_builtins`, which
`import jaxpeft` calls once; a method of your own calls `register_*` the same way):

- `LinearAdapter`: leaves beside a linear kernel, keyed by leaf name, and what they do to y = x W + b
  (LoRA/DoRA add to the matmul's output, IA3 scales the input or the output). `ops.linear` accepts
  exactly the kernel leaves and the registered adapter leaves; any other leaf is an error naming it.
- `ResidualHook`: a subtree of a decoder layer, under a key, that replaces the residual add at the end of
  one of the layer's sublayers (bottleneck adapters after attention and after the MLP).
- `ParamAdapter`: leaves beside a bare (non-linear) parameter, e.g. a 3-D stack of expert weights, and how they
  change it before use (LoRA's per-expert delta). The module holding the parameter reads it through
  `adapted_param`, which accepts exactly the parameter and the registered adapters' leaves.
- `VirtualTokenSource`: leaves that put P virtual tokens in front of every sequence, as keys and values in
  the first P slots of the KV cache (prefix tuning's prefixes, prompt tuning's embeddings). The source
  says how many and computes their keys and values; the model does the rest.

Each hook also names where its leaves sit, so a model that meets a leaf no hook owns refuses it by name
instead of ignoring it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax

# KV pairs of the virtual tokens, per layer: (keys, values), each (P, K, E).
LayerKV = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class LinearAdapter:
    """Leaves beside a linear kernel. Stages run in this order around y = x W + b:

    scale_input(x, leaves, dtype) -> x                       before the matmul
    add_to_output(x, x_dropped, y, leaves, dtype, dropped) -> y   after it, before the bias
    scale_output(y, leaves, dtype) -> y                      after the bias
    `dropped` says whether `x_dropped` went through dropout (`uses_dropout` hooks get it when training).
    """

    name: str
    leaves: tuple[str, ...]  # every leaf name the hook owns
    trigger: str  # the leaf whose presence turns the hook on
    scale_input: Callable[..., jax.Array] | None = None
    add_to_output: Callable[..., jax.Array] | None = None
    scale_output: Callable[..., jax.Array] | None = None
    uses_dropout: bool = False


@dataclasses.dataclass(frozen=True)
class ResidualHook:
    """`apply(out, residual, leaves, dtype=..., dropout=...) -> h` at the end of sublayer `site`
    ("attention" or "mlp") of every layer whose params hold `key`."""

    key: str
    site: str
    apply: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class VirtualTokenSource:
    """Virtual tokens from the parameters.

    count(params) -> P, or 0 when the params do not carry this source.
    layer_kv(params, config, run_embeddings) -> [(k, v) (P, K, E) per layer]; `run_embeddings(embeds_PxD)`
        runs the model over embeddings alone (positions 0..P-1) and returns their per-layer keys and values.
    top_keys: keys of the params' top level the source owns; attention_leaves: leaves it puts in a layer's
        attention scope.
    """

    name: str
    description: str
    count: Callable[[Mapping], int]
    layer_kv: Callable[[Mapping, Any, Callable], list[LayerKV]]
    top_keys: tuple[str, ...] = ()
    attention_leaves: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ParamAdapter:
    """Leaves beside a bare parameter `weight` (a scope holding that one tensor, e.g. one MoE expert stack):
    `adapt(weight, leaves, dtype) -> weight`, the parameter the module uses, in `dtype`."""

    name: str
    leaves: tuple[str, ...]
    trigger: str
    adapt: Callable[..., jax.Array]


LINEAR_ADAPTERS: dict[str, LinearAdapter] = {}
PARAM_ADAPTERS: dict[str, ParamAdapter] = {}
RESIDUAL_HOOKS: dict[str, ResidualHook] = {}
VIRTUAL_SOURCES: dict[str, VirtualTokenSource] = {}


def register_linear(hook: LinearAdapter) -> LinearAdapter:
    taken = {leaf: other.name for other in LINEAR_ADAPTERS.values() if other.name != hook.name for leaf in other.leaves}
    clash = sorted(leaf for leaf in hook.leaves if leaf in taken)
    if clash:
        raise ValueError(f"linear adapter {hook.name!r} claims leaves {clash} already owned by "
                         f"{sorted({taken[c] for c in clash})}")
    LINEAR_ADAPTERS[hook.name] = hook
    return hook


def register_param(hook: ParamAdapter) -> ParamAdapter:
    PARAM_ADAPTERS[hook.name] = hook
    return hook


def adapted_param(leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    """A bare parameter's `weight` in `dtype` after every registered param adapter its leaves turn on; a leaf no
    adapter owns is refused by name."""
    known = {"weight", *(leaf for hook in PARAM_ADAPTERS.values() for leaf in hook.leaves)}
    unknown = sorted(set(leaves) - known)
    if unknown:
        raise ValueError(f"a bare parameter's scope holds leaves {unknown} that no registered hook owns (known: "
                         f"{sorted(known)}); an adapter's leaves are honoured once its method registered a "
                         "hooks.ParamAdapter")
    weight = leaves["weight"].astype(dtype)
    for hook in PARAM_ADAPTERS.values():
        if hook.trigger in leaves:
            weight = hook.adapt(weight, leaves, dtype)
    return weight


def register_residual(hook: ResidualHook) -> ResidualHook:
    RESIDUAL_HOOKS[hook.key] = hook
    return hook


def register_virtual(source: VirtualTokenSource) -> VirtualTokenSource:
    VIRTUAL_SOURCES[source.name] = source
    return source


def linear_leaf_names() -> set[str]:
    return {leaf for hook in LINEAR_ADAPTERS.values() for leaf in hook.leaves}


def active_linear(leaves: Mapping[str, Any]) -> list[LinearAdapter]:
    """The registered linear adapters a module's leaves turn on, in registration order."""
    return [hook for hook in LINEAR_ADAPTERS.values() if hook.trigger in leaves]


def wants_dropout(leaves: Mapping[str, Any]) -> bool:
    return any(hook.uses_dropout for hook in active_linear(leaves))


def residual_add(site: str, layer_params: Mapping[str, Any], residual: jax.Array, out: jax.Array, *, dtype: Any,
                 dropout: Callable[[jax.Array], jax.Array] | None) -> jax.Array:
    """residual + out, or what the residual hook registered at `site` makes of them when the layer holds one."""
    for hook in RESIDUAL_HOOKS.values():
        if hook.site == site and hook.key in layer_params:
            return hook.apply(out, residual, layer_params[hook.key], dtype=dtype, dropout=dropout)
    return residual + out


def virtual_source(params: Mapping) -> tuple[VirtualTokenSource | None, int]:
    """(the source whose leaves the params carry, its P), or (None, 0); two sources at once are an error."""
    found = [(source, source.count(params)) for source in VIRTUAL_SOURCES.values()]
    found = [(source, n) for source, n in found if n]
    if len(found) > 1:
        names = " and ".join(source.description for source, _ in found)
        raise ValueError(f"the parameters carry both {names} leaves; use one virtual-token method at a time")
    return found[0] if found else (None, 0)


def check_known(scope: str, keys: Sequence[str], own: Sequence[str]) -> None:
    """Refuses keys in a model scope ("top", "layer" or "attention") that are neither the model's own modules
    nor owned by a registered hook, naming each one."""
    allowed = set(own)
    if scope == "top":
        allowed |= {k for s in VIRTUAL_SOURCES.values() for k in s.top_keys}
    elif scope == "layer":
        allowed |= set(RESIDUAL_HOOKS)
    elif scope == "attention":
        allowed |= {k for s in VIRTUAL_SOURCES.values() for k in s.attention_leaves}
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ValueError(f"the parameters carry {unknown} in the model's {scope} scope, which no registered hook "
                         f"owns (known there: {sorted(allowed)}). A PEFT method's leaves are honoured only once the "
                         "method has registered its hooks (import jaxpeft does it for the built-in methods).")
