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
import json
import os
import re
from pathlib import Path as FsPath
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import CheckpointError, ConfigError, bullet_list
from jaxpeft.core.targets import LINEAR_KERNELS, Targets, compact_targets, linear_modules, match_targets
from jaxpeft.core.tree import Path, dotted, flatten_params, unflatten_params
from jaxpeft.methods.base import Method, register
from jaxpeft.models.ops import dense_kernel

IA3_LEAVES = ("ia3_in", "ia3_out")
PEFT_SUFFIX = ".ia3_l"
# PEFT IA3Config fields that change what the adapter computes and that jaxpeft does not implement:
# field -> (values meaning "off", what it is).
_UNSUPPORTED = {
    "fan_in_fan_out": ((False, None), "Conv1D-style (in, out) weights"),
    "exclude_modules": ((None,), "excluded modules"),
    "modules_to_save": ((None,), "fully trained extra modules"),
}
# Keys PEFT's IA3Config has known since its first releases; newer keys break older loaders.
_CONFIG_KEYS = ("base_model_name_or_path", "fan_in_fan_out", "feedforward_modules", "inference_mode",
                "init_ia3_weights", "modules_to_save", "peft_type", "revision", "target_modules", "task_type")


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
        for path in chosen:
            in_dim, out_dim = _kernel_shape({k[-1]: v for k, v in flat.items() if k[:-1] == path})
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
        flat = flatten_params(params)
        out = {p: v for p, v in flat.items() if p[-1] not in IA3_LEAVES}
        for module in _ia3_modules(flat):
            leaves = {p[-1]: v for p, v in flat.items() if p[:-1] == module}
            dtype = leaves["kernel"].dtype if "kernel" in leaves else jnp.float32
            w_IxO = dense_kernel(leaves, jnp.float32)
            if "ia3_in" in leaves:
                w_IxO = w_IxO * jnp.asarray(leaves["ia3_in"], jnp.float32)[:, None]
            if "ia3_out" in leaves:
                w_IxO = w_IxO * jnp.asarray(leaves["ia3_out"], jnp.float32)[None, :]
                if "bias" in leaves:
                    b = leaves["bias"]
                    out[module + ("bias",)] = (jnp.asarray(b, jnp.float32) * leaves["ia3_out"]).astype(b.dtype)
            for k in LINEAR_KERNELS:
                out.pop(module + (k,), None)
            out[module + ("kernel",)] = w_IxO.astype(dtype)
        return unflatten_params(out)

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

    def to_peft(self, params: Mapping, config: IA3Config, **kw: Any) -> tuple[dict, dict]:
        _check_saveable(params, config)
        return peft_config_dict(params, config, **kw), peft_tensors(params)

    def save(self, path: Any, params: Mapping, config: IA3Config, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        save_peft_ia3(path, params, config, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, IA3Config]:
        adapted, config = load_peft_ia3(path, params)
        return model, adapted, config


# --- PEFT folders ---------------------------------------------------------------------------------


def peft_tensors(params: Mapping) -> dict[str, np.ndarray]:
    """PEFT's `ia3_l` tensors (fp32): (O, 1) for `ia3_out`, (1, I) for `ia3_in`."""
    from jaxpeft.convert.peft_io import PREFIX

    out = {}
    for path, v in flatten_params(params).items():
        if path[-1] in IA3_LEAVES:
            vec = np.asarray(v, np.float32)
            out[PREFIX + dotted(path[:-1]) + PEFT_SUFFIX] = vec[None, :] if path[-1] == "ia3_in" else vec[:, None]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def peft_config_dict(params: Mapping, config: IA3Config, *, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json: explicit target and feedforward lists that select exactly the adapted modules."""
    flat = flatten_params(params)
    modules = _ia3_modules(flat)
    ff = {dotted(m) for m in modules if m + ("ia3_in",) in flat}
    base = unflatten_params({p: v for p, v in flat.items() if p[-1] not in IA3_LEAVES})
    targets = compact_targets(base, modules)
    feedforward = [t for t in targets if any(n.endswith(t) for n in ff)]
    if {dotted(m) for m in modules if any(dotted(m).endswith(f) for f in feedforward)} != ff:
        targets, feedforward = sorted(dotted(m) for m in modules), sorted(ff)  # suffixes would mix the kinds
    return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": targets,
            "feedforward_modules": feedforward, "fan_in_fan_out": False, "inference_mode": True,
            "init_ia3_weights": True, "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
            "revision": None}


def save_peft_ia3(out_dir: str | os.PathLike, params: Mapping, config: IA3Config, *, base_model_name_or_path: str,
                  overwrite: bool = False) -> FsPath:
    """Writes the IA3 adapter of `params` (base + IA3 leaves) as a PEFT folder, atomically."""
    from safetensors.numpy import save_file

    from jaxpeft.convert.peft_io import CONFIG_NAME, WEIGHTS_NAME

    _check_saveable(params, config)
    cfg = peft_config_dict(params, config, base_model_name_or_path=base_model_name_or_path)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(peft_tensors(params), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return FsPath(out_dir)


def config_from_peft(raw: Mapping[str, Any]) -> IA3Config:
    """An IA3Config from adapter_config.json; one error lists every option jaxpeft cannot honour."""
    if raw.get("peft_type") != "IA3":
        raise ConfigError(f"the adapter's peft_type is {raw.get('peft_type')!r}, not 'IA3'; load it with the "
                          "method it was made with (e.g. jaxpeft.convert.peft_io.load_peft_adapter for LoRA).")
    bad = [f"{k}={raw[k]!r} ({what}); needs {off[0]!r}" for k, (off, what) in _UNSUPPORTED.items()
           if k in raw and raw[k] not in off and raw[k] not in ([],)]
    if bad:
        raise ConfigError("the adapter uses PEFT options jaxpeft does not support:\n" + bullet_list(bad)
                          + "\nRetrain or re-export the adapter without them.")
    defaults = IA3Config()
    targets = raw.get("target_modules")
    ff = raw.get("feedforward_modules")
    # null means PEFT's per-model default, which for the Llama family is IA3Config's default.
    return IA3Config(target_modules=defaults.target_modules if targets is None else targets,
                     feedforward_modules=defaults.feedforward_modules if ff is None else ff)


def load_peft_ia3(folder: str | os.PathLike, params: Mapping) -> tuple[dict, IA3Config]:
    """Reads a PEFT IA3 folder (ours or peft's) onto base `params`: (params with IA3 leaves, IA3Config)."""
    from jaxpeft.convert.peft_io import PREFIX, _read_tensors, read_config_json

    folder = FsPath(folder)
    config = config_from_peft(read_config_json(folder))
    tensors = _read_tensors(folder, allow_pickle=False)
    flat = flatten_params(params)
    if any(p[-1] in IA3_LEAVES for p in flat):
        raise ConfigError("these parameters already carry IA3 leaves; load the adapter onto the base parameters "
                          "(IA3().split(...)[1]) or merge the other adapter first")
    linear = linear_modules(params)
    problems, wrong, have = [], [], set()
    for key, value in sorted(tensors.items()):
        if not (key.startswith(PREFIX) and key.endswith(PEFT_SUFFIX)):
            problems.append(f"{key}: not an IA3 tensor (expected {PREFIX}<module>{PEFT_SUFFIX})")
            continue
        name = key[len(PREFIX):-len(PEFT_SUFFIX)]
        if name not in linear:
            wrong.append(f"{name}: the model has no such linear module")
            continue
        in_dim, out_dim = _kernel_shape({k[-1]: v for k, v in flat.items() if k[:-1] == linear[name]})
        ff = config.feedforward_of(name)
        want = (1, in_dim) if ff else (out_dim, 1)
        if tuple(value.shape) != want:
            wrong.append(f"{name}: ia3_l shape {tuple(value.shape)}, the model needs {want} "
                         f"({'feedforward: one scale per input' if ff else 'one scale per output'})")
            continue
        flat[linear[name] + ("ia3_in" if ff else "ia3_out",)] = jnp.asarray(value.reshape(-1), jnp.float32)
        have.add(name)
    try:
        targeted = {dotted(p) for p in match_targets(params, config.target_modules)}
    except ConfigError:
        targeted = set()
    problems += [f"{n}: targeted by the config but the adapter has no weights for it" for n in sorted(targeted - have)]
    problems += [f"{n}: has weights but the config's target_modules do not select it" for n in sorted(have - targeted)]
    if wrong or problems:
        fix = ("This adapter was trained for a different base model; load it onto that model." if wrong
               else "The adapter's config and tensors disagree; export the adapter again.")
        raise CheckpointError(f"the IA3 adapter in {folder} does not fit this model:\n"
                              f"{bullet_list(wrong + problems)}\n{fix}")
    return unflatten_params(flat), config


# --- helpers ----------------------------------------------------------------------------------------


def _check_saveable(params: Mapping, config: IA3Config) -> None:
    flat = flatten_params(params)
    modules = _ia3_modules(flat)
    if not modules:
        raise ConfigError("the parameters carry no IA3 leaves (ia3_in/ia3_out); pass the full tree with the "
                          "adapter, e.g. IA3().combine(adapter, base), or run IA3().init first")
    problems = []
    for m in modules:
        name, leaves = dotted(m), {p[-1]: v for p, v in flat.items() if p[:-1] == m}
        if not any(k in leaves for k in LINEAR_KERNELS):
            problems.append(f"{name}: no base kernel beside the IA3 leaves; pass base + adapter together")
        if ("ia3_in" in leaves) != config.feedforward_of(name) or ("ia3_in" in leaves) == ("ia3_out" in leaves):
            kind = "feedforward (ia3_in)" if config.feedforward_of(name) else "ordinary (ia3_out)"
            problems.append(f"{name}: carries {sorted(k for k in leaves if k in IA3_LEAVES)} but the config makes "
                            f"it {kind}")
    if problems:
        raise ConfigError("the IA3 leaves do not match the config, so PEFT would rebuild a different adapter:\n"
                          + bullet_list(problems) + "\nPass the IA3Config the adapter was created with.")


def _ia3_modules(flat: Mapping[Path, Any]) -> list[Path]:
    return sorted({p[:-1] for p in flat if p[-1] in IA3_LEAVES})


def _kernel_shape(leaves: Mapping[str, Any]) -> tuple[int, int]:
    kernel = next(leaves[k] for k in LINEAR_KERNELS if k in leaves)
    return tuple(kernel.shape)  # type: ignore[return-value]  # quantized kernels expose their (I, O) shape


register(IA3())
