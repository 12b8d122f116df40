"""The method protocol and registry. Every PEFT method is a module that registers a `Method`.

A method is a set of pure functions over the parameter tree:
- `init(key, params, config)` returns the tree with the method's leaves added beside the weights
  they adapt (base leaves are never copied);
- `is_adapter(path, config)` says which leaves belong to the adapter (for split/combine and saving);
- `is_trainable(path, config)` says which leaves the optimizer updates;
- `merge_module(path, leaves, config)` folds the adapter into one module's weights (where `mergeable`), so
  writers can merge a model module by module without it ever existing whole; `merge` applies it to
  every module, and `unmerge` takes the adapter back out;
- `save`/`load` write and read the adapter in its exchange format, through the format's own module
  (`jaxpeft/convert/peft/` for PEFT's, `jaxpeft/convert/adapterhub.py`); formats never import methods.
Capabilities (`mergeable`, `identity_at_init`) tell the shared contract tests what to expect.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax

from jaxpeft.core import partition
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import Path, module_leaves, unflatten_params


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type]
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = None
    artifact_name: ClassVar[str] = "adapter"  # the run-folder entry the trained result is saved to

    def prepare(self, config: Any, *, model_config: Any, tokenizer: Any = None) -> Any:
        """Resolves and checks `config` against the model (and tokenizer) before `init`; returns the config
        `init` receives. E.g. prompt tuning turns its init text into token ids here. Default: unchanged."""
        return config

    def init(self, key: jax.Array, params: Mapping, config: Any) -> dict:
        raise NotImplementedError

    def is_adapter(self, path: Path, config: Any) -> bool:
        raise NotImplementedError

    def is_trainable(self, path: Path, config: Any) -> bool:
        return self.is_adapter(path, config)

    def is_added(self, path: Path, config: Any) -> bool:
        """Leaves the base model does not have (adapter leaves minus trained copies of base weights)."""
        return self.is_adapter(path, config)

    def merge_module(self, path: Path, leaves: Mapping[str, Any], config: Any, *, dtype: Any = None) -> dict[str, Any]:
        """One module's leaves with the adapter folded into its weights and the adapter's own leaves gone; a
        module the adapter does not touch comes back unchanged. The weights the merge computes are done in
        float32 (a 4-bit `qkernel` of this module is dequantized for it) and returned in `dtype` (None: the
        base weight's own dtype, float32 for a quantized one). Pure jnp, so `jax.eval_shape` can trace it."""
        raise ConfigError(f"{self.name} cannot be merged into the base weights; keep the adapter separate")

    def merge(self, params: Mapping, config: Any) -> dict:
        """The whole tree merged: `merge_module` on every module."""
        if not self.mergeable:
            raise ConfigError(f"{self.name} cannot be merged into the base weights; keep the adapter separate")
        flat: dict[Path, Any] = {}
        for module, leaves in module_leaves(params).items():
            flat.update({module + (k,): v for k, v in self.merge_module(module, leaves, config).items()})
        return unflatten_params(flat)

    def unmerge(self, merged: Mapping, adapter: Mapping, config: Any) -> dict:
        raise ConfigError(f"{self.name} cannot be merged, so there is nothing to unmerge")

    def save(self, path: Any, params: Mapping, config: Any, *, model_config: Any, base_model_name_or_path: str,
             tokenizer: Any = None, overwrite: bool = False) -> None:
        """Writes the adapter (only) in the method's exchange format, atomically."""
        raise ConfigError(f"{self.name} has no adapter file format yet")

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, Any]:
        """Reads a saved adapter onto base `params`: (model, params, config)."""
        raise ConfigError(f"{self.name} has no adapter file format yet")

    def model_kwargs(self, config: Any) -> dict[str, Any]:
        """Extra attributes the model needs to run this method (e.g. dropout on the adapter path)."""
        return {}

    # Generic operations, the same for every method.
    def split(self, params: Mapping, config: Any) -> tuple[dict, dict]:
        """(adapter, base): exact inverse of `combine`."""
        return partition.split_by(params, lambda p: self.is_adapter(p, config))

    def combine(self, adapter: Mapping, base: Mapping) -> dict:
        return partition.combine(base, adapter)

    def labels(self, params: Mapping, config: Any) -> dict:
        return partition.label_tree(params, lambda p: self.is_trainable(p, config))

    def param_counts(self, params: Mapping, config: Any) -> dict[str, float]:
        trainable, frozen = partition.split_trainable(params, self.labels(params, config))
        adapter, _ = self.split(params, config)
        _, base = partition.split_by(params, lambda p: self.is_added(p, config))
        n_train, n_base = partition.count(trainable), partition.count(base)
        return {"trainable": n_train, "base": n_base, "adapter": partition.count(adapter),
                "total": partition.count(trainable) + partition.count(frozen),
                "trainable_percent": 100.0 * n_train / max(n_base, 1)}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method `name` (the built-in ones are registered by `import jaxpeft`)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]
