"""Layer rematerialisation that XLA's CPU pipeline honours, and the GPU's host-offload variant.

`nn.remat` (jax.checkpoint) keeps only a layer's inputs and recomputes the rest in the backward; what
stops XLA from merging that recomputation with the forward's (CSE) or running it early is an
optimization barrier, and the CPU pipeline drops optimization barriers (`kernels/frozen.tie_to`'s
docstring). Measured on SmolLM2 widths at 4k tokens with the blockwise attention (compile only, 2 and
4 layers): `nn.remat` keeps 98 MB a layer against 218 MB without it, where the layer input alone is
9.4 MB: the recomputed activations of every layer stay alive until the weight gradients, which XLA
runs late.

`checkpoint` here is a custom VJP with data dependencies instead of barriers (the project's `tie_to`
idiom): the forward keeps the layer's inputs only; the backward (1) ties the float inputs to the
incoming cotangent, so the recomputation can start only once the backward reaches the layer and is
never the forward's expression (no CSE), (2) recomputes and takes the VJP with respect to the
differentiated inputs only (the frozen base gets no gradient computed: `symbolic_zeros`), and
(3) ties the input cotangent to the parameter gradients, so the layer's weight gradients are done
before the layer below starts and its recomputed activations die with it.

The parameters are tied too (the forward to the layer's inputs, the backward to the cotangent): work that
depends on a weight alone, such as the RMSNorm weights broadcast to [B, S, D], would otherwise be hoisted by
XLA to the start of the step and shared between the forward and the recomputation, so every layer's
broadcasts stayed alive across the whole backward (4 hidden-sized fp32 tensors a layer; 63 -> 35 MB a
layer at 4k tokens with this tie, same probe).

`run_layer` applies it to a Flax layer (an unbound copy applied to its own parameter subtree).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxpeft.kernels.frozen import tie_to

REMAT_CHOICES = (False, True, "offload")


def _is_float(x: Any) -> bool:
    return isinstance(x, jax.Array | jnp.ndarray) and jnp.issubdtype(x.dtype, jnp.inexact)


def _anchor(tree: Any) -> jax.Array | None:
    """An fp32 scalar that depends on every float leaf of `tree` (one element each), or None."""
    leaves = [x for x in jax.tree.leaves(tree) if _is_float(x) and x.size]
    if not leaves:
        return None
    return sum(jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32) for x in leaves)


def _tie_tree(tree: Any, anchor: jax.Array | None) -> Any:
    if anchor is None:
        return tree
    return jax.tree.map(lambda x: tie_to(x, anchor) if _is_float(x) else x, tree)


class _Flags:
    """Which leaves were differentiated: a pytree node with no children (the flags are static)."""

    def __init__(self, flags):
        self.flags = flags


jax.tree_util.register_pytree_node(_Flags, lambda f: ((), f.flags), lambda flags, _: _Flags(flags))


def _zeros(aval) -> Any:
    if aval.dtype == jax.dtypes.float0:
        return np.zeros(aval.shape, jax.dtypes.float0)
    return jnp.zeros(aval.shape, aval.dtype)


def checkpoint(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """fn(params, args) -> outputs, recomputed in the backward (see the module docstring)."""

    @jax.custom_vjp
    def call(params, args):
        return fn(params, args)

    def fwd(params, args):
        values = jax.tree.map(lambda p: p.value, (params, args), is_leaf=lambda p: hasattr(p, "perturbed"))
        flags = jax.tree.map(lambda p: p.perturbed, (params, args), is_leaf=lambda p: hasattr(p, "perturbed"))
        params, args = values
        params = _tie_tree(params, _anchor(args))  # the layer's weight-only work (norm broadcasts) not hoisted
        return fn(params, args), (values, _Flags(jax.tree.leaves(flags)))

    def bwd(residual, d_out):
        values, flags = residual
        zero = lambda d: isinstance(d, SymbolicZero)  # noqa: E731
        given = [d for d in jax.tree.leaves(d_out, is_leaf=zero) if not zero(d)]
        d_out = jax.tree.map(lambda d: _zeros(d.aval) if zero(d) else d, d_out, is_leaf=zero)
        params, args = values
        anchor = _anchor(given)  # recompute only once the cotangent exists, the weight-only work included
        params, args = _tie_tree(params, anchor), _tie_tree(args, anchor)
        leaves, treedef = jax.tree.flatten((params, args))
        perturbed = [i for i, f in enumerate(flags.flags) if f and _is_float(leaves[i])]

        def recompute(diff):
            full = list(leaves)
            for i, x in zip(perturbed, diff):
                full[i] = x
            return fn(*jax.tree.unflatten(treedef, full))

        _, vjp = jax.vjp(recompute, [leaves[i] for i in perturbed])
        (grads,) = vjp(d_out)
        n_params = len(jax.tree.leaves(params))
        param_grads = [g for i, g in zip(perturbed, grads) if i < n_params]
        anchor = _anchor(param_grads)  # the layer's weight gradients before its input cotangent
        full = [None] * len(leaves)
        for i, g in zip(perturbed, grads):
            full[i] = g if i < n_params or anchor is None else tie_to(g, anchor)
        return tuple(jax.tree.unflatten(treedef, full))

    call.defvjp(fwd, bwd, symbolic_zeros=True)
    return call


def run_layer(parent: nn.Module, layer: nn.Module, args: tuple, remat: bool | str) -> Any:
    """`layer(*args)`, checkpointed when `remat` (True: `checkpoint`; "offload": jax.checkpoint saving the
    dot outputs to host memory, GPU only). `layer` is a child of `parent` built in its compact call."""
    if remat not in REMAT_CHOICES:
        raise ValueError(f"remat={remat!r}: expected one of {list(REMAT_CHOICES)}")
    if not remat or parent.is_initializing():
        return layer(*args)
    if remat == "offload":
        check_offload()
        policy = jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        return nn.remat(type(layer), policy=policy)(**_fields(layer), name=layer.name)(*args)
    params = parent.variables["params"][layer.name]
    unbound = layer.clone(parent=None, name=None)
    rng = None
    if getattr(layer, "dropout_rate", 0) > 0 and not getattr(layer, "deterministic", True):
        rng = parent.make_rng("dropout")

    def fn(p, a):
        call_args, key = a
        return unbound.apply({"params": p}, *call_args, rngs=None if key is None else {"dropout": key})

    return checkpoint(fn)(params, (args, rng))


def _fields(layer: nn.Module) -> dict[str, Any]:
    return {f: getattr(layer, f) for f in layer.__dataclass_fields__ if f not in ("parent", "name")}


def check_offload() -> None:
    """Host offload of checkpointed activations needs an accelerator's pinned host memory."""
    if jax.default_backend() == "cpu":
        raise ValueError("--remat_offload moves checkpointed activations to host memory, which only a GPU/TPU has "
                         "(here the activations already live on the host); use --remat on the CPU.")


__all__ = ["REMAT_CHOICES", "check_offload", "checkpoint", "run_layer"]
