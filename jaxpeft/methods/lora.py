"""LoRA (with rsLoRA and DoRA) as a pure transform of the parameter tree.

For every targeted linear module with kernel W (I, O), `init` adds the siblings
    lora_a (I, R)   kaiming-uniform as PEFT (bound 1/sqrt(I)), or N(0, 1/R) with init="gaussian"
    lora_b (R, O)   zeros, so the adapted model equals the base at init
    lora_scale ()   alpha / R, or alpha / sqrt(R) with rsLoRA (frozen; derived from the config)
    lora_magnitude (O,)  DoRA only: the column norms of W
and the model's `linear` op computes x W + scale * (x A) B (DoRA rescales by magnitude / ||W + s·BA||).
`modules_to_save` modules are trained in full: their own leaves become trainable adapter leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.targets import Targets, match_targets, name_matches, pattern_value
from jaxpeft.core.tree import Path, dotted, flatten_params, unflatten_params
from jaxpeft.models.ops import dense_kernel, lora_delta
from jaxpeft.methods.base import Method, register

LORA_LEAVES = ("lora_a", "lora_b", "lora_scale", "lora_magnitude")
TRAINABLE_LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA hyper-parameters, named as in PEFT's LoraConfig."""

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Targets = ("q_proj", "v_proj")
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "default"  # "default" (kaiming-uniform A), "gaussian"
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(f"r={self.r}: the rank must be at least 1")
        bad_ranks = {k: v for k, v in self.rank_pattern.items() if int(v) < 1}
        if bad_ranks:
            problems.append(f"rank_pattern {bad_ranks}: every rank must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.init_lora_weights not in ("default", "gaussian"):
            problems.append(f"init_lora_weights={self.init_lora_weights!r}: use 'default' or 'gaussian'")
        if problems:
            raise ConfigError("invalid LoRA config:\n" + bullet_list(problems))

    def __hash__(self) -> int:  # the pattern dicts are hashed by content, so the config can be a static arg
        fields = dataclasses.astuple(self)
        return hash(tuple(tuple(sorted(f.items())) if isinstance(f, Mapping) else f for f in fields))

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def scale_for(self, name: str) -> float:
        r = self.rank_for(name)
        alpha = float(pattern_value(self.alpha_pattern, name, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class Lora(Method):
    name = "lora"
    config_cls = LoraConfig
    mergeable = True
    identity_at_init = True
    peft_type = "LORA"

    def targets(self, params: Mapping, config: LoraConfig) -> list[Path]:
        saved = list(config.modules_to_save)
        return match_targets(params, config.target_modules, layers_to_transform=config.layers_to_transform,
                             exclude=saved)

    def init(self, key: jax.Array, params: Mapping, config: LoraConfig) -> dict:
        flat = flatten_params(params)
        if any(path[-1] in LORA_LEAVES for path in flat):
            raise ConfigError("these parameters already carry LoRA leaves; split them off (Lora().split) "
                              "or merge them before adding another LoRA")
        chosen = self.targets(params, config)
        groups = {path: {k[-1]: v for k, v in flat.items() if k[:-1] == path} for path in chosen}
        too_big = []
        for path, leaves in groups.items():
            in_dim, out_dim = _kernel_shape(leaves)
            if config.rank_for(dotted(path)) > min(in_dim, out_dim):
                too_big.append(f"{dotted(path)}: rank {config.rank_for(dotted(path))} > min({in_dim}, {out_dim})")
        if too_big:
            raise ConfigError("LoRA rank exceeds the layer's dimensions:\n" + bullet_list(too_big)
                              + "\nLower --rank (or the rank_pattern entry) below both dimensions.")
        _check_modules_to_save(params, config.modules_to_save)
        keys = jax.random.split(key, max(len(chosen), 1))
        for k, (path, leaves) in zip(keys, groups.items()):
            flat.update({path + (n,): v for n, v in _new_leaves(k, leaves, dotted(path), config).items()})
        return unflatten_params(flat)

    def is_adapter(self, path: Path, config: LoraConfig) -> bool:
        return path[-1] in LORA_LEAVES or _is_saved(path, config.modules_to_save)

    def is_trainable(self, path: Path, config: LoraConfig) -> bool:
        return path[-1] in TRAINABLE_LORA_LEAVES or _is_saved(path, config.modules_to_save)

    def is_added(self, path: Path, config: LoraConfig) -> bool:
        return path[-1] in LORA_LEAVES

    def to_peft(self, params: Mapping, config: LoraConfig, **kw: Any) -> tuple[dict, dict]:
        from jaxpeft.convert import peft_io

        return peft_io.peft_config_dict(params, config, **kw), peft_io.peft_keys(params, config.modules_to_save)

    def save(self, path: Any, params: Mapping, config: LoraConfig, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        from jaxpeft.convert.peft_io import save_peft_adapter

        save_peft_adapter(path, params, config, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, LoraConfig]:
        from jaxpeft.convert.peft_io import load_peft_adapter

        return load_peft_adapter(path, model, params)

    def model_kwargs(self, config: LoraConfig) -> dict[str, Any]:
        return {"dropout_rate": config.lora_dropout}

    def merge(self, params: Mapping, config: LoraConfig | None = None) -> dict:
        """Folds every LoRA (and DoRA) into its kernel: W' = W + s·AB (DoRA: m · (W + s·AB) / ||W + s·AB||)."""
        return _map_lora_modules(params, _merge_module)

    def unmerge(self, merged: Mapping, adapter: Mapping, config: LoraConfig | None = None) -> dict:
        """Recovers the base kernels from merged ones and the adapter that was merged in."""
        flat_a = flatten_params(adapter)
        flat = flatten_params(merged)
        modules = {p[:-1] for p in flat_a if p[-1] == "lora_a"}
        for module in modules:
            leaves = {p[-1]: v for p, v in flat_a.items() if p[:-1] == module}
            w = flat[module + ("kernel",)]
            delta = _delta(leaves)
            if "lora_magnitude" in leaves:
                # merged = m (W + d) / ||W + d||: its column norms are m whatever W was, so the merged
                # weights no longer determine W. Keep the base tree (it is never modified) instead.
                raise ConfigError(f"{dotted(module)} is DoRA: a merged DoRA weight does not determine the base "
                                  "weight. Use the base parameters you merged into; they are unchanged.")
            flat[module + ("kernel",)] = (w.astype(jnp.float32) - delta).astype(w.dtype)
        return unflatten_params(flat)


def _kernel_shape(leaves: Mapping[str, Any]) -> tuple[int, int]:
    if "kernel" in leaves:
        return tuple(leaves["kernel"].shape)  # type: ignore[return-value]
    q = next(v for k, v in leaves.items() if k != "bias")
    return tuple(q.shape)  # quantized kernels expose their logical (I, O) shape


def _new_leaves(key: jax.Array, leaves: Mapping[str, Any], name: str, config: LoraConfig) -> dict[str, jax.Array]:
    in_dim, out_dim = _kernel_shape(leaves)
    r = config.rank_for(name)
    if config.init_lora_weights == "gaussian":
        a = jax.random.normal(key, (in_dim, r), jnp.float32) / r
    else:  # torch kaiming_uniform_(a=sqrt(5)) on the (R, I) weight: bound = 1/sqrt(I)
        bound = 1.0 / math.sqrt(in_dim)
        a = jax.random.uniform(key, (in_dim, r), jnp.float32, -bound, bound)
    out = {"lora_a": a, "lora_b": jnp.zeros((r, out_dim), jnp.float32),
           "lora_scale": jnp.asarray(config.scale_for(name), jnp.float32)}
    if config.use_dora:
        out["lora_magnitude"] = jnp.linalg.norm(dense_kernel(leaves, jnp.float32), axis=0)
    return out


def _delta(leaves: Mapping[str, Any]) -> jax.Array:
    """scale · A B in fp32, (I, O)."""
    return lora_delta(leaves, jnp.float32)


def _merge_module(leaves: dict[str, Any]) -> dict[str, Any]:
    base = {k: v for k, v in leaves.items() if k not in LORA_LEAVES}
    w = dense_kernel(leaves, jnp.float32)
    dtype = leaves["kernel"].dtype if "kernel" in leaves else jnp.float32
    merged = w + _delta(leaves)
    if "lora_magnitude" in leaves:
        merged = merged * (jnp.asarray(leaves["lora_magnitude"], jnp.float32) / jnp.linalg.norm(merged, axis=0))
    base.pop("qkernel", None)
    base["kernel"] = merged.astype(dtype)
    return base


def _map_lora_modules(params: Mapping, fn) -> dict:
    flat = flatten_params(params)
    modules = {p[:-1] for p in flat if p[-1] == "lora_a"}
    out = {p: v for p, v in flat.items() if p[:-1] not in modules}
    for module in modules:
        leaves = {p[-1]: v for p, v in flat.items() if p[:-1] == module}
        out.update({module + (k,): v for k, v in fn(leaves).items()})
    return unflatten_params(out)


def _is_saved(path: Path, modules_to_save: Sequence[str]) -> bool:
    return bool(modules_to_save) and name_matches(dotted(path[:-1]), list(modules_to_save))


def _check_modules_to_save(params: Mapping, modules_to_save: Sequence[str]) -> None:
    if not modules_to_save:
        return
    names = {dotted(p[:-1]) for p in flatten_params(params)}
    missing = [m for m in modules_to_save if not any(name_matches(n, [m]) for n in names)]
    if missing:
        raise ConfigError(f"modules_to_save {missing} match no module; modules include "
                          f"{sorted({n.split('.')[-1] for n in names})}")


register(Lora())
