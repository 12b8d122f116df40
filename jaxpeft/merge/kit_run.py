"""Merging model folders from a mergekit configuration, out of core: plan every tensor, then read-merge-write.

`plan_merge` reads only config.json files and safetensors headers: it lays out the output tensors
(mergekit's order of work: the embedding from the first slice's sources, each slice's layers renumbered
consecutively, the final norm and head from the last slice's sources), resolves every parameter of every
tensor, and checks the models against each other (architecture, tensor names and shapes, layer ranges,
densities). Every problem is collected into one `ConfigError` before anything is written.

`run_merge` then makes one output tensor at a time: its inputs are read through `stream.Checkpoint` in row
chunks (`read_slice`: a fresh safetensors handle per read, so pages do not pile up), a `model+lora` source
gets its LoRA delta added, the method's jitted function merges them chunk by chunk (kit.RowChunks), and `shards.save_shards` writes the result before the
next tensor is read. The output folder is written to a temporary sibling and renamed at the end
(`atomic_dir`), with config.json, the tokenizer files, mergekit_config.yml and a README model card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxpeft.convert.hf import read_hf_weights
from jaxpeft.convert.stream import Checkpoint
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.merge.kit_config import REQUIRED, MergeConfig, resolve, split_reference

LAYER = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
MAX_LISTED = 25


@dataclasses.dataclass(frozen=True)
class Model:
    ref: str
    folder: Path
    config: dict
    weights: Mapping[str, np.ndarray]  # a lazy stream.Checkpoint
    lora: dict | None  # {"weights": Checkpoint, "config": dict}

    @property
    def layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    inputs: tuple[tuple[str, str], ...]  # (model reference, its tensor name); the base first where it has one
    base_index: int | None
    shared: dict
    per_input: tuple[dict, ...]
    shape: tuple[int, ...]
    dtype: str  # the output's numpy dtype name


@dataclasses.dataclass(frozen=True)
class Plan:
    config: MergeConfig
    models: dict[str, Model]
    tensors: tuple[PlannedTensor, ...]
    out_config: dict
    tokenizer_folder: Path | None


def _open_model(ref: str, problems: list[str]) -> Model | None:
    folder_s, lora_s = split_reference(ref)
    folder = Path(folder_s)
    if not (folder / "config.json").exists():
        problems.append(f"model {ref}: {folder}/config.json not found; give a local HF model folder")
        return None
    try:
        weights = read_hf_weights(folder)
    except Exception as e:  # a CheckpointError or a missing file: report it with the model's name
        problems.append(f"model {ref}: {e}")
        return None
    lora = None
    if lora_s:
        lfolder = Path(lora_s)
        cfg_path, w_path = lfolder / "adapter_config.json", lfolder / "adapter_model.safetensors"
        if not (cfg_path.exists() and w_path.exists()):
            problems.append(f"model {ref}: {lfolder} is not a PEFT adapter folder (adapter_config.json and "
                            "adapter_model.safetensors)")
        else:
            lcfg = json.loads(cfg_path.read_text())
            bad = [k for k in ("use_dora", "fan_in_fan_out", "alpha_pattern") if lcfg.get(k)]
            if lcfg.get("peft_type", "LORA") != "LORA":
                bad.append(f"peft_type={lcfg.get('peft_type')}")
            if bad:
                problems.append(f"model {ref}: adapter options {bad} are not supported; use a plain LoRA")
            lora = {"config": lcfg, "weights": Checkpoint([w_path])}
    return Model(ref, folder, json.loads((folder / "config.json").read_text()), weights, lora)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key: the key as a regex ending the module's name
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_delta(model: Model, name: str, rows: tuple[int, int] | None = None) -> np.ndarray | None:
    """scale · B @ A for tensor `name` (`<module>.weight`) of a `model+lora` source, or its `rows`
    (start, stop) only; None if not adapted."""
    if model.lora is None or not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    key = f"base_model.model.{module}"
    w = model.lora["weights"]
    if f"{key}.lora_A.weight" not in w:
        return None
    cfg = model.lora["config"]
    r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = cfg.get("lora_alpha", r)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    a_RxI = np.asarray(w[f"{key}.lora_A.weight"], np.float32)
    b_OxR = np.asarray(w[f"{key}.lora_B.weight"], np.float32)
    if rows is not None:
        b_OxR = b_OxR[rows[0]:rows[1]]
    return scale * (b_OxR @ a_RxI)


def _listed(problems: list[str]) -> str:
    unique = list(dict.fromkeys(problems))
    more = len(unique) - MAX_LISTED
    return bullet_list(unique[:MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")


def plan_merge(cfg: MergeConfig) -> Plan:
    """Every output tensor with its inputs and parameters; one `ConfigError` listing every problem."""
    method, problems = cfg.method, []
    refs = list(dict.fromkeys([s.model for sl in cfg.slices for s in sl.sources] + ([cfg.base_model] if
                                                                                      cfg.base_model else [])))
    if cfg.tokenizer_source not in (None, "base"):
        refs.append(cfg.tokenizer_source) if cfg.tokenizer_source not in refs else None
    models = {}
    for ref in refs:
        m = _open_model(ref, problems)
        if m is not None:
            models[ref] = m
    if problems:
        raise ConfigError("cannot read the models of the merge:\n" + _listed(problems))
    ref_model = models[cfg.base_model or cfg.slices[0].sources[0].model]
    for ref, m in models.items():
        for key in ("architectures", "model_type", "hidden_size"):
            if m.config.get(key) != ref_model.config.get(key):
                problems.append(f"model {ref}: {key} = {m.config.get(key)!r}, but {ref_model.ref} has "
                                f"{ref_model.config.get(key)!r}; merge only models of one architecture")
    slices = []
    for i, sl in enumerate(cfg.slices):
        sources = [dataclasses.replace(s, layer_range=s.layer_range or (0, models[s.model].layers)) for s in sl.sources]
        if cfg.from_models and cfg.base_model and cfg.base_model not in [s.model for s in sources]:
            sources.append(dataclasses.replace(sources[0], model=cfg.base_model, parameters={},
                                               layer_range=(0, models[cfg.base_model].layers)))
        for s in sources:
            if s.layer_range[1] > models[s.model].layers:
                problems.append(f"model {s.model}: layer_range {list(s.layer_range)} in slices[{i}] goes past its "
                                f"{models[s.model].layers} layers")
        lengths = {b - a for a, b in (s.layer_range for s in sources)}
        if len(lengths) > 1:
            problems.append(f"slices[{i}]: the sources span different numbers of layers {sorted(lengths)} (the "
                            "base is added to `models:` with all its layers)")
        slices.append((sl, sources))
    if problems:
        raise ConfigError("cannot merge these models:\n" + _listed(problems))
    outer = list(dict.fromkeys(n for m in models.values() for n in m.weights if not LAYER.match(n)))
    pre = [n for n in outer if "embed" in n]
    post = [n for n in outer if n not in pre]
    planned: list[PlannedTensor] = []

    def plan_one(out_name: str, sl, sources, in_names: list[str], t: float) -> None:
        present = [n in models[s.model].weights for s, n in zip(sources, in_names)]
        if not any(present) and out_name == "lm_head.weight":
            return  # tied embeddings: no head anywhere (mergekit's optional weight)
        for s, n, ok in zip(sources, in_names, present):
            if not ok:
                problems.append(f"model {s.model}: tensor {n} is missing")
        if not all(present):
            return
        infos = [models[s.model].weights.info[n] for s, n in zip(sources, in_names)]
        order = list(range(len(sources)))
        base_index = None
        if method.base != "ignored" and cfg.base_model in [s.model for s in sources]:
            b = [s.model for s in sources].index(cfg.base_model)
            order = [b] + [i for i in order if i != b]
            base_index = 0
        first = infos[order[0]]
        for i in order[1:]:
            if infos[i].shape != first.shape:
                hint = " (the vocabularies differ: merge models with one tokenizer)" if out_name in pre + [
                    "lm_head.weight"] else ""
                problems.append(f"model {sources[i].model}: tensor {in_names[i]} has shape {list(infos[i].shape)}, "
                                f"{sources[order[0]].model} {list(first.shape)}{hint}")
                return
        n_inputs, n_non_base = len(sources), len(sources) - (base_index is not None)
        for what, have, lo, hi in (("inputs", n_inputs, method.min_inputs, method.max_inputs),
                                   ("non-base inputs", n_non_base, method.min_non_base, method.max_non_base)):
            if (lo is not None and have < lo) or (hi is not None and have > hi):
                problems.append(f"{method.name} takes {lo}..{hi if hi is not None else 'any'} {what}; "
                                f"{out_name} has {have} ({', '.join(s.model for s in sources)})")
                return
        shared = {p.name: resolve(p, [sl.parameters, cfg.parameters], out_name, t) for p in method.params
                  if p.scope == "shared"}
        per_input = []
        for rank, i in enumerate(order):
            s, n = sources[i], in_names[i]
            scopes = [x.parameters for x in sl.sources if x.model == s.model] + [sl.parameters, cfg.parameters]
            per_input.append({p.name: resolve(p, scopes, n, t) for p in method.params
                              if p.scope == "input" or (p.scope == "non_base" and not (base_index == 0 and rank == 0))})
        for where, values in [(out_name, shared)] + [(f"model {sources[i].model}: tensor {in_names[i]}", v)
                                                      for i, v in zip(order, per_input)]:
            for k, v in values.items():
                if v is REQUIRED:
                    problems.append(f"{where}: parameter {k} is required by {method.name} and not set")
            d = values.get("density")
            if isinstance(d, float) and not 0 < d <= 1:
                problems.append(f"{where}: density {d} must be in (0, 1]")
            e = values.get("epsilon")
            if isinstance(d, float) and isinstance(e, float) and d < 1 and not (0 < d - e and d + e < 1):
                problems.append(f"{where}: density {d} +/- epsilon {e} must stay in (0, 1)")
        dtype = cfg.out_dtype or cfg.dtype or first.np_dtype.name
        planned.append(PlannedTensor(out_name, tuple((sources[i].model, in_names[i]) for i in order), base_index,
                                     shared, tuple(per_input), first.shape, dtype))

    first_sl, first_sources = slices[0]
    for n in pre:
        plan_one(n, first_sl, first_sources, [n] * len(first_sources), 0.0)
    out_layer = 0
    for sl, sources in slices:
        length = sources[0].layer_range[1] - sources[0].layer_range[0]
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            parts = {}  # (prefix, rest) of this layer's tensors in any source: one missing anywhere is reported
            for s in sources:
                for n in models[s.model].weights:
                    if (m := LAYER.match(n)) and int(m["index"]) == s.layer_range[0] + idx:
                        parts.setdefault((m["prefix"], m["rest"]), None)
            for prefix, rest in parts:
                in_names = [f"{prefix}.{s.layer_range[0] + idx}.{rest}" for s in sources]
                plan_one(f"{prefix}.{out_layer}.{rest}", sl, sources, in_names, t)
            out_layer += 1
    last_sl, last_sources = slices[-1]
    for n in post:
        plan_one(n, last_sl, last_sources, [n] * len(last_sources), 0.0)
    if problems:
        raise ConfigError("cannot merge these models:\n" + _listed(problems))
    out_config = dict(ref_model.config)
    out_config["num_hidden_layers"] = out_layer
    if cfg.out_dtype or cfg.dtype:
        out_config["dtype"] = cfg.out_dtype or cfg.dtype
    tok_ref = cfg.base_model or cfg.slices[0].sources[0].model
    if cfg.tokenizer_source not in (None, "base"):
        tok_ref = cfg.tokenizer_source
    return Plan(cfg, models, tuple(planned), out_config, models[tok_ref].folder)


