"""Merging PEFT LoRA folders into a new PEFT folder (and a merged HF model): the library side of
`python -m experiments.merge`.

Legend: I/O a kernel's in/out size, R a module's rank.

`read_lora_folder` reads an adapter folder (ours or peft's `save_pretrained`) WITHOUT its base model:
the tensors `base_model.model.<module>.lora_A.weight` (R, I) / `lora_B.weight` (O, R) become
lora_a (I, R) / lora_b (R, O) at the module's tree path, with lora_scale from the config's
alpha/rank patterns. `merge_folders` checks that the adapters belong together (one base model by
name, one target set and equal shapes: `combine_adapters` names every offender), combines them with
`combine_adapters`, and writes, atomically, the whole output folder:

    adapter/            adapter_config.json + adapter_model.safetensors (a PEFT folder)
    merged/             with save_merged: the base with the new adapter merged in (an HF folder)
    merge_config.json   the inputs, the settings, the ranks written, and how far the result is from
                        the weighted sum of the input deltas (0 for cat; PEFT's cross terms show here)

The written adapter_config.json names every adapted module in full in `target_modules` (no base model
is needed to write it, and a full name selects exactly that module in PEFT and in jaxpeft), with
`rank_pattern`/`alpha_pattern` for modules whose rank differs from `r`. Adapters with
`modules_to_save` are refused: those are full weights, which a LoRA combination does not cover.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.hf import load_tokenizer_from, read_safetensors
from jaxpeft.convert.load import from_pretrained, resolve_model_dir
from jaxpeft.convert.peft import common as peft_common, lora as peft_lora
from jaxpeft.core.atomic import atomic_dir
from jaxpeft.core.errors import CheckpointError, ConfigError, bullet_list
from jaxpeft.core.tree import dotted, flatten_params, unflatten_params
from jaxpeft.merge.combine import COMBINATION_TYPES, SEMANTICS, combine_adapters
from jaxpeft.merge.ops import NEEDS_DENSITY, NEEDS_KEY, SIGN_METHODS
from jaxpeft.merge.unload import save_merged as save_merged_folder  # `save_merged` is merge_folders' flag
from jaxpeft.methods.lora import LoraConfig, load_peft_adapter

CONFIG_NAME, WEIGHTS_NAME = peft_common.CONFIG_NAME, peft_common.WEIGHTS_NAME
DEFAULT_DENSITY = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """How to combine: `combine_adapters`' arguments. None means "not given"; an option given to a type
    that ignores it is an error (it would be silently dropped otherwise). weights default to 1.0 each,
    density to 0.5 for the types that trim or drop, majority_sign_method to "total", seed to 0."""

    combination_type: str
    weights: tuple[float, ...] | None = None
    semantics: str = "exact"
    density: float | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    majority_sign_method: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        kind, problems = self.combination_type, []
        if kind not in COMBINATION_TYPES:
            raise ConfigError(f"combination_type={kind!r} is unknown; use one of {list(COMBINATION_TYPES)}")
        if self.semantics not in SEMANTICS:
            problems.append(f"semantics={self.semantics!r}: use one of {list(SEMANTICS)}")
        base = kind.removesuffix("_svd")
        refactors = kind != "cat" and (self.semantics == "exact" or kind == "svd" or kind.endswith("_svd"))
        unused = {"density": (self.density, base in NEEDS_DENSITY, "ties, dare_*, magnitude_prune (and _svd)"),
                  "svd_rank": (self.svd_rank, refactors, "SVD types, or any type but cat with semantics=exact"),
                  "svd_clamp": (self.svd_clamp, refactors, "SVD types, or any type but cat with semantics=exact"),
                  "majority_sign_method": (self.majority_sign_method, base in ("ties", "dare_ties"),
                                           "ties, dare_ties (and _svd)"),
                  "seed": (self.seed, base in NEEDS_KEY, "dare_linear, dare_ties (and _svd)")}
        problems += [f"{name}={value!r} means nothing for {kind!r} (semantics={self.semantics!r}); it is used by "
                     f"{users}. Drop it." for name, (value, used, users) in unused.items()
                     if value is not None and not used]
        if self.density is not None and not 0.0 < self.density <= 1.0:
            problems.append(f"density={self.density}: must be in (0, 1] (the fraction of entries kept)")
        if self.majority_sign_method is not None and self.majority_sign_method not in SIGN_METHODS:
            problems.append(f"majority_sign_method={self.majority_sign_method!r}: use one of {list(SIGN_METHODS)}")
        if problems:
            raise ConfigError(f"invalid merge settings for {kind!r}:\n" + bullet_list(problems))

    def combine_kwargs(self, n_adapters: int) -> dict[str, Any]:
        weights = list(self.weights) if self.weights is not None else [1.0] * n_adapters
        needs_density = self.combination_type.removesuffix("_svd") in NEEDS_DENSITY
        return dict(weights=weights, combination_type=self.combination_type, semantics=self.semantics,
                    density=self.density if self.density is not None else (DEFAULT_DENSITY if needs_density else None),
                    svd_rank=self.svd_rank, svd_clamp=self.svd_clamp,
                    majority_sign_method=self.majority_sign_method or "total", seed=self.seed or 0)


@dataclasses.dataclass(frozen=True)
class LoraFolder:
    """One adapter folder read without its base: LoRA leaves only, its LoraConfig and its raw config."""

    path: Path
    adapter: dict
    config: LoraConfig
    raw_config: dict

    @property
    def base_model(self) -> str | None:
        return self.raw_config.get("base_model_name_or_path") or None


def read_lora_folder(folder: str | os.PathLike) -> LoraFolder:
    """Reads a PEFT LoRA folder into LoRA leaves (see the module doc); errors name the folder and the fix."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        raise CheckpointError(f"{folder} is not a PEFT adapter folder: no {CONFIG_NAME} (found "
                              f"{found if found is not None else 'no such folder'}). Pass the folder holding "
                              f"{CONFIG_NAME} (peft saves a named adapter in <folder>/<name>/).")
    if not weights_path.is_file():
        raise CheckpointError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; merging reads safetensors only "
                              "(re-save a .bin adapter with peft's save_pretrained(safe_serialization=True)).")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); export the adapter again.") from e
    config = LoraConfig(**peft_lora.config_kwargs(raw))
    if config.modules_to_save:
        raise ConfigError(f"{folder}: modules_to_save={list(config.modules_to_save)} are full weights, which a LoRA "
                          "combination does not cover; merge adapters without modules_to_save")
    flat: dict[tuple[str, ...], Any] = {}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    odd = []
    for key, value in sorted(read_safetensors(weights_path).items()):
        _, module, kind = peft_lora.parse_key(key)
        if kind is None:
            odd.append(f"{key}: not a base_model.model.<module>.lora_A/lora_B/lora_magnitude_vector tensor")
            continue
        pairs.setdefault(module, {})[kind] = value
    for name, g in sorted(pairs.items()):
        a, b = g.get(peft_lora.A_KEY), g.get(peft_lora.B_KEY)
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            odd.append(f"{name}: lora_A {None if a is None else a.shape} and lora_B {None if b is None else b.shape} "
                       "are not an (R, I), (O, R) pair")
            continue
        if a.shape[0] != config.rank_for(name):
            odd.append(f"{name}: rank {a.shape[0]}, but the config's r/rank_pattern gives {config.rank_for(name)}")
        path = tuple(name.split("."))
        flat.update({path + (k,): v for k, v in peft_lora.lora_leaves(g, config.scale_for(name), jnp.float32).items()})
    if not flat and not odd:
        odd.append("no LoRA tensors at all")
    if odd:
        raise CheckpointError(f"{weights_path} does not hold a LoRA adapter jaxpeft can merge:\n{bullet_list(odd)}\n"
                              "Export the adapter again with peft or jaxpeft.")
    return LoraFolder(folder, unflatten_params(flat), config, raw)


def check_same_base(folders: Sequence[LoraFolder]) -> str | None:
    """The adapters' common base_model_name_or_path (None when none names one); an error lists differing ones.

    Existing local paths are compared after resolving them."""
    names = {f.path: f.base_model for f in folders}
    keys = {_base_key(n) for n in names.values() if n}
    if len(keys) > 1:
        raise ConfigError("the adapters name different base models (adapter_config.json base_model_name_or_path):\n"
                          + bullet_list(f"{p}: {n!r}" for p, n in names.items())
                          + "\nMerge adapters trained on one base model. If these names denote the same weights, "
                          "pass --allow_base_mismatch (allow_base_mismatch=True).")
    return next((n for n in names.values() if n), None)


def _base_key(name: str) -> str:
    path = Path(os.path.expanduser(name))
    return str(path.resolve()) if path.exists() else name


def write_lora_folder(out: str | os.PathLike, adapter: Mapping, config: LoraConfig, *, base_model_name_or_path: str,
                      overwrite: bool = False) -> Path:
    """Writes a LoRA adapter tree as a PEFT folder, atomically, without needing the base model: every adapted
    module is named in full in `target_modules`."""
    names = sorted(dotted(p[:-1]) for p in flatten_params(adapter) if p[-1] == "lora_a")
    cfg = peft_lora.peft_config_dict(adapter, config, base_model_name_or_path=base_model_name_or_path,
                                     target_modules=names)
    return peft_common.write_folder(out, cfg, peft_lora.peft_keys(adapter), overwrite=overwrite)


def distance_to_weighted_sum(adapters: Sequence[Mapping], weights: Sequence[float], combined: Mapping) -> float:
    """‖ΔW_combined − Σ w_i·ΔW_i‖ / ‖Σ w_i·ΔW_i‖ (Frobenius, over all modules together): 0 when exact."""
    flats = [flatten_params(a) for a in adapters]
    flat_c = flatten_params(combined)
    num = den = 0.0
    for path in (p[:-1] for p in flat_c if p[-1] == "lora_a"):
        want = sum(w * _delta(f, path) for w, f in zip(weights, flats))
        num += float(jnp.sum((_delta(flat_c, path) - want) ** 2))
        den += float(jnp.sum(want ** 2))
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


def _delta(flat: Mapping, path: tuple[str, ...]) -> Any:
    return flat[path + ("lora_scale",)] * (flat[path + ("lora_a",)] @ flat[path + ("lora_b",)])


def merge_folders(adapter_dirs: Sequence[str | os.PathLike], merge: MergeConfig, out: str | os.PathLike, *,
                  base: str | None = None, save_merged: bool = False, merged_dtype: str = "auto",
                  overwrite: bool = False, allow_base_mismatch: bool = False,
                  param_dtype: str = "auto") -> dict[str, Any]:
    """Combines the adapter folders and writes `out` (see the module doc); returns merge_config.json's contents.

    `base` names the base model for merged/ (default: the adapters' base_model_name_or_path), written module
    by module in `merged_dtype` ("auto": the base's dtype); the base loads in `param_dtype` ("auto": as its
    checkpoint stores it); a non-empty `out` is refused unless `overwrite`.
    """
    out = Path(out)
    _check_out(out, overwrite)
    folders = [read_lora_folder(d) for d in adapter_dirs]
    named_base = folders[0].base_model if allow_base_mismatch else check_same_base(folders)
    base_name = base or named_base
    if save_merged and not base_name:
        raise ConfigError("save_merged needs the base model: the adapters name none (base_model_name_or_path); "
                          "pass --base=MODEL")
    kw = merge.combine_kwargs(len(folders))
    adapters = [f.adapter for f in folders]
    try:
        combined, config = combine_adapters(adapters, **kw)
    except ConfigError as e:
        legend = bullet_list(f"adapter {i}: {f.path}" for i, f in enumerate(folders))
        raise ConfigError(f"{e}\nwhere\n{legend}") from e
    summary = {"adapters": [str(f.path) for f in folders], "base_model": base_name, **kw,
               "ranks": {dotted(p[:-1]): int(v.shape[1]) for p, v in flatten_params(combined).items()
                         if p[-1] == "lora_a"},
               "distance_to_weighted_sum": distance_to_weighted_sum(adapters, kw["weights"], combined)}
    base_model = _load_base(base_name, param_dtype) if save_merged else None
    with atomic_dir(out, overwrite=True) as tmp:
        write_lora_folder(tmp / "adapter", combined, config, base_model_name_or_path=base_name or "")
        if base_model is not None:
            _save_merged(tmp / "adapter", tmp / "merged", base_model, merged_dtype)
        summary.update(adapter=str(out / "adapter"), merged=str(out / "merged") if save_merged else None)
        (tmp / "merge_config.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _load_base(name: str, param_dtype: str = "auto") -> tuple[Any, dict, Any]:
    """(model, params, tokenizer or None): merged/ gets the base's tokenizer when its folder has one."""
    from absl import logging

    model, params, _ = from_pretrained(name, param_dtype=param_dtype, load_tokenizer=False)
    try:
        tokenizer = load_tokenizer_from(resolve_model_dir(name))
    except CheckpointError as e:
        logging.warning("merged/ is written without a tokenizer: %s", e)
        tokenizer = None
    return model, params, tokenizer


def _save_merged(adapter_dir: Path, out: Path, base_model: tuple[Any, dict, Any], dtype: str) -> None:
    """The base with the written adapter merged in, as an HF folder. The adapter goes through the public
    loader, so one that does not fit this base fails with its checks (module names and shapes)."""
    model, params, tokenizer = base_model
    _, adapted, cfg = load_peft_adapter(adapter_dir, model, params)
    # Module by module; a 4-bit base (a bitsandbytes folder) is written dense: fp32 before the cast to `dtype`.
    save_merged_folder(out, adapted, "lora", cfg, model.config, tokenizer=tokenizer, dtype=dtype)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} is not empty (holds {sorted(p.name for p in out.iterdir())[:5]}); pass "
                              "--overwrite to replace it, or choose another folder")
    elif out.is_dir():
        shutil.rmtree(out)  # an empty folder: the atomic rename needs the name free
