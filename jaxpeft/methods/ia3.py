"""IA3 ((IA)^3: infused adapters by inhibiting and amplifying inner activations) as PEFT defines it.

For every targeted linear module with kernel W (I, O) and optional bias b (O,), `init` adds one
learned vector beside the kernel, initialised to ones so the adapted model equals the base:
    ia3_out (O,)  ordinary targets:     y = (x W + b) * l      (the bias is scaled too, as in PEFT)
    ia3_in  (I,)  feedforward targets:  y = (x * l) W + b
Merging folds the vector into the weights (ia3_out scales W's columns and b, ia3_in scales W's rows);
unmerging divides it out again, which needs every entry to be non-zero.

PEFT folder (peft 0.21.2 `save_pretrained`): `adapter_config.json` with peft_type "IA3",
`target_modules` and `feedforward_modules` (explicit lists, the latter a subset of the former), and
`adapter_model.safetensors` (fp32) holding, for each adapted module M,
    base_model.model.M.ia3_l   (O, 1) for ordinary targets, (1, I) for feedforward ones.
PEFT matches `feedforward_modules` differently from `target_modules`: a list entry matches any module
name that *ends with* it (no "." boundary), a string is a full-match regex. `feedforward_of` follows that.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path as FsPath
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft import common as peft_common, ia3 as peft_ia3
from jaxpeft.convert.peft.ia3 import IA3_LEAVES
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.targets import LINEAR_KERNELS, Targets, match_targets
from jaxpeft.core.tree import Path, dotted, flatten_params, kernel_shape, module_leaves, unflatten_params
from jaxpeft.methods.base import Method
from jaxpeft.models import hooks
from jaxpeft.models.ops import dense_kernel

def _as_targets(value: Any) -> Targets:
    return value if isinstance(value, str) else tuple(sorted(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config:
    """IA3 settings, named as in PEFT's IA3Config; the defaults are PEFT's for Llama models.

    target_modules: module-name suffixes, a full-match regex, or "all-linear" (as LoRA's).
    feedforward_modules: the targets whose *input* is scaled (a list: PEFT's ends-with match; a string:
        a full-match regex). As in PEFT, a list must be a subset of a list `target_modules`.
    """

    target_modules: Targets = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: Targets = ("down_proj",)

    def __post_init__(self) -> None:
        # Lists become sorted tuples, so the config is hashable (a static argument) and compares by content.
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules))
        object.__setattr__(self, "feedforward_modules", _as_targets(self.feedforward_modules))
        problems = []
        if not self.target_modules:
            problems.append("target_modules is empty; name the modules to adapt (e.g. k_proj, v_proj, down_proj)")
        for field in ("target_modules", "feedforward_modules"):
            value = getattr(self, field)
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as e:
                    problems.append(f"{field} regex {value!r} does not compile: {e}")
        if not isinstance(self.target_modules, str) and not isinstance(self.feedforward_modules, str):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                problems.append(f"feedforward_modules {extra} are not among target_modules "
                                f"{list(self.target_modules)}; PEFT requires feedforward_modules to be a subset "
                                "of target_modules: add them to the targets or drop them from feedforward_modules")
        if problems:
            raise ConfigError("invalid IA3 config:\n" + bullet_list(problems))

    def feedforward_of(self, name: str) -> bool:
        """Whether module `name` is feedforward (input-scaled), by PEFT's rule."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return any(name.endswith(f) for f in ff)


class IA3(Method):
    name = "ia3"
    config_cls = IA3Config
    mergeable = True
    identity_at_init = True
    peft_type = "IA3"

    def targets(self, params: Mapping, config: IA3Config) -> list[Path]:
        return match_targets(params, config.target_modules)

    def init(self, key: jax.Array, params: Mapping, config: IA3Config) -> dict:
        """Adds ones-initialised `ia3_out` (O,) or, for feedforward targets, `ia3_in` (I,) to each target."""
        del key  # IA3 starts at the identity; nothing is random
        flat = flatten_params(params)
        if any(p[-1] in IA3_LEAVES for p in flat):
            raise ConfigError("these parameters already carry IA3 leaves; split them off (IA3().split) or merge "
                              "them before adding another IA3 adapter")
        chosen = self.targets(params, config)
        ff = [p for p in chosen if config.feedforward_of(dotted(p))]
        if config.feedforward_modules and not ff:
            raise ConfigError(
                f"feedforward_modules {config.feedforward_modules!r} match none of the targeted modules "
                f"({sorted({dotted(p).split('.')[-1] for p in chosen})}); name a target such as down_proj, "
                "or pass an empty feedforward list to scale every target's output")
        by_module = module_leaves(flat)
        for path in chosen:
            in_dim, out_dim = kernel_shape(by_module[path])
            if path in ff:
                flat[path + ("ia3_in",)] = jnp.ones((in_dim,), jnp.float32)
            else:
                flat[path + ("ia3_out",)] = jnp.ones((out_dim,), jnp.float32)
        return unflatten_params(flat)

    def is_adapter(self, path: Path, config: IA3Config) -> bool:
        return path[-1] in IA3_LEAVES

    def merge(self, params: Mapping, config: IA3Config | None = None) -> dict:
        """Folds each vector into its module: W' = W diag-scaled (columns and bias for ia3_out, rows for ia3_in).

        A quantized kernel is dequantized (fp32) first, as LoRA's merge does.
        """
        return super().merge(params, config)

    def merge_module(self, path: Path, leaves: Mapping[str, Any], config: IA3Config | None = None, *,
                     dtype: Any = None) -> dict[str, Any]:
        """One module's merge (see `merge`), in fp32; the kernel (and a scaled bias) returned in `dtype`
        (None: their own dtypes, float32 for a quantized kernel)."""
        if not any(k in leaves for k in IA3_LEAVES):
            return dict(leaves)
        out = {k: v for k, v in leaves.items() if k not in IA3_LEAVES}
        own = leaves["kernel"].dtype if "kernel" in leaves else jnp.float32
        kernel_dtype = own if dtype is None else dtype
        w_IxO = dense_kernel(leaves, jnp.float32)
        if "ia3_in" in leaves:
            w_IxO = w_IxO * jnp.asarray(leaves["ia3_in"], jnp.float32)[:, None]
        if "ia3_out" in leaves:
            w_IxO = w_IxO * jnp.asarray(leaves["ia3_out"], jnp.float32)[None, :]
            if "bias" in leaves:
                b = leaves["bias"]
                scaled = jnp.asarray(b, jnp.float32) * leaves["ia3_out"]
                out["bias"] = scaled.astype(b.dtype if dtype is None else dtype)
        for k in LINEAR_KERNELS:
            out.pop(k, None)
        out["kernel"] = w_IxO.astype(kernel_dtype)
        return out

    def unmerge(self, merged: Mapping, adapter: Mapping, config: IA3Config | None = None) -> dict:
        """Divides the vectors of `adapter` back out of `merged`; refuses vectors with zero entries."""
        flat_a = flatten_params(adapter)
        flat = flatten_params(merged)
        zeros = [f"{dotted(p)}: {int(np.sum(np.asarray(v) == 0))} zero entries" for p, v in sorted(flat_a.items())
                 if p[-1] in IA3_LEAVES and np.any(np.asarray(v) == 0)]
        if zeros:
            raise ConfigError("cannot unmerge IA3: dividing by a zero scale does not recover the base weights:\n"
                              + bullet_list(zeros) + "\nUse the base parameters you merged into; they are unchanged.")
        for path, v in flat_a.items():
            if path[-1] not in IA3_LEAVES:
                continue
            module, scale = path[:-1], jnp.asarray(v, jnp.float32)
            w = flat[module + ("kernel",)]
            axis_scale = scale[:, None] if path[-1] == "ia3_in" else scale[None, :]
            flat[module + ("kernel",)] = (w.astype(jnp.float32) / axis_scale).astype(w.dtype)
            if path[-1] == "ia3_out" and module + ("bias",) in flat:
                b = flat[module + ("bias",)]
                flat[module + ("bias",)] = (b.astype(jnp.float32) / scale).astype(b.dtype)
        return unflatten_params(flat)

    def save(self, path: Any, params: Mapping, config: IA3Config, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        save_peft_ia3(path, params, config, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, IA3Config]:
        adapted, config = load_peft_ia3(path, params)
        return model, adapted, config


def _scale_input(x: jax.Array, leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    return (x * jnp.asarray(leaves["ia3_in"])).astype(dtype)  # PEFT: in the vector's dtype (fp32), then back


def _scale_output(y: jax.Array, leaves: Mapping[str, Any], dtype: Any) -> jax.Array:
    return (y * jnp.asarray(leaves["ia3_out"])).astype(dtype)  # after the bias: PEFT scales it too


LINEAR_HOOKS = (hooks.LinearAdapter(name="ia3_in", leaves=("ia3_in",), trigger="ia3_in", scale_input=_scale_input),
                hooks.LinearAdapter(name="ia3_out", leaves=("ia3_out",), trigger="ia3_out",
                                    scale_output=_scale_output))


def save_peft_ia3(out_dir: str | os.PathLike, params: Mapping, config: IA3Config, *, base_model_name_or_path: str,
                  overwrite: bool = False) -> FsPath:
    """Writes the IA3 adapter of `params` (base + IA3 leaves) as a PEFT folder, atomically."""
    peft_ia3.check_saveable(params, config)
    cfg = peft_ia3.peft_config_dict(params, config, base_model_name_or_path=base_model_name_or_path)
    return peft_common.write_folder(out_dir, cfg, peft_ia3.peft_tensors(params), overwrite=overwrite)


def load_peft_ia3(folder: str | os.PathLike, params: Mapping) -> tuple[dict, IA3Config]:
    """Reads a PEFT IA3 folder (ours or peft's) onto base `params`: (params with IA3 leaves, IA3Config)."""
    folder = FsPath(folder)
    defaults = IA3Config()
    config = IA3Config(**peft_ia3.config_kwargs(peft_common.read_config_json(folder),
                                                default_targets=defaults.target_modules,
                                                default_feedforward=defaults.feedforward_modules))
    tensors = peft_common.read_tensors(folder, allow_pickle=False)
    return peft_ia3.attach(folder, params, config, tensors), config
