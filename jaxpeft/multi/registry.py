"""Several LoRA adapters held beside one base tree: add, load, delete, activate one or several, disable.

Legend: B batch, S sequence, V vocab.

`AdapterRegistry(model, base_params)` keeps the base tree once and each adapter as its LoRA leaves
only (`Lora().split(...)[0]`). The active set decides what the model computes:
* one adapter: its own leaves;
* several (`set_adapter(["a", "b"])`): their deltas add, as PEFT's list `set_adapter` does, built
  exactly by `stack.sum_adapters` (factors concatenated along the rank);
* none (`disable_adapters()`): the base model (no adapter leaves, so no adapter maths at all).

Switching does not recompile: `logits` is one `jax.jit` whose arguments are the base tree and the
active adapter's leaves, so changing adapters changes argument values, not the traced program. Adapters
of the same shapes (ranks, targets, dtypes) share a compilation; a different shape compiles once more
and is then cached too. `traces` counts the traces (each one is a compilation). `generate` passes the
active tree to `models.generate.generate`, whose jitted decode loop takes params as an argument in the
same way. Rows that need different adapters in one batch: `per_example_logits`/`per_example_generate`
(over every held adapter, so those need every held adapter to be plain LoRA: no DoRA, no modules_to_save).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.core import partition
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import flatten_params
from jaxpeft.merge.unload import merge_and_unload
from jaxpeft.methods.lora import LORA_LEAVES, Lora, LoraConfig, load_peft_adapter
from jaxpeft.models.generate import generate
from jaxpeft.multi import batched
from jaxpeft.multi.stack import sum_adapters

_LORA = Lora()


class AdapterRegistry:
    """Named LoRA adapters on one base; see the module doc. Not thread-safe (the active set is state)."""

    def __init__(self, model: Any, base_params: Mapping) -> None:
        carried = sorted({"/".join(p[:-1]) for p in flatten_params(base_params) if p[-1] in LORA_LEAVES})
        if carried:
            raise ConfigError(f"the base parameters already carry LoRA leaves (at {carried[:3]}...); pass the base "
                              "tree (Lora().split(params, config)[1]) and add the adapter by name")
        self.model = model
        self.base = dict(base_params)
        self._adapters: dict[str, tuple[dict, LoraConfig]] = {}
        self._active: tuple[str, ...] = ()
        self.traces = 0
        self._forward = jax.jit(self._traced_forward)
        self._stacked: batched.StackedLora | None = None
        self._summed: tuple[tuple[str, ...], dict] | None = None  # the active set's sum, while it is active

    # ---- holding adapters -------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    def config(self, name: str) -> LoraConfig:
        self._check_known([name])
        return self._adapters[name][1]

    def adapter(self, name: str) -> dict:
        """The adapter's own leaves (LoRA factors and any modules_to_save weights)."""
        self._check_known([name])
        return self._adapters[name][0]

    def add(self, name: str, params: Mapping, config: LoraConfig) -> None:
        """Holds the LoRA in `params` (a full adapted tree or its adapter leaves) as `name`."""
        if not name or name == batched.BASE:
            raise ConfigError(f"adapter name {name!r} is reserved or empty; pick another name")
        if name in self._adapters:
            raise ConfigError(f"an adapter named {name!r} is already held; delete it first or use another name")
        adapter, _ = _LORA.split(params, config)
        if not any(p[-1] == "lora_a" for p in flatten_params(adapter)):
            raise ConfigError(f"{name!r}: the tree carries no LoRA leaves; pass Lora().init(...) output or a "
                              "loaded adapter")
        self._check_fits(name, adapter)
        self._adapters[name] = (adapter, config)
        self._stacked = self._summed = None

    def load(self, name: str, folder: str | os.PathLike) -> LoraConfig:
        """Reads a PEFT LoRA folder (ours or peft's) onto the base and holds it as `name`."""
        _, params, config = load_peft_adapter(folder, self.model, self.base)
        self.add(name, params, config)
        return config

    def delete(self, name: str) -> None:
        """Drops an adapter; it also leaves the active set."""
        self._check_known([name])
        del self._adapters[name]
        self._active = tuple(n for n in self._active if n != name)
        self._stacked = self._summed = None

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Activates one adapter, or several whose deltas add (PEFT's list form)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        if len(set(names)) != len(names):
            raise ConfigError(f"set_adapter({list(names)}): an adapter is named twice")
        self._check_known(names)
        if len(names) > 1 and (self._summed is None or self._summed[0] != names):
            self._summed = (names, self._sum(names))  # refuses DoRA / modules_to_save before anything changes
        self._active = names

    def disable_adapters(self) -> None:
        """No adapter: the model is the base model."""
        self._active = ()

    # ---- using them -------------------------------------------------------------------------------

    def active_adapter(self) -> dict:
        """The leaves the active set adds to the base ({} when disabled)."""
        if not self._active:
            return {}
        if len(self._active) == 1:
            return self._adapters[self._active[0]][0]
        if self._summed is None or self._summed[0] != self._active:
            self._summed = (self._active, self._sum(self._active))
        return self._summed[1]

    def params(self) -> dict:
        """The full tree the model runs: base plus the active adapter leaves."""
        return partition.combine(self.base, self.active_adapter())

    def logits(self, input_ids_BxS: Any, attention_mask_BxS: Any = None) -> jax.Array:
        """Logits (B, S, V) of the model with the active adapters."""
        ids = jnp.asarray(input_ids_BxS, jnp.int32)
        mask = jnp.ones_like(ids) if attention_mask_BxS is None else jnp.asarray(attention_mask_BxS, jnp.int32)
        return self._forward(self.base, self.active_adapter(), ids, mask)

    def generate(self, prompts: Sequence[Sequence[int]], **kw: Any) -> list[list[int]]:
        """`models.generate.generate` with the active adapters (same keyword arguments)."""
        return generate(self.model, self.params(), prompts, **kw)

    def merge_and_unload(self) -> dict:
        """A plain tree with the active adapters folded into the kernels (the base tree is untouched)."""
        if not self._active:
            return dict(self.base)
        config = self._adapters[self._active[0]][1] if len(self._active) == 1 else None
        return merge_and_unload(self.params(), "lora", config)

    def stacked(self) -> batched.StackedLora:
        """Every held adapter stacked for per-example batches (cached until the held set changes)."""
        if self._stacked is None:
            self._stacked = batched.stack({n: a for n, (a, _) in self._adapters.items()})
        return self._stacked

    def per_example_logits(self, input_ids_BxS: Any, adapter_names: Sequence[str | None],
                           attention_mask_BxS: Any = None) -> jax.Array:
        """Logits (B, S, V), row b with adapter `adapter_names[b]` (None: the base)."""
        return batched.per_example_logits(self.model, self.base, self.stacked(), adapter_names, input_ids_BxS,
                                          attention_mask_BxS)

    def per_example_generate(self, prompts: Sequence[Sequence[int]], adapter_names: Sequence[str | None],
                             **kw: Any) -> list[list[int]]:
        """Greedy/sampled decoding with one adapter per row, in one batch (see `batched.per_example_generate`)."""
        return batched.per_example_generate(self.model, self.base, self.stacked(), prompts, adapter_names, **kw)

    # ---- internals --------------------------------------------------------------------------------

    def _traced_forward(self, base: Mapping, adapter: Mapping, ids_BxS: jax.Array, mask_BxS: jax.Array):
        self.traces += 1  # runs only while tracing, i.e. once per compilation
        return self.model.apply({"params": partition.combine(base, adapter)}, ids_BxS, attention_mask_BxS=mask_BxS)

    def _sum(self, names: Sequence[str]) -> dict:
        return sum_adapters([self._adapters[n][0] for n in names], names=list(names))

    def _check_known(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ConfigError(f"no adapter named {unknown}; held: {list(self._adapters) or 'none'} "
                              "(add or load it first)")

    def _check_fits(self, name: str, adapter: Mapping) -> None:
        """Every adapter leaf sits on a base module of the right shape (catches adapters of another base)."""
        flat_base = flatten_params(self.base)
        problems = []
        for path, leaf in flatten_params(adapter).items():
            module, kind = path[:-1], path[-1]
            kernel = next((flat_base[module + (k,)] for k in ("kernel", "qkernel") if module + (k,) in flat_base),
                          None)
            if kind in LORA_LEAVES and kernel is None:
                problems.append(f"{'.'.join(module)}: no such linear module in the base")
            elif kind == "lora_a" and int(leaf.shape[0]) != int(kernel.shape[0]):
                problems.append(f"{'.'.join(module)}: lora_a has {leaf.shape[0]} inputs, the kernel {kernel.shape[0]}")
            elif kind == "lora_b" and int(leaf.shape[1]) != int(kernel.shape[1]):
                problems.append(f"{'.'.join(module)}: lora_b has {leaf.shape[1]} outputs, the kernel "
                                f"{kernel.shape[1]}")
            elif kind not in LORA_LEAVES and path not in flat_base:
                problems.append(f"{'/'.join(path)}: not a leaf of the base")
        if problems:
            raise ConfigError(f"adapter {name!r} does not fit this base:\n"
                              + bullet_list(problems)
                              + "\nHold only adapters trained on this base model.")
