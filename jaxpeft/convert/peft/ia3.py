"""IA3 adapters <-> Hugging Face PEFT folders (peft 0.21.2 `save_pretrained`): the format only.

`adapter_config.json` has peft_type "IA3", `target_modules` and `feedforward_modules` (explicit lists, the
latter a subset of the former); `adapter_model.safetensors` (fp32) holds, for each adapted module M,
    base_model.model.M.ia3_l   (O, 1) for ordinary targets, (1, I) for feedforward ones.
In the tree the vector sits beside the kernel as `ia3_out` (O,) or `ia3_in` (I,). `jaxpeft.methods.ia3`
calls this module; the config it reads is any object with IA3Config's fields and `feedforward_of`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft.common import PREFIX
from jaxpeft.core.errors import CheckpointError, ConfigError, bullet_list
from jaxpeft.core.targets import LINEAR_KERNELS, compact_targets, linear_modules, match_targets
from jaxpeft.core.tree import Path, dotted, flatten_params, kernel_shape, module_leaves, unflatten_params

IA3_LEAVES = ("ia3_in", "ia3_out")
PEFT_SUFFIX = ".ia3_l"
IA3Config = Any  # an object with jaxpeft.methods.ia3.IA3Config's fields (the format does not import methods)
# PEFT IA3Config fields that change what the adapter computes and that jaxpeft does not implement:
# field -> (values meaning "off", what it is).
_UNSUPPORTED = {
    "fan_in_fan_out": ((False, None), "Conv1D-style (in, out) weights"),
    "exclude_modules": ((None,), "excluded modules"),
    "modules_to_save": ((None,), "fully trained extra modules"),
}


def peft_tensors(params: Mapping) -> dict[str, np.ndarray]:
    """PEFT's `ia3_l` tensors (fp32): (O, 1) for `ia3_out`, (1, I) for `ia3_in`."""
    out = {}
    for path, v in flatten_params(params).items():
        if path[-1] in IA3_LEAVES:
            vec = np.asarray(v, np.float32)
            out[PREFIX + dotted(path[:-1]) + PEFT_SUFFIX] = vec[None, :] if path[-1] == "ia3_in" else vec[:, None]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def peft_config_dict(params: Mapping, config: IA3Config, *, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json: explicit target and feedforward lists that select exactly the adapted modules."""
    flat = flatten_params(params)
    modules = ia3_modules(flat)
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


def config_kwargs(raw: Mapping[str, Any], *, default_targets: Any, default_feedforward: Any) -> dict[str, Any]:
    """IA3Config's keyword arguments from adapter_config.json; one error lists every option jaxpeft cannot
    honour. A null target list means PEFT's per-model default (for the Llama family, IA3Config's defaults)."""
    if raw.get("peft_type") != "IA3":
        raise ConfigError(f"the adapter's peft_type is {raw.get('peft_type')!r}, not 'IA3'; load it with the "
                          "method it was made with (e.g. jaxpeft.methods.lora.load_peft_adapter for LoRA).")
    bad = [f"{k}={raw[k]!r} ({what}); needs {off[0]!r}" for k, (off, what) in _UNSUPPORTED.items()
           if k in raw and raw[k] not in off and raw[k] not in ([],)]
    if bad:
        raise ConfigError("the adapter uses PEFT options jaxpeft does not support:\n" + bullet_list(bad)
                          + "\nRetrain or re-export the adapter without them.")
    targets = raw.get("target_modules")
    ff = raw.get("feedforward_modules")
    return dict(target_modules=default_targets if targets is None else targets,
                feedforward_modules=default_feedforward if ff is None else ff)


def attach(folder: Any, params: Mapping, config: IA3Config, tensors: Mapping[str, np.ndarray]) -> dict:
    """`params` with the folder's IA3 vectors; one CheckpointError lists everything that does not fit."""
    flat = flatten_params(params)
    if any(p[-1] in IA3_LEAVES for p in flat):
        raise ConfigError("these parameters already carry IA3 leaves; load the adapter onto the base parameters "
                          "(IA3().split(...)[1]) or merge the other adapter first")
    linear = linear_modules(params)
    by_module = module_leaves(flat)
    problems, wrong, have = [], [], set()
    for key, value in sorted(tensors.items()):
        if not (key.startswith(PREFIX) and key.endswith(PEFT_SUFFIX)):
            problems.append(f"{key}: not an IA3 tensor (expected {PREFIX}<module>{PEFT_SUFFIX})")
            continue
        name = key[len(PREFIX):-len(PEFT_SUFFIX)]
        if name not in linear:
            wrong.append(f"{name}: the model has no such linear module")
            continue
        in_dim, out_dim = kernel_shape(by_module[linear[name]])
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
    return unflatten_params(flat)


def check_saveable(params: Mapping, config: IA3Config) -> None:
    flat = flatten_params(params)
    modules = ia3_modules(flat)
    by_module = module_leaves(flat)
    if not modules:
        raise ConfigError("the parameters carry no IA3 leaves (ia3_in/ia3_out); pass the full tree with the "
                          "adapter, e.g. IA3().combine(adapter, base), or run IA3().init first")
    problems = []
    for m in modules:
        name, leaves = dotted(m), by_module[m]
        if not any(k in leaves for k in LINEAR_KERNELS):
            problems.append(f"{name}: no base kernel beside the IA3 leaves; pass base + adapter together")
        if ("ia3_in" in leaves) != config.feedforward_of(name) or ("ia3_in" in leaves) == ("ia3_out" in leaves):
            kind = "feedforward (ia3_in)" if config.feedforward_of(name) else "ordinary (ia3_out)"
            problems.append(f"{name}: carries {sorted(k for k in leaves if k in IA3_LEAVES)} but the config makes "
                            f"it {kind}")
    if problems:
        raise ConfigError("the IA3 leaves do not match the config, so PEFT would rebuild a different adapter:\n"
                          + bullet_list(problems) + "\nPass the IA3Config the adapter was created with.")


def ia3_modules(flat: Mapping[Path, Any]) -> list[Path]:
    return sorted({p[:-1] for p in flat if p[-1] in IA3_LEAVES})
