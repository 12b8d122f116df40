"""Several LoRA adapters of one base, side by side: summed (several active at once) or stacked (one per row).

Legend: N adapters, B batch rows, I/O a kernel's in/out size, R a module's rank (the largest over the
adapters when stacked), K = Σ R_i (summed).

An *adapter tree* holds only LoRA leaves at module paths: lora_a (I, R), lora_b (R, O), lora_scale (),
as `Lora().split(params, config)[0]` returns them. Base leaves are never
copied: the model sees `partition.combine(base, adapter)`.

* `sum_adapters`: one adapter whose delta is Σ_i w_i·s_i·A_i·B_i, built exactly by concatenating the
  factors along the rank (lora_a = [w_i·s_i·A_i], lora_b = [B_i], scale 1): what PEFT's
  `set_adapter([...])` computes, with no (I, O) product formed. Modules that only some adapters adapt
  get the others' zero contribution (they are simply left out of that module's concatenation).
* `stack_adapters`: every leaf gains a leading N axis; ranks are zero-padded to the largest (a zero
  column of A and row of B add nothing), and an adapter that does not adapt a module gets zeros there,
  so rows naming different adapters (different ranks and target sets included) run in one batch.
  `gather_rows` picks each row's adapter by index.
DoRA (its magnitude rescales the whole output, so deltas do not add) and `modules_to_save` (a full copy
of a base weight) are refused by both, with the reason: PEFT's mixed batches refuse DoRA too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, dotted, module_leaves, unflatten_params

LORA_FACTORS = ("lora_a", "lora_b", "lora_scale")


def lora_modules(adapter: Mapping, *, name: str = "adapter", what: str = "combined") -> dict[Path, dict[str, Any]]:
    """{module path: {lora_a, lora_b, lora_scale}} of an adapter tree; one error lists what cannot be `what`."""
    groups = module_leaves(adapter)
    problems = []
    for path, leaves in sorted(groups.items()):
        if "lora_magnitude" in leaves:
            problems.append(f"{name}: {dotted(path)} is DoRA (lora_magnitude rescales the whole output, so DoRA "
                            f"deltas do not add); DoRA adapters cannot be {what}, use them one at a time")
        elif set(leaves) != set(LORA_FACTORS):
            problems.append(f"{name}: {dotted(path)} holds {sorted(leaves)}, not just {list(LORA_FACTORS)}: pass "
                            "the adapter leaves alone (Lora().split(params, config)[0]); full weights "
                            f"(modules_to_save) cannot be {what}, serve such an adapter on its own")
    if problems:
        more = [f"... and {len(problems) - 10} more"] if len(problems) > 10 else []
        raise ConfigError(f"cannot use these adapters {what}:\n" + bullet_list(problems[:10] + more))
    if not groups:
        raise ConfigError(f"{name} has no LoRA leaves; pass Lora().split(params, config)[0] of an adapted tree")
    return groups


def sum_adapters(adapters: Sequence[Mapping], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> dict:
    """One adapter tree whose delta at every module is Σ_i w_i·ΔW_i (weights default to 1): see the module doc."""
    if not adapters:
        raise ConfigError("sum_adapters needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter")
    modules = [lora_modules(a, name=n, what="active together") for a, n in zip(adapters, names)]
    _check_shapes(modules, names)
    out: dict[Path, Any] = {}
    for path in sorted(set().union(*modules)):
        present = [(w, m[path]) for w, m in zip(weights, modules) if path in m]
        a_IxK = jnp.concatenate([(w * jnp.asarray(leaves["lora_scale"], jnp.float32)).astype(leaves["lora_a"].dtype)
                                 * leaves["lora_a"] for w, leaves in present], axis=1)
        b_KxO = jnp.concatenate([leaves["lora_b"] for _, leaves in present], axis=0)
        out[path + ("lora_a",)], out[path + ("lora_b",)] = a_IxK, b_KxO
        out[path + ("lora_scale",)] = jnp.asarray(1.0, jnp.float32)
    return unflatten_params(out)


def stack_adapters(adapters: Sequence[Mapping], names: Sequence[str] | None = None) -> dict:
    """Adapter trees stacked on a new leading N axis (ranks zero-padded, absent modules zero): see the module doc.

    Returns {module path: lora_a (N, I, R), lora_b (N, R, O), lora_scale (N,)} as a nested tree.
    """
    if not adapters:
        raise ConfigError("stack_adapters needs at least one adapter")
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    modules = [lora_modules(a, name=n, what="batched per example") for a, n in zip(adapters, names)]
    shapes = _check_shapes(modules, names)
    out: dict[Path, Any] = {}
    for path in sorted(shapes):
        (in_dim, out_dim), rank = shapes[path], max(int(m[path]["lora_a"].shape[1]) for m in modules if path in m)
        dtype = jnp.result_type(*[m[path]["lora_a"].dtype for m in modules if path in m])
        a, b, s = [], [], []
        for m in modules:
            leaves = m.get(path)
            if leaves is None:
                a.append(jnp.zeros((in_dim, rank), dtype))
                b.append(jnp.zeros((rank, out_dim), dtype))
                s.append(jnp.zeros((), jnp.float32))
                continue
            pad = rank - int(leaves["lora_a"].shape[1])
            a.append(jnp.pad(jnp.asarray(leaves["lora_a"], dtype), ((0, 0), (0, pad))))
            b.append(jnp.pad(jnp.asarray(leaves["lora_b"], dtype), ((0, pad), (0, 0))))
            s.append(jnp.asarray(leaves["lora_scale"], jnp.float32))
        out[path + ("lora_a",)], out[path + ("lora_b",)] = jnp.stack(a), jnp.stack(b)
        out[path + ("lora_scale",)] = jnp.stack(s)
    return unflatten_params(out)


def gather_rows(stacked: Mapping, adapter_ids_B: jax.Array) -> dict:
    """Each row's adapter: every (N, ...) leaf indexed by `adapter_ids_B` -> (B, ...)."""
    return jax.tree.map(lambda leaf: jnp.take(leaf, adapter_ids_B, axis=0), dict(stacked))


def _check_shapes(modules: Sequence[Mapping[Path, Mapping[str, Any]]], names: Sequence[str]) -> dict[Path, tuple]:
    """{module: (I, O)}; one error lists every module whose shapes disagree across the adapters."""
    shapes: dict[Path, dict[str, tuple[int, int]]] = {}
    for m, n in zip(modules, names):
        for path, leaves in m.items():
            shapes.setdefault(path, {})[n] = (int(leaves["lora_a"].shape[0]), int(leaves["lora_b"].shape[1]))
    odd = [f"{dotted(p)}: (in, out) {by}" for p, by in sorted(shapes.items()) if len(set(by.values())) > 1]
    if odd:
        raise ConfigError("the adapters were made for different base shapes:\n" + bullet_list(odd)
                          + "\nUse adapters trained on the same base model.")
    return {p: next(iter(by.values())) for p, by in shapes.items()}
