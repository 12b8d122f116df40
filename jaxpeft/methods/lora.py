"""LoRA (with rsLoRA and DoRA) as a pure transform of the parameter tree.

For every targeted linear module with kernel W (I, O), `init` adds the siblings
    lora_a (I, R)   kaiming-uniform as PEFT (bound 1/sqrt(I)), or N(0, 1/R) with init="gaussian"
    lora_b (R, O)   zeros, so the adapted model equals the base at init
    lora_scale ()   alpha / R, or alpha / sqrt(R) with rsLoRA (frozen; derived from the config)
    lora_magnitude (O,)  DoRA only: the column norms of W
and the model's `linear` op computes x W + scale * (x A) B (DoRA rescales by magnitude / ||W + s·BA||).
`modules_to_save` modules are trained in full: their own leaves become trainable adapter leaves.

`target_parameters` (PEFT 0.21.2's LoRA on bare parameters): an MoE expert stack W (E, O, I) gets per-expert
factors lora_a (E, R, I), lora_b (E, O, R) and lora_scale; the model uses W + scale * B_e A_e for expert e (a
`hooks.ParamAdapter`: the delta is formed once per call, (E, O, I), then the grouped expert matmuls run on the
sum). A 2-D parameter entry such as the router `mlp.gate.weight` is linear LoRA on its module (PEFT's factors of a
2-D parameter are a Linear's). As PEFT's ParamWrapper, these refuse dropout (x cannot be factored out of the merged
weight, so dropout on the adapter's input has no place) and DoRA. Format: `convert/peft/lora_params.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path as FsPath
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft import common as peft_common, lora as peft_lora
from jaxpeft.convert.peft.lora import LORA_LEAVES
from jaxpeft.convert.peft.lora_params import is_param_scope
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.targets import (Targets, compact_targets, layer_index, linear_modules, match_targets, moe_routers,
                                  name_matches, pattern_value)
from jaxpeft.core.tree import Path, dotted, flatten_params, kernel_shape, module_leaves, unflatten_params
from jaxpeft.methods.base import Method
from jaxpeft.models import hooks
from jaxpeft.models.ops import dense_kernel

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
    # PEFT's target_parameters: parameter names (suffixes) such as "mlp.experts.gate_up_proj", "mlp.gate.weight".
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.target_parameters and self.lora_dropout > 0:
            problems.append(f"lora_dropout={self.lora_dropout} with target_parameters: LoRA on a parameter adds B·A to "
                            "the weight itself, so there is no adapter input to drop out (PEFT refuses it too); use "
                            "dropout 0")
        if self.target_parameters and self.use_dora:
            problems.append("use_dora with target_parameters: PEFT's parameter LoRA has no DoRA variant; drop one")
        if self.target_parameters and self.layers_to_transform is not None:
            problems.append("layers_to_transform with target_parameters: PEFT 0.21.2 applies layers_to_transform to "
                            "target_modules only and adapts a named parameter in every layer, so it could not rebuild "
                            "this adapter; drop layers_to_transform or name the layers' parameters in full")
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
        """Every adapted scope: linear modules (`target_modules`, 2-D `target_parameters`) and expert stacks."""
        return sorted(set(_target_modules(params, config)) | set(param_targets(params, config)[1]))

    def init(self, key: jax.Array, params: Mapping, config: LoraConfig) -> dict:
        flat = flatten_params(params)
        if any(path[-1] in LORA_LEAVES for path in flat):
            raise ConfigError("these parameters already carry LoRA leaves; split them off (Lora().split) "
                              "or merge them before adding another LoRA")
        chosen = self.targets(params, config)
        by_module = module_leaves(flat)
        stacks = param_targets(params, config)[1]
        groups = {path: by_module[path] for path in chosen if path not in stacks}
        _refuse_dora_on_routers(params, config, list(groups))
        too_big = []
        for path, leaves in groups.items():
            in_dim, out_dim = kernel_shape(leaves)
            if config.rank_for(dotted(path)) > min(in_dim, out_dim):
                too_big.append(f"{dotted(path)}: rank {config.rank_for(dotted(path))} > min({in_dim}, {out_dim})")
        if too_big:
            raise ConfigError("LoRA rank exceeds the layer's dimensions:\n" + bullet_list(too_big)
                              + "\nLower --rank (or the rank_pattern entry) below both dimensions.")
        _check_modules_to_save(params, config.modules_to_save)
        keys = jax.random.split(key, max(len(chosen), 1))
        for k, (path, leaves) in zip(keys, groups.items()):
            flat.update({path + (n,): v for n, v in _new_leaves(k, leaves, dotted(path), config).items()})
        for k, path in zip(jax.random.split(jax.random.fold_in(key, 1), max(len(stacks), 1)), stacks):
            flat.update({path + (n,): v for n, v in _new_stack_leaves(k, by_module[path], dotted(path), config).items()})
        return unflatten_params(flat)

    def is_adapter(self, path: Path, config: LoraConfig) -> bool:
        return path[-1] in LORA_LEAVES or _is_saved(path, config.modules_to_save)

    def is_trainable(self, path: Path, config: LoraConfig) -> bool:
        return path[-1] in TRAINABLE_LORA_LEAVES or _is_saved(path, config.modules_to_save)

    def is_added(self, path: Path, config: LoraConfig) -> bool:
        return path[-1] in LORA_LEAVES

    def save(self, path: Any, params: Mapping, config: LoraConfig, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        save_peft_adapter(path, params, config, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, LoraConfig]:
        return load_peft_adapter(path, model, params)

    def model_kwargs(self, config: LoraConfig) -> dict[str, Any]:
        return {"dropout_rate": config.lora_dropout}

    def merge(self, params: Mapping, config: LoraConfig | None = None) -> dict:
        """Folds every LoRA (and DoRA) into its kernel: W' = W + s·AB (DoRA: m · (W + s·AB) / ||W + s·AB||)."""
        return super().merge(params, config)

    def merge_module(self, path: Path, leaves: Mapping[str, Any], config: LoraConfig | None = None, *,
                     dtype: Any = None) -> dict[str, Any]:
        """One module's merge (see `merge`), computed in fp32, the kernel returned in `dtype`."""
        if "lora_a" in leaves and is_param_scope(leaves):
            w = jnp.asarray(leaves["weight"])
            return {"weight": _adapt_stack(w.astype(jnp.float32), leaves, jnp.float32).astype(dtype or w.dtype)}
        return _merge_module(dict(leaves), dtype) if "lora_a" in leaves else dict(leaves)

    def unmerge(self, merged: Mapping, adapter: Mapping, config: LoraConfig | None = None) -> dict:
        """Recovers the base kernels from merged ones and the adapter that was merged in."""
        flat_a = flatten_params(adapter)
        flat = flatten_params(merged)
        for module, leaves in module_leaves(flat_a).items():
            if "lora_a" not in leaves:
                continue
            if module + ("weight",) in flat and np.ndim(flat[module + ("weight",)]) == 3:  # an expert stack
                w = flat[module + ("weight",)]
                flat[module + ("weight",)] = (w.astype(jnp.float32) - _stack_delta(leaves, jnp.float32)).astype(w.dtype)
                continue
            w = flat[module + ("kernel",)]
            delta = _delta(leaves)
            if "lora_magnitude" in leaves:
                # merged = m (W + d) / ||W + d||: its column norms are m whatever W was, so the merged
                # weights no longer determine W. Keep the base tree (it is never modified) instead.
                raise ConfigError(f"{dotted(module)} is DoRA: a merged DoRA weight does not determine the base "
                                  "weight. Use the base parameters you merged into; they are unchanged.")
            flat[module + ("kernel",)] = (w.astype(jnp.float32) - delta).astype(w.dtype)
        return unflatten_params(flat)


def _new_leaves(key: jax.Array, leaves: Mapping[str, Any], name: str, config: LoraConfig) -> dict[str, jax.Array]:
    in_dim, out_dim = kernel_shape(leaves)
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


def lora_delta(leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    """The LoRA update of a module's kernel, scale · A B, as an (I, O) array of `dtype`."""
    a_IxR = jnp.asarray(leaves["lora_a"]).astype(dtype)
    b_RxO = jnp.asarray(leaves["lora_b"]).astype(dtype)
    return (a_IxR @ b_RxO) * jnp.asarray(leaves["lora_scale"]).astype(dtype)


def _delta(leaves: Mapping[str, Any]) -> jax.Array:
    """scale · A B in fp32, (I, O)."""
    return lora_delta(leaves, jnp.float32)


def _add_lora(x: jax.Array, x_lora: jax.Array, y: jax.Array, leaves: Mapping[str, Any], dtype: Any,
              dropped: bool) -> jax.Array:
    """The linear op's LoRA stage: y + scale · (x A) B, or DoRA's rescaled output (PEFT's forward)."""
    a_IxR = jnp.asarray(leaves["lora_a"]).astype(dtype)
    b_RxO = jnp.asarray(leaves["lora_b"]).astype(dtype)
    scale = jnp.asarray(leaves["lora_scale"]).astype(dtype)
    lora = ((x_lora @ a_IxR) @ b_RxO) * scale
    if "lora_magnitude" not in leaves:
        return y + lora
    # DoRA: magnitude / ||W + s·BA|| (norm over inputs, no gradient) rescales the output.
    w_IxO = dense_kernel(leaves, dtype)
    delta_IxO = lora_delta(leaves, dtype)
    norm_O = jax.lax.stop_gradient(jnp.linalg.norm(w_IxO + jax.lax.stop_gradient(delta_IxO), axis=0))
    mag_scale_O = jnp.asarray(leaves["lora_magnitude"]).astype(dtype) / norm_O
    # With dropout PEFT recomputes the base term on the dropped input.
    base = (x_lora @ w_IxO) if dropped else y
    return y + (mag_scale_O - 1) * base + mag_scale_O * lora


def _refuse_dora_on_routers(params: Mapping, config: LoraConfig, modules: Sequence[Path]) -> None:
    """DoRA on an MoE router is refused: transformers 5.24 keeps the router a bare parameter, so PEFT 0.21.2 adapts
    it only through `target_parameters`, which has no DoRA; such an adapter could not be rebuilt by PEFT."""
    if not config.use_dora:
        return
    routers = sorted(dotted(p) for p in set(modules) & moe_routers(params))
    if routers:
        how = ("'all-linear' selects the router on an MoE model; name the linears instead, e.g. "
               "target_modules=('q_proj', 'k_proj', 'v_proj', 'o_proj')" if config.target_modules == "all-linear"
               else "leave the router ('gate' / 'mlp.gate.weight') out of the targets")
        raise ConfigError(f"use_dora on the MoE router(s) {routers[:2]}{' ...' if len(routers) > 2 else ''}: the "
                          "router is a bare parameter in transformers 5.24 that PEFT adapts only as a target "
                          f"parameter, which has no DoRA, so PEFT could not rebuild this adapter; {how}, or drop DoRA")


def _target_modules(params: Mapping, config: LoraConfig) -> list[Path]:
    """The linear modules LoRA adapts: `target_modules`' and the 2-D `target_parameters` entries' (`X.weight`)."""
    saved = list(config.modules_to_save)
    chosen = []
    if config.target_modules or not config.target_parameters:
        chosen = match_targets(params, config.target_modules, layers_to_transform=config.layers_to_transform,
                               exclude=saved)
    return sorted(set(chosen) | set(param_targets(params, config)[0]))


def param_targets(params: Mapping, config: LoraConfig) -> tuple[list[Path], list[Path]]:
    """(linear modules, 3-D expert stacks) the `target_parameters` entries select (suffix match, as PEFT, and
    `layers_to_transform`); an entry that selects nothing is an error naming it."""
    if not config.target_parameters:
        return [], []
    by_module = module_leaves(flatten_params(params))
    linear = linear_modules(params)
    ltt = config.layers_to_transform
    keep = lambda name: ltt is None or layer_index(name) in ltt  # noqa: E731
    ends = lambda name, t: name == t or name.endswith("." + t)  # noqa: E731
    modules, stacks, unmatched = set(), set(), []
    for t in config.target_parameters:
        hit_stacks = {p for p, leaves in by_module.items() if is_param_scope(leaves) and ends(dotted(p), t)
                      and keep(dotted(p))}
        hit_linear = {path for name, path in linear.items() if t.endswith(".weight") and ends(name + ".weight", t)
                      and keep(name)}
        if not hit_stacks and not hit_linear:
            unmatched.append(t)
        stacks |= hit_stacks
        modules |= hit_linear
    if unmatched:
        names = sorted({dotted(p) for p, leaves in by_module.items() if is_param_scope(leaves)})[:4]
        raise ConfigError(f"target_parameters {unmatched} match no parameter of the model (expert stacks look like "
                          f"{names or 'none here'}; a linear's weight is '<module>.weight')")
    return sorted(modules), sorted(stacks)


def _new_stack_leaves(key: jax.Array, leaves: Mapping[str, Any], name: str, config: LoraConfig) -> dict[str, Any]:
    """lora_a (E, R, I) kaiming-uniform as PEFT's nn.Linear(I, R*E) (bound 1/sqrt(I)), lora_b (E, O, R) zeros."""
    e, o, i = jnp.shape(leaves["weight"])
    r = config.rank_for(name)
    if config.init_lora_weights == "gaussian":
        a = jax.random.normal(key, (e, r, i), jnp.float32) / r
    else:
        a = jax.random.uniform(key, (e, r, i), jnp.float32, -1.0 / math.sqrt(i), 1.0 / math.sqrt(i))
    return {"lora_a": a, "lora_b": jnp.zeros((e, o, r), jnp.float32),
            "lora_scale": jnp.asarray(config.scale_for(name), jnp.float32)}


def _stack_delta(leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    """scale * B_e A_e for every expert e, (E, O, I) in `dtype`."""
    a = jnp.asarray(leaves["lora_a"]).astype(dtype)
    b = jnp.asarray(leaves["lora_b"]).astype(dtype)
    return jnp.einsum("eor,eri->eoi", b, a) * jnp.asarray(leaves["lora_scale"]).astype(dtype)


def _adapt_stack(weight: jax.Array, leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    return weight + _stack_delta(leaves, dtype)


PARAM_HOOK = hooks.ParamAdapter(name="lora", leaves=("lora_a", "lora_b", "lora_scale"), trigger="lora_a",
                                adapt=_adapt_stack)

LINEAR_HOOK = hooks.LinearAdapter(name="lora", leaves=LORA_LEAVES, trigger="lora_a", add_to_output=_add_lora,
                                  uses_dropout=True)


def _merge_module(leaves: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    base = {k: v for k, v in leaves.items() if k not in LORA_LEAVES}
    w = dense_kernel(leaves, jnp.float32)
    if dtype is None:
        dtype = leaves["kernel"].dtype if "kernel" in leaves else jnp.float32
    merged = w + _delta(leaves)
    if "lora_magnitude" in leaves:
        merged = merged * (jnp.asarray(leaves["lora_magnitude"], jnp.float32) / jnp.linalg.norm(merged, axis=0))
    base.pop("qkernel", None)
    base["kernel"] = merged.astype(dtype)
    return base


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


def save_peft_adapter(out_dir: str | os.PathLike, params: Mapping, config: LoraConfig, *,
                      base_model_name_or_path: str, overwrite: bool = False) -> FsPath:
    """Writes `params`' LoRA adapter as a PEFT folder that `peft.PeftModel.from_pretrained` loads.

    `params` is the full tree (base + LoRA leaves, e.g. `Lora().combine(adapter, base)`); `config` the
    LoraConfig it was made with. The folder appears whole or not at all.
    """
    peft_lora.check_saveable(params, config)
    tensors = peft_lora.peft_keys(params, config.modules_to_save)
    cfg = peft_lora.peft_config_dict(params, config, base_model_name_or_path=base_model_name_or_path)
    return peft_common.write_folder(out_dir, cfg, tensors, overwrite=overwrite)


def load_peft_adapter(folder: str | os.PathLike, model: Any, params: Mapping, *, adapter_dtype: Any = jnp.float32,
                      allow_pickle: bool = False) -> tuple[Any, dict, LoraConfig]:
    """Reads a PEFT LoRA folder (ours or peft's) onto base `params`: returns (model, params, LoraConfig).

    The model is cloned with the adapter's dropout; params gain lora_a/lora_b/lora_scale (+ DoRA
    lora_magnitude) leaves and the trained `modules_to_save` weights. `adapter_model.bin` (pickle) is
    read only with `allow_pickle=True`.
    """
    folder = FsPath(folder)
    config = LoraConfig(**peft_lora.config_kwargs(peft_common.read_config_json(folder)))
    tensors = peft_common.read_tensors(folder, allow_pickle)
    adapted = peft_lora.attach(params, config, tensors, adapter_dtype)
    if not config.target_modules and not config.target_parameters:  # null: PEFT's per-model default; name what the
        # tensors adapt instead
        chosen = peft_lora.lora_modules(flatten_params(adapted))
        config = dataclasses.replace(config, target_modules=tuple(
            compact_targets(params, chosen, config.layers_to_transform)))
    return model.clone(dropout_rate=config.lora_dropout), adapted, config
