"""Bottleneck adapters <-> AdapterHub folders (the `adapters` package's `save_adapter` / `load_adapter`).

A folder holds `adapter_config.json` (indent 2, sorted keys, as the package writes it):
    {"config": {every BnConfig field}, "hidden_size", "model_class", "model_name", "model_type", "name",
     "version": "adapters.<x.y.z>"}
and `adapter.safetensors` (or the package's default pickle `pytorch_adapter.bin`, read only on request) with,
for each adapted layer i, location L (attention_adapters, output_adapters) and adapter name N:
    model.layers.<i>.<L>.adapters.<N>.adapter_down.0.weight  (R, D)   = down/kernel.T
    model.layers.<i>.<L>.adapters.<N>.adapter_down.0.bias    (R,)
    model.layers.<i>.<L>.adapters.<N>.adapter_up.weight      (D, R)   = up/kernel.T
    model.layers.<i>.<L>.adapters.<N>.adapter_up.bias        (D,)
(checked against adapters 1.3.0: tests/fixtures/adapterhub/make_fixtures.py). This module is the format and
the adapter's tree layout (below); `jaxpeft.methods.bottleneck` computes with it and never the other way
round: the config read and written here is any object with AdaptersConfig's fields.

Tree layout, per adapted layer i (A = attention_adapter or output_adapter):
    model/layers/<i>/A/down/{kernel (D, R), bias (R,)}   up/{kernel (R, D), bias (D,)}
    model/layers/<i>/A/scale, input_residual, output_residual ()     frozen numbers from the config
    model/layers/<i>/A/activation/<name> (0,)                       its key names the activation Options of the package that
add weights or change the maths beyond what jaxpeft computes (new layer norms, gating, parallel adapters,
PHM layers, invertible adapters, learned scaling, per-layer reduction factors) are refused in one error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft import common
from jaxpeft.core.errors import CheckpointError, ConfigError, UnsupportedModelError, bullet_list
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.models.families import FAMILIES

AdaptersConfig = Any  # an object with jaxpeft.methods.bottleneck.AdaptersConfig's fields (no import of methods)
# Our key -> the package's module name in the decoder layer.
LOCATIONS = {"attention_adapter": "attention_adapters", "output_adapter": "output_adapters"}
FROZEN_LEAVES = ("scale", "input_residual", "output_residual")
# transformers' `get_activation` names (the package's non_linearity) that jaxpeft computes.
ACTIVATION_NAMES = ("relu", "relu6", "relu2", "leakyrelu", "leaky_relu", "swish", "silu", "gelu", "gelu_python",
                    "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "tanh", "sigmoid", "linear")

# The families whose AdapterHub folders jaxpeft reads and writes: the package's own model classes (adapters 1.3.0
# MODEL_MIXIN_MAPPING: LlamaModel, MistralModel), checked on Llama fixtures, and the plugin families whose hook
# points equal Llama's (adapters/wrappers/interfaces.py: on o_proj's and down_proj's output, no layer norm passed),
# checked on qwen2 / qwen3 fixtures (tests/fixtures/adapterhub/families).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Families adapted through the package's plugin interface: its folders carry adapter_interface.json, and the
# package refuses original_ln_after=False there (LAYER_HOOK_UNSUPPORTED).
PLUGIN_MODEL_TYPES = ("gemma2", "gemma3_text", "qwen2", "qwen3")
# Plugin families still refused: the package hooks the adapter on o_proj's / down_proj's output, BEFORE Gemma's
# post-attention / post-feedforward norm (which it passes as the adapter's layer norm), while jaxpeft's Gemma
# layer applies the adapter after the post-norm, at the residual add; the two compute different functions.
UNMATCHED_PLUGIN_TYPES = ("gemma2", "gemma3_text")
INTERFACE_NAME = "adapter_interface.json"
# The package's AdapterModelInterface for the supported plugin families (adapters 1.3.0, as it saves it).
_PLUGIN_INTERFACE = {
    "adapter_methods": ["bottleneck", "lora", "reft", "invertible"], "attn_k_proj": "k_proj", "attn_o_proj": "o_proj",
    "attn_q_proj": "q_proj", "attn_qkv_proj": None, "attn_v_proj": "v_proj", "base_model": None,
    "layer_cross_attn": None, "layer_intermediate_proj": "mlp.up_proj", "layer_ln_1": None, "layer_ln_2": None,
    "layer_output_proj": "mlp.down_proj", "layer_pre_cross_attn": None, "layer_pre_ffn": "post_attention_layernorm",
    "layer_pre_self_attn": "input_layernorm", "layer_self_attn": "self_attn", "model_embeddings": "embed_tokens",
    "model_layers": "layers",
}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PICKLE_NAME = "pytorch_adapter.bin"
# The package version whose layout we write; the package reads it to decide on legacy fixes (without a
# version it would rename "gelu" to "gelu_new").
FORMAT_VERSION = "adapters.1.3.0"
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # the package's ACTIVATION_RENAME
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\."
                  r"(adapter_down\.0|adapter_up)\.(weight|bias)$")
_PART = {"adapter_down.0": "down", "adapter_up": "up"}
_PACKAGE_LOCATION = {v: k for k, v in LOCATIONS.items()}

# Every BnConfig field the package writes, with the value jaxpeft needs (or computes with) for the ones
# that add weights or change the maths; None = "anything": the field is read into AdaptersConfig or inert.
_FIELDS: dict[str, tuple[Any, ...] | None] = {
    "adapter_residual_before_ln": None,  # only acts with ln_after
    "cross_adapter": None,  # a decoder-only Llama has no cross-attention
    "dropout": None, "init_weights": None, "init_weights_seed": None, "leave_out": None,
    "mh_adapter": None, "output_adapter": None, "non_linearity": None, "original_ln_after": None,
    "original_ln_before": None, "reduction_factor": None, "residual_before_ln": None, "scaling": None,
    "stochastic_depth": None,  # training only (drops the adapter path per row)
    "is_parallel": (False,), "ln_after": (False,), "ln_before": (False,), "use_gating": (False,),
    "phm_layer": (False,), "inv_adapter": (None,),
    "factorized_phm_W": None, "factorized_phm_rule": None, "hypercomplex_nonlinearity": None,
    "inv_adapter_reduction_factor": None, "learn_phm": None, "phm_bias": None, "phm_c_init": None,
    "phm_dim": None, "phm_init_range": None, "phm_rank": None, "shared_W_phm": None, "shared_phm_rule": None,
}
# The package's defaults for the fields jaxpeft does not vary (BnConfig, adapters 1.3.0).
_INERT_DEFAULTS = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights_seed": None,
    "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False, "learn_phm": True,
    "ln_after": False, "ln_before": False, "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4,
    "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1, "shared_W_phm": False, "shared_phm_rule": True,
    "stochastic_depth": 0.0, "use_gating": False,
}
# The package's named configs (a folder may name one instead of spelling the fields out).
_NAMED = {"double_seq_bn": "houlsby", "houlsby": "houlsby", "seq_bn": "pfeiffer", "pfeiffer": "pfeiffer"}


def check_model_type(model_type: Any, *, doing: str) -> None:
    """UnsupportedModelError unless jaxpeft reads and writes AdapterHub folders for the family `model_type`."""
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    why = ("the adapters package adapts it through its plugin interface with the adapter before Gemma's post-norm "
           "(on o_proj / down_proj), where jaxpeft's Gemma layer puts it after that norm" if model_type in
           UNMATCHED_PLUGIN_TYPES
           else "the adapters package (1.3.0) has no bottleneck support for it")
    raise UnsupportedModelError(
        f"cannot {doing} an AdapterHub folder for a {model_type!r} model: {why}. jaxpeft reads and writes AdapterHub "
        f"folders for {list(SUPPORTED_MODEL_TYPES)} only. Bottleneck adapters still train on this family in "
        "jaxpeft; only this folder format is unavailable.")


def adapterhub_config_dict(config: AdaptersConfig, *, hidden_size: int, model_type: str,
                           model_name: str) -> dict[str, Any]:
    """adapter_config.json's contents for `config`, with every field the package writes."""
    rf = float(config.reduction_factor)
    inner = dict(_INERT_DEFAULTS)
    inner.update({
        "dropout": float(config.dropout), "init_weights": "mam_adapter", "leave_out": list(config.leave_out),
        "mh_adapter": "attention_adapter" in config.locations, "output_adapter": True,
        "non_linearity": config.activation, "original_ln_after": bool(config.original_ln_after),
        "original_ln_before": bool(config.original_ln_before), "reduction_factor": int(rf) if rf.is_integer() else rf,
        "residual_before_ln": bool(config.residual_before_ln),
        "scaling": float(config.scaling),  # a float: the package refuses an int ("Unknown scaling type")
    })
    return {"config": inner, "hidden_size": int(hidden_size), "model_class": (FAMILIES[model_type].architecture
                                                                      if model_type in FAMILIES else model_type),
            "model_name": model_name, "model_type": model_type, "name": config.name, "version": FORMAT_VERSION}


def adapterhub_tensors(params: Mapping, config: AdaptersConfig) -> dict[str, np.ndarray]:
    """The adapter's tensors under the package's key names (fp32, torch (out, in) layout)."""
    out: dict[str, np.ndarray] = {}
    layers = params["model"]["layers"]
    for i in layer_indices(params):
        for loc in LOCATIONS:
            if loc not in layers[str(i)]:
                continue
            a = layers[str(i)][loc]
            prefix = f"model.layers.{i}.{LOCATIONS[loc]}.adapters.{config.name}."
            out[prefix + "adapter_down.0.weight"] = common.f32(a["down"]["kernel"]).T
            out[prefix + "adapter_down.0.bias"] = common.f32(a["down"]["bias"])
            out[prefix + "adapter_up.weight"] = common.f32(a["up"]["kernel"]).T
            out[prefix + "adapter_up.bias"] = common.f32(a["up"]["bias"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def interface_dict(model_type: str) -> dict[str, Any] | None:
    """adapter_interface.json's contents for a plugin family (None for the package's own model classes)."""
    if model_type not in PLUGIN_MODEL_TYPES:
        return None
    return {"interface": dict(_PLUGIN_INTERFACE), "model_type": model_type, "version": FORMAT_VERSION}


def write_folder(out_dir: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                 overwrite: bool = False) -> Path:
    """adapter_config.json (indent 2, sorted keys, no trailing newline, as the package writes it),
    adapter.safetensors and, for a plugin family, adapter_interface.json, atomically."""
    interface = interface_dict(config.get("model_type"))
    return common.write_folder(out_dir, config, tensors, overwrite=overwrite, config_name=CONFIG_NAME,
                               weights_name=WEIGHTS_NAME, newline=False,
                               extra_json=None if interface is None else {INTERFACE_NAME: interface})


def check_plugin_options(model_type: Any, config: AdaptersConfig) -> None:
    """The package refuses original_ln_after=False on a plugin family (its hooks leave the residual to the model)."""
    if model_type in PLUGIN_MODEL_TYPES and not config.original_ln_after:
        raise ConfigError(f"original_ln_after=False on a {model_type!r} model: the adapters package refuses it for "
                          "families it adapts through its plugin interface (the model adds the residual itself); "
                          "use original_ln_after=True")


def config_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    """AdaptersConfig's keyword arguments from adapter_config.json's contents; one error lists every option
    jaxpeft cannot honour."""
    inner = raw.get("config")
    if isinstance(inner, str):
        if inner not in _NAMED:
            raise ConfigError(f"the adapter's config is the named config {inner!r}; jaxpeft reads the bottleneck "
                              f"adapters {sorted(_NAMED)} only")
        return dict(adapter_type=_NAMED[inner], name=str(raw.get("name") or "adapter"))
    if not isinstance(inner, Mapping):
        raise CheckpointError(f"{CONFIG_NAME} has no \"config\" object (found {type(inner).__name__}); export the "
                              "adapter again with the package's save_adapter")
    arch = inner.get("architecture")
    if arch is not None:
        raise ConfigError(f"the adapter is a {arch!r} adapter (config.architecture); jaxpeft's 'adapters' method "
                          "reads bottleneck adapters only (use the method for that architecture)")
    bad = [f"{k}={inner[k]!r}; needs {allowed[0]!r}" for k, allowed in _FIELDS.items()
           if allowed is not None and k in inner and inner[k] not in allowed]
    unknown = sorted(k for k in inner if k not in _FIELDS and k != "architecture")
    bad += [f"{k}={inner[k]!r}: an option this version of jaxpeft does not know" for k in unknown]
    scaling = inner.get("scaling", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        bad.append(f"scaling={scaling!r}: learned or per-channel scaling adds weights; needs a number")
    rf = inner.get("reduction_factor", 16)
    if isinstance(rf, Mapping):
        bad.append(f"reduction_factor={dict(rf)!r}: per-layer reduction factors; needs one number")
    if inner.get("residual_before_ln", True) == "post_add":
        bad.append("residual_before_ln='post_add': the package itself fails on Llama with it; needs true or false")
    mh, out = bool(inner.get("mh_adapter", False)), bool(inner.get("output_adapter", True))
    if not out:
        bad.append(f"mh_adapter={mh}, output_adapter={out}: jaxpeft has adapters after the MLP (pfeiffer) or after "
                   "attention and the MLP (houlsby); needs output_adapter=true")
    act = str(inner.get("non_linearity", "relu")).lower()
    if "version" not in raw:  # as the package does for files written before it recorded versions
        act = _LEGACY_ACTIVATIONS.get(act, act)
    if act not in ACTIVATION_NAMES:
        bad.append(f"non_linearity={act!r}: jaxpeft knows {sorted(ACTIVATION_NAMES)}")
    if bad:
        raise ConfigError("the adapter uses options of the adapters package that jaxpeft does not support:\n"
                          + bullet_list(bad) + "\nRetrain the adapter without them.")
    return dict(
        adapter_type="houlsby" if mh else "pfeiffer", reduction_factor=rf, activation=act,
        scaling=float(scaling), dropout=float(inner.get("dropout") or 0.0),
        leave_out=tuple(int(i) for i in inner.get("leave_out") or ()),
        original_ln_before=bool(inner.get("original_ln_before", False)),
        original_ln_after=bool(inner.get("original_ln_after", True)),
        residual_before_ln=bool(inner.get("residual_before_ln", True)), name=str(raw.get("name") or "adapter"))


def read_config(folder: Path) -> dict:
    return common.read_config_json(Path(folder), CONFIG_NAME, expect="a folder written by the adapters package's "
                            "save_adapter (or by jaxpeft)")


def read_adapter_tensors(folder: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    return common.read_tensors(folder, allow_pickle, weights_name=WEIGHTS_NAME, pickle_name=PICKLE_NAME,
                               config_name=CONFIG_NAME, pickle_advice=(
                                   ". Re-save it with the package's save_adapter(..., use_safetensors=True), or pass "
                                   "allow_pickle=True if you trust its source (read with torch's weights-only "
                                   "loader)."))


def attach(params: Mapping, config: AdaptersConfig, raw: Mapping, tensors: Mapping[str, np.ndarray],
            dtype: Any) -> dict:
    """Params with the adapter attached; one CheckpointError lists everything that does not fit."""
    layers = layer_indices(params)
    if not layers:
        raise ConfigError("these parameters have no decoder layers (model/layers/<i>) to attach adapters to")
    flat = flatten_params(params)
    if any(len(p) > 4 and p[:2] == ("model", "layers") and p[3] in LOCATIONS for p in flat):
        raise ConfigError("these parameters already carry bottleneck adapters; load onto the base parameters "
                          "(Adapters().split(...)[1])")
    hidden = hidden_size_of(params)
    problems, groups = [], {}
    for key, value in sorted(tensors.items()):
        m = _KEY.match(key)
        if m is None:
            problems.append(f"{key}: not a bottleneck adapter weight (layers.<i>.attention_adapters|output_adapters"
                            ".adapters.<name>.adapter_down.0|adapter_up.weight|bias)")
            continue
        i, loc, name, part, kind = int(m[1]), _PACKAGE_LOCATION[m[2]], m[3], _PART[m[4]], m[5]
        if name != config.name:
            problems.append(f"{key}: adapter name {name!r}, but {CONFIG_NAME} names it {config.name!r}")
            continue
        groups.setdefault((i, loc), {})[f"{part}.{kind}"] = value
    if raw.get("hidden_size") not in (None, hidden):
        problems.append(f"{CONFIG_NAME} says hidden_size {raw['hidden_size']}, the model's is {hidden}")
    bottleneck = package_bottleneck_size(hidden, config.reduction_factor)
    d, r = hidden, bottleneck
    want_shapes = {"down.weight": (r, d), "down.bias": (r,), "up.weight": (d, r), "up.bias": (d,)}
    for (i, loc), g in sorted(groups.items()):
        if i not in layers:
            problems.append(f"layer {i} {loc}: the model has layers 0..{layers[-1]} only")
            continue
        missing = sorted(set(want_shapes) - set(g))
        if missing:
            problems.append(f"layer {i} {loc}: no {missing}")
        problems += [f"layer {i} {loc} {k}: shape {tuple(v.shape)}, needs {want_shapes[k]} (hidden {d}, bottleneck "
                     f"{r} = hidden // reduction_factor {config.reduction_factor:g})"
                     for k, v in sorted(g.items()) if tuple(v.shape) != want_shapes[k]]
    expected = {(i, loc) for i in layers if i not in config.leave_out for loc in config.locations}
    present = set(groups)
    problems += [f"layer {i} {loc}: the config puts an adapter there but the file has no weights for it"
                 for i, loc in sorted(expected - present)]
    problems += [f"layer {i} {loc}: has weights, but the config (mh_adapter/leave_out) puts no adapter there"
                 for i, loc in sorted(present - expected) if i in layers]
    if problems:
        raise CheckpointError("the adapter's tensors do not fit this model:\n" + bullet_list(problems)
                              + "\nAn adapter loads only onto the base model it was trained for (same hidden size "
                              "and layers); check that the folder and the model belong together.")
    for (i, loc), g in groups.items():
        leaves = adapter_leaves(g["down.weight"].T, g["down.bias"], g["up.weight"].T, g["up.bias"], config, dtype)
        flat.update({("model", "layers", str(i), loc) + p: v for p, v in flatten_params(leaves).items()})
    return unflatten_params(flat)


def check_saveable(params: Mapping, config: AdaptersConfig) -> None:
    layers = params.get("model", {}).get("layers", {})
    present = {(int(i), loc) for i, layer in layers.items() for loc in LOCATIONS if loc in layer}
    if not present:
        raise ConfigError("the parameters carry no bottleneck adapters; pass the full tree with the adapter "
                          "(Adapters().combine(adapter, base)) or run Adapters().init first")
    expected = {(i, loc) for i in layer_indices(params) if i not in config.leave_out for loc in config.locations}
    problems = [f"layer {i} {loc}: the config puts an adapter there, the parameters have none"
                for i, loc in sorted(expected - present)]
    problems += [f"layer {i} {loc}: the parameters have an adapter the config does not describe"
                 for i, loc in sorted(present - expected)]
    want = config.frozen_values()
    for i, loc in sorted(present & expected):
        a = layers[str(i)][loc]
        try:
            act = activation_of(a)
        except (KeyError, ValueError) as e:
            problems.append(f"layer {i} {loc}: {e}")
            continue
        if act != config.activation:
            problems.append(f"layer {i} {loc}: activation {act!r}, the config says {config.activation!r}")
        problems += [f"layer {i} {loc}: {k} {float(a[k])}, the config gives {v}" for k, v in want.items()
                     if not np.isclose(float(a[k]), v, rtol=1e-6, atol=0.0)]
    if problems:
        raise ConfigError("the adapter leaves do not match the config, so the package would rebuild a different "
                          "adapter:\n" + bullet_list(problems) + "\nPass the AdaptersConfig the adapter was made with.")


def package_bottleneck_size(hidden_size: int, reduction_factor: float) -> int:
    """The package's own rule (floor, at least 1), for adapters it made with a non-dividing factor."""
    return max(1, int(hidden_size // reduction_factor))


def layer_indices(params: Mapping) -> list[int]:
    """The decoder layers of a parameter tree (model/layers/<i>), in order."""
    layers = params.get("model", {}).get("layers", {}) if isinstance(params, Mapping) else {}
    return sorted(int(i) for i in layers)


def hidden_size_of(params: Mapping) -> int:
    layer = params["model"]["layers"][str(layer_indices(params)[0])]
    return int(jnp.shape(layer["post_attention_layernorm"]["weight"])[0])


def adapter_leaves(down_DxR: Any, down_R: Any, up_RxD: Any, up_D: Any, config: AdaptersConfig,
                   dtype: Any = jnp.float32) -> dict:
    """One adapter's subtree from its weights (Flax (in, out) layout) and the config's frozen numbers."""
    leaves: dict[str, Any] = {
        "down": {"kernel": jnp.asarray(down_DxR, dtype), "bias": jnp.asarray(down_R, dtype)},
        "up": {"kernel": jnp.asarray(up_RxD, dtype), "bias": jnp.asarray(up_D, dtype)},
        "activation": {config.activation: jnp.zeros((0,), jnp.float32)},
    }
    leaves.update({k: jnp.asarray(v, jnp.float32) for k, v in config.frozen_values().items()})
    return leaves


def activation_of(leaves: Mapping[str, Any]) -> str:
    names = list(leaves["activation"])
    if len(names) != 1 or names[0] not in ACTIVATION_NAMES:
        raise ValueError(f"a bottleneck adapter needs one activation key from {sorted(ACTIVATION_NAMES)}; found {names}")
    return names[0]


__all__ = ["ACTIVATION_NAMES", "LOCATIONS", "PLUGIN_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "UNMATCHED_PLUGIN_TYPES", "activation_of", "adapter_leaves", "adapterhub_config_dict",
           "adapterhub_tensors", "attach", "check_model_type", "check_plugin_options", "check_saveable", "config_kwargs", "hidden_size_of", "interface_dict", "layer_indices",
           "package_bottleneck_size", "read_adapter_tensors", "read_config", "write_folder"]
