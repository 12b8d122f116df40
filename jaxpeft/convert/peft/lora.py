"""LoRA adapters <-> Hugging Face PEFT adapter folders (peft's `save_pretrained` / `PeftModel.from_pretrained`):
the format only. `jaxpeft.methods.lora` (save_peft_adapter / load_peft_adapter) calls it; it never imports
the method back: the config it reads and writes is any object with LoraConfig's fields.

A folder holds `adapter_config.json` (sorted keys, only fields that old PEFT versions know) and
`adapter_model.safetensors` (metadata {"format": "pt"}, fp32) with, for each adapted module M:
    base_model.model.M.lora_A.weight            (R, I)  = lora_a.T
    base_model.model.M.lora_B.weight            (O, R)  = lora_b.T
    base_model.model.M.lora_magnitude_vector    (O,)    DoRA only (no ".weight")
and each `modules_to_save` weight at its plain HF name (e.g. base_model.model.lm_head.weight), which is
what peft 0.21.2 writes. The config always carries an explicit `target_modules` list: with null PEFT
falls back to its per-model default and silently ignores the other saved weights.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.hf import hf_name_to_path, params_to_hf
from jaxpeft.convert.peft.common import PREFIX, f32 as _f32
from jaxpeft.convert.peft.lora_params import is_param_scope, peft_param_keys, take_param_keys
from jaxpeft.core.errors import CheckpointError, ConfigError, bullet_list
from jaxpeft.core.targets import (LINEAR_KERNELS, compact_targets, linear_modules, match_targets, moe_routers,
                                  name_matches)
from jaxpeft.core.tree import Path as TreePath, dotted, flatten_params, kernel_shape, module_leaves, unflatten_params

# The leaves of a LoRA adapter beside the kernel W (I, O) they adapt: lora_a (I, R), lora_b (R, O),
# lora_scale (), and DoRA's lora_magnitude (O,).
LORA_LEAVES = ("lora_a", "lora_b", "lora_scale", "lora_magnitude")
LoraConfig = Any  # an object with jaxpeft.methods.lora.LoraConfig's fields (the format does not import methods)
SUPPORTED_PEFT_TYPES = ("LORA",)
_A, _B, _M = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
A_KEY, B_KEY, M_KEY = _A, _B, _M
_LAYERS_PATTERNS = (None, "layers", ["layers"])
# PEFT LoraConfig fields that change what the adapter computes and that jaxpeft does not implement:
# field -> (value(s) meaning "off", what it is). Anything else (velora, runtime_config, ...) is inert here.
_UNSUPPORTED = {
    "bias": (("none", None), "trained biases"),
    "fan_in_fan_out": ((False, None), "Conv1D-style (in, out) weights"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "use_qalora": ((False, None), "QALoRA pooling"),
    "alora_invocation_tokens": ((None,), "activated LoRA"),
    "layer_replication": ((None,), "replicated layers"),
    "trainable_token_indices": ((None,), "trainable tokens"),
    "exclude_modules": ((None,), "excluded modules"),
    "megatron_config": ((None,), "Megatron layers"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    "kasa_config": ((None,), "KaSA"),
    "use_bdlora": ((None, False), "BD-LoRA"),
    "arrow_config": ((None,), "Arrow routing"),
}


def peft_keys(params: Mapping, modules_to_save: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The PEFT adapter tensors (fp32, torch layout, PEFT key names) of a tree that carries LoRA leaves."""
    flat = flatten_params(params)
    by_module = module_leaves(flat)
    out: dict[str, np.ndarray] = peft_param_keys(by_module)  # expert stacks (target_parameters)
    for module in lora_modules(flat):
        if is_param_scope(by_module[module]):
            continue
        name = PREFIX + dotted(module)
        out[name + _A] = _f32(flat[module + ("lora_a",)]).T
        out[name + _B] = _f32(flat[module + ("lora_b",)]).T
        if module + ("lora_magnitude",) in flat:
            out[name + _M] = _f32(flat[module + ("lora_magnitude",)])
    saved = {p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES and _is_saved(p, modules_to_save)}
    out.update({PREFIX + k: v for k, v in params_to_hf(unflatten_params(saved), np.float32).items()})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def peft_config_dict(params: Mapping, config: LoraConfig, *, base_model_name_or_path: str,
                     target_modules: list[str] | None = None) -> dict[str, Any]:
    """The adapter_config.json contents: an explicit target list and only keys old PEFT versions know.

    `target_modules` (e.g. every adapted module's full name, for an adapter written without its base)
    replaces the shortest list of suffixes that selects exactly the adapted modules of `params`."""
    flat = flatten_params(params)
    by_module = module_leaves(flat)
    parameters = tuple(getattr(config, "target_parameters", ()) or ())
    # An MoE router is a bare parameter in transformers 5.24: PEFT targets it as `<parent>.gate.weight`.
    routers = moe_routers(unflatten_params({p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES}))
    adapted_routers = [m for m in lora_modules(flat) if m in routers and not by_parameter(dotted(m), parameters)]
    parameters += tuple(dict.fromkeys(dotted(m[-2:]) + ".weight" for m in adapted_routers))
    # target_modules names the linear modules only; stacks and `X.weight` entries go to target_parameters.
    modules = [m for m in lora_modules(flat) if not is_param_scope(by_module[m])
               and not by_parameter(dotted(m), parameters)]
    base = unflatten_params({p: v for p, v in flat.items() if p[-1] not in LORA_LEAVES})
    alpha = float(config.lora_alpha)
    ltt = config.layers_to_transform
    if target_modules is None:
        target_modules = compact_targets(base, modules, ltt) if modules else []
    extra = {"target_parameters": list(parameters)} if parameters else {}
    return {**extra,
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": "gaussian" if config.init_lora_weights == "gaussian" else True,
        "target_modules": target_modules,
        "layers_to_transform": list(ltt) if ltt is not None else None,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": list(config.modules_to_save) or None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }


def config_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """LoraConfig's keyword arguments from adapter_config.json contents; one error lists every option jaxpeft
    cannot honour."""
    ptype = raw.get("peft_type")
    if ptype not in SUPPORTED_PEFT_TYPES:
        raise ConfigError(f"the adapter's peft_type is {ptype!r}; load_peft_adapter reads {list(SUPPORTED_PEFT_TYPES)} "
                          "adapters only. Export the adapter as LoRA, or use the loader for its method.")
    bad = [f"{k}={raw[k]!r} ({what}); needs {off[0]!r}" for k, (off, what) in _UNSUPPORTED.items()
           if k in raw and raw[k] not in off and raw[k] not in ({}, [])]
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        bad.append(f"init_lora_weights={init!r}: this init changes the base weights; convert the adapter to plain "
                   "LoRA with PEFT (save_pretrained(path_initial_model_for_weight_conversion=...)) first")
    if raw.get("layers_pattern") not in _LAYERS_PATTERNS:
        bad.append(f"layers_pattern={raw['layers_pattern']!r}; needs null or 'layers'")
    if bad:
        raise ConfigError("the adapter uses PEFT options jaxpeft does not support:\n" + bullet_list(bad)
                          + "\nRetrain or re-export the adapter without them.")
    targets = raw.get("target_modules")
    ltt = raw.get("layers_to_transform")
    return dict(
        r=int(raw.get("r", 8)), lora_alpha=float(raw.get("lora_alpha", 8)),
        lora_dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets or ())),
        use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
        init_lora_weights="gaussian" if init == "gaussian" else "default",
        layers_to_transform=(ltt,) if isinstance(ltt, int) else (tuple(ltt) if ltt is not None else None),
        rank_pattern={k: int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        modules_to_save=tuple(raw.get("modules_to_save") or ()),
        target_parameters=tuple(raw.get("target_parameters") or ()),
    )


def attach(params: Mapping, config: LoraConfig, tensors: Mapping[str, np.ndarray], dtype: Any) -> dict:
    """Params with the adapter's tensors attached; one CheckpointError lists every key that does not fit."""
    flat = flatten_params(params)
    if any(p[-1] in LORA_LEAVES for p in flat):
        raise ConfigError("these parameters already carry LoRA leaves; load the adapter onto the base parameters "
                          "(Lora().split(...)[1]) or merge the other adapter first")
    linear = linear_modules(params)
    by_module = module_leaves(flat)
    groups: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    lacking, unknown, shapes = [], [], []
    stacks, tensors, unknown = take_param_keys(tensors, by_module, tuple(config.target_parameters), config.scale_for,
                                               dtype)
    for key, value in sorted(tensors.items()):
        name, module, kind = parse_key(key)
        if name is None:
            unknown.append(f"{key}: not under {PREFIX!r}")
        elif kind is not None:
            groups.setdefault(module, {})[kind] = value
        elif name_matches(name.rsplit(".", 1)[0], list(config.modules_to_save)):
            saved[name] = value
        else:
            unknown.append(f"{key}: not a LoRA (lora_A/lora_B/lora_magnitude_vector) or modules_to_save weight")
    for name, g in groups.items():
        if name not in linear:
            lacking.append(name)
            continue
        in_dim, out_dim = kernel_shape(by_module[linear[name]])
        a, b, m = g.get(_A), g.get(_B), g.get(_M)
        if a is None or b is None:
            unknown.append(f"{name}: has only {sorted(g)}; needs both lora_A and lora_B")
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            unknown.append(f"{name}: lora_A {a.shape} and lora_B {b.shape} are not an (R, I), (O, R) pair")
            continue
        got = {"lora_A in-dim": (a.shape[1], in_dim), "lora_B out-dim": (b.shape[0], out_dim)}
        if m is not None:
            got["lora_magnitude_vector size"] = (m.size, out_dim)
        shapes += [f"{name}: {what} {have}, the model's kernel needs {need}" for what, (have, need) in got.items()
                   if have != need]
        if a.shape[0] != config.rank_for(name):
            unknown.append(f"{name}: rank {a.shape[0]} but the config's r/rank_pattern gives {config.rank_for(name)}")
        if (m is not None) != config.use_dora:
            unknown.append(f"{name}: use_dora={config.use_dora} but lora_magnitude_vector is "
                           + ("present" if m is not None else "missing"))
    for name, value in saved.items():
        path, leaf = hf_name_to_path(name, value.ndim)
        want = flat.get(path + (leaf,))
        if want is None:
            lacking.append(name)
        elif (hf_shape := tuple(want.shape)[::-1] if leaf == "kernel" else tuple(want.shape)) != value.shape:
            shapes.append(f"{name}: shape {value.shape}, the model's weight is {hf_shape}")
    unknown += _coverage(params, config, groups, saved, set(linear))
    problems = [f"{n}: the model has no such module" for n in lacking] + shapes + unknown
    if problems:
        fix = ("This adapter was trained for a different base model; load it onto that model." if lacking or shapes
               else "The adapter's config and tensors disagree; export the adapter again.")
        raise CheckpointError(f"the adapter's tensors do not fit this model:\n{bullet_list(problems)}\n{fix}")
    for path, leaves in stacks.items():
        flat.update({path + (k,): v for k, v in leaves.items()})
    for name, g in groups.items():
        # scale_for uses the config's rank, which equals the tensors' rank (checked above).
        flat.update({linear[name] + (k,): v for k, v in lora_leaves(g, config.scale_for(name), dtype).items()})
    for name, value in saved.items():
        path, leaf = hf_name_to_path(name, value.ndim)
        flat[path + (leaf,)] = jnp.asarray(value.T if leaf == "kernel" else value, flat[path + (leaf,)].dtype)
    return unflatten_params(flat)


def parse_key(key: str) -> tuple[str | None, str | None, str | None]:
    """(the name under base_model.model., the module it adapts, which LoRA tensor: A_KEY/B_KEY/M_KEY) of a
    tensor key; (None, None, None) outside the prefix, (name, None, None) for a non-LoRA tensor."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else None
    kind = next((s for s in (_A, _B, _M, _M + ".weight") if name and name.endswith(s)), None)
    if name is None or kind is None:
        return name, None, None
    return name, name[: -len(kind)], kind[:len(_M)] if kind.startswith(_M) else kind


def lora_leaves(group: Mapping[str, np.ndarray], scale: float, dtype: Any) -> dict[str, Any]:
    """A module's tree leaves from its PEFT tensors (keyed A_KEY, B_KEY and, for DoRA, M_KEY)."""
    out = {"lora_a": jnp.asarray(group[_A].T, dtype), "lora_b": jnp.asarray(group[_B].T, dtype),
           "lora_scale": jnp.asarray(scale, jnp.float32)}
    if _M in group:
        out["lora_magnitude"] = jnp.asarray(group[_M], dtype)
    return out


def _coverage(params: Mapping, config: LoraConfig, groups: Mapping, saved: Mapping, linear: set[str]) -> list[str]:
    """Where config and tensors disagree on which modules are adapted (PEFT would warn or silently ignore)."""
    parameters = tuple(config.target_parameters)
    if not config.target_modules and not parameters:  # PEFT's per-model default; the tensors say what was adapted
        return []
    try:
        targeted = set() if not config.target_modules else {
            dotted(p) for p in match_targets(params, config.target_modules, exclude=config.modules_to_save,
                                             layers_to_transform=config.layers_to_transform)}
    except ConfigError:
        targeted = set()
    targeted |= {n for n in linear if by_parameter(n, parameters)}
    have = {n for n in groups if n in linear}
    out = [f"{n}: targeted by the config but the adapter has no weights for it" for n in sorted(targeted - have)]
    out += [f"{n}: has weights but the config's target_modules do not select it" for n in sorted(have - targeted)]
    saved_modules = {n.rsplit(".", 1)[0] for n in saved}
    out += [f"modules_to_save {m!r}: no weights in the adapter" for m in config.modules_to_save
            if not any(name_matches(s, [m]) for s in saved_modules)]
    return out


def check_saveable(params: Mapping, config: LoraConfig) -> None:
    flat = flatten_params(params)
    modules = lora_modules(flat)
    by_module = module_leaves(flat)
    if not modules:
        raise ConfigError("the parameters carry no LoRA leaves (lora_a/lora_b); pass the full tree with the "
                          "adapter, e.g. Lora().combine(adapter, base), or run Lora().init first")
    problems = []
    for module in modules:
        name, leaves = dotted(module), by_module[module]
        if not any(k in leaves for k in LINEAR_KERNELS) and not is_param_scope(leaves):
            problems.append(f"{name}: no base kernel beside the LoRA leaves; pass base + adapter together")
        r = int(np.shape(leaves["lora_a"])[1])
        if r != config.rank_for(name):
            problems.append(f"{name}: rank {r} but the config gives {config.rank_for(name)} (r/rank_pattern)")
        elif not math.isclose(float(leaves["lora_scale"]), config.scale_for(name), rel_tol=1e-6):
            problems.append(f"{name}: lora_scale {float(leaves['lora_scale'])} but the config gives "
                            f"{config.scale_for(name)} (lora_alpha/alpha_pattern/use_rslora)")
        if ("lora_magnitude" in leaves) != config.use_dora:
            problems.append(f"{name}: use_dora={config.use_dora} but lora_magnitude is "
                            + ("present" if "lora_magnitude" in leaves else "absent"))
    problems += [f"modules_to_save {m!r}: no such module in the parameters (PEFT needs its weights)"
                 for m in config.modules_to_save if not any(_is_saved(p, (m,)) for p in flat)]
    if problems:
        raise ConfigError("the LoRA leaves do not match the config, so PEFT would rebuild a different adapter:\n"
                          + bullet_list(problems) + "\nPass the LoraConfig the adapter was created with.")


def by_parameter(module: str, target_parameters: tuple[str, ...]) -> bool:
    """Whether linear `module` is adapted as a `target_parameters` entry (`<module>.weight`, suffix-matched)."""
    name = module + ".weight"
    return any(name == t or name.endswith("." + t) for t in target_parameters)


def lora_modules(flat: Mapping[TreePath, Any]) -> list[TreePath]:
    return sorted(p[:-1] for p in flat if p[-1] == "lora_a")


def _is_saved(path: TreePath, modules_to_save: tuple[str, ...]) -> bool:
    return bool(modules_to_save) and name_matches(dotted(path[:-1]), list(modules_to_save))
