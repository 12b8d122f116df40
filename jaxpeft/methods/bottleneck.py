"""Bottleneck adapters (Houlsby, Pfeiffer) as AdapterHub's `adapters` package computes them for Llama.

An adapter sits at the end of a sublayer of a decoder layer, where the sublayer output o (attention after
o_proj, or the MLP after down_proj) meets the sublayer's residual input r (the layer input, or the hidden
state after attention). The base computes r + o; with an adapter the layer computes

    x = o + input_residual · r
    y = o + output_residual · r + scale · up(act(down(x)))          down: D -> R, up: R -> D (with biases)

which is the package's `Adapter.pre_forward/forward/post_forward` on Llama, where the layer passes no
layer norm (`layer_norm=None`), so its "original_ln_*" options only move the residual r around:
    input_residual  = original_ln_before                     (the adapter reads o + r instead of o)
    output_residual = original_ln_after + original_ln_before · (not residual_before_ln)
    scale           = the package's `scaling` (a float; 1.0 in both presets)
Presets (the package's configs): houlsby = `double_seq_bn` (adapters after attention and after the MLP,
swish, original_ln_before False), pfeiffer = `seq_bn` (after the MLP only, relu, original_ln_before True,
so its adapter reads o + r). R = hidden / reduction_factor (16 by default).

Parameter tree, per adapted layer i (A = attention_adapter or output_adapter):
    model/layers/<i>/A/down/kernel (D, R)   down/bias (R,)       trainable; kaiming-uniform, zero bias
    model/layers/<i>/A/up/kernel   (R, D)   up/bias   (D,)       trainable; zeros, so y = o + r at init
    model/layers/<i>/A/scale, input_residual, output_residual ()  frozen numbers from the config
    model/layers/<i>/A/activation/<name>  (0,)                   frozen, empty: its key names the activation
The activation is a key rather than a value so that it is static under jit (the eval model in a run is the
base model, so the tree has to say everything). The init is the package's "mam_adapter" init. Bottleneck
adapters change the computation, not the weights, so they cannot be merged. AdapterHub folders:
`jaxpeft.convert.adapterhub` (the format), `save_adapterhub`/`load_adapterhub` below.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path as FsPath
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxpeft.convert import adapterhub
from jaxpeft.convert.adapterhub import (ACTIVATION_NAMES, LOCATIONS, activation_of, adapter_leaves, hidden_size_of,
                                        layer_indices)
from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, flatten_params, unflatten_params
from jaxpeft.methods.base import Method
from jaxpeft.models import hooks, ops

TRAINABLE_MODULES = ("down", "up")


@dataclasses.dataclass(frozen=True)
class Preset:
    package_name: str  # the package's config name
    mh_adapter: bool  # an adapter after attention
    activation: str
    original_ln_before: bool


PRESETS = {
    "houlsby": Preset("double_seq_bn", mh_adapter=True, activation="swish", original_ln_before=False),
    "pfeiffer": Preset("seq_bn", mh_adapter=False, activation="relu", original_ln_before=True),
}

# transformers' `get_activation` names (which the package uses) -> the function, in jnp.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}
if set(ACTIVATIONS) != set(ACTIVATION_NAMES):  # the format's list of names and the maths must agree
    raise ImportError(f"bottleneck ACTIVATIONS {sorted(ACTIVATIONS)} != adapterhub.ACTIVATION_NAMES")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptersConfig:
    """Bottleneck adapter hyper-parameters, named as in the package's BnConfig where they have a name there.

    `activation` and `original_ln_before` default (None) to the preset's value; `name` is the adapter's
    name in AdapterHub files (their tensor keys carry it). original_ln_after=False, or residual_before_ln=False
    with original_ln_before, moves the sublayer's residual (output_residual 0 or 2, as the package computes on
    Llama), so such an adapter does not equal the base model at init; the presets do.
    """

    adapter_type: str = "houlsby"  # "houlsby" (double_seq_bn) or "pfeiffer" (seq_bn)
    reduction_factor: float = 16
    activation: str | None = None  # the package's non_linearity; houlsby swish, pfeiffer relu
    scaling: float = 1.0
    dropout: float = 0.0  # on the adapter output while training
    leave_out: tuple[int, ...] = ()  # layers without adapters
    original_ln_before: bool | None = None
    original_ln_after: bool = True
    residual_before_ln: bool = True
    name: str = "adapter"

    def __post_init__(self) -> None:
        problems = []
        preset = PRESETS.get(self.adapter_type)
        if preset is None:
            problems.append(f"adapter_type={self.adapter_type!r}: use one of {sorted(PRESETS)}")
        else:  # fill the preset's defaults, so the config says what it computes
            if self.activation is None:
                object.__setattr__(self, "activation", preset.activation)
            if self.original_ln_before is None:
                object.__setattr__(self, "original_ln_before", preset.original_ln_before)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r}: use one of {sorted(ACTIVATIONS)}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) \
                or not self.reduction_factor > 0 or not math.isfinite(self.reduction_factor):
            problems.append(f"reduction_factor={self.reduction_factor!r}: must be a positive number "
                            "(bottleneck size = hidden size / reduction_factor)")
        if not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            problems.append(f"scaling={self.scaling!r}: must be a finite number")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout}: must be in [0, 1)")
        try:
            object.__setattr__(self, "leave_out", tuple(sorted({int(i) for i in self.leave_out})))
            if any(i < 0 for i in self.leave_out):
                problems.append(f"leave_out={list(self.leave_out)}: layer indices start at 0")
        except (TypeError, ValueError):
            problems.append(f"leave_out={self.leave_out!r}: needs layer indices (integers)")
        if not self.name or any(c in self.name for c in ". /,"):
            problems.append(f"name={self.name!r}: needs a non-empty name without '.', '/', ',' or spaces "
                            "(tensor keys carry it)")
        if problems:
            raise ConfigError("invalid bottleneck adapter config:\n" + bullet_list(problems))

    @property
    def locations(self) -> tuple[str, ...]:
        """Where the adapters sit in each layer: attention_adapter (houlsby only) and output_adapter."""
        if PRESETS[self.adapter_type].mh_adapter:
            return ("attention_adapter", "output_adapter")
        return ("output_adapter",)

    def frozen_values(self) -> dict[str, float]:
        """The frozen scalar leaves this config gives (see the module docstring)."""
        before = float(self.original_ln_before)
        return {"scale": float(self.scaling), "input_residual": before,
                "output_residual": float(self.original_ln_after) + before * float(not self.residual_before_ln)}


def bottleneck_size(hidden_size: int, reduction_factor: float) -> int:
    """R = hidden / reduction_factor; a ConfigError unless that is a whole number >= 1."""
    r = hidden_size / reduction_factor
    if r < 1 or not float(r).is_integer():
        divisors = [d for d in (2, 4, 8, 16, 32, 64) if hidden_size % d == 0]
        raise ConfigError(f"reduction_factor={reduction_factor} gives a bottleneck of {hidden_size} / "
                          f"{reduction_factor} = {r:g}, which is not a whole number >= 1 (hidden size {hidden_size}). "
                          f"Pick a reduction factor that divides {hidden_size}, e.g. {divisors or [1]}.")
    return int(r)


def apply_bottleneck(out_BxSxD: jax.Array, residual_BxSxD: jax.Array, leaves: Mapping[str, Any], *, dtype: Any,
                     dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The sublayer's output with its residual and the adapter: y of the module docstring, in `dtype`."""
    act = ACTIVATIONS[activation_of(leaves)]
    o = out_BxSxD.astype(dtype)
    r = residual_BxSxD.astype(dtype)
    coef = lambda k: jnp.asarray(leaves[k]).astype(dtype)  # noqa: E731
    x = o + coef("input_residual") * r
    delta = ops.linear(act(ops.linear(x, leaves["down"], dtype=dtype)), leaves["up"], dtype=dtype) * coef("scale")
    if dropout is not None:
        delta = dropout(delta)
    return o + coef("output_residual") * r + delta


def _new_adapter(key: jax.Array, hidden: int, bottleneck: int, config: AdaptersConfig) -> dict:
    # The package's "mam_adapter" init: torch's kaiming_uniform_(a=sqrt(5)) on the (R, D) down weight, i.e.
    # U(-1/sqrt(D), 1/sqrt(D)); zero biases and a zero up-projection (the adapted model equals the base).
    bound = 1.0 / math.sqrt(hidden)
    down = jax.random.uniform(key, (hidden, bottleneck), jnp.float32, -bound, bound)
    return adapter_leaves(down, jnp.zeros((bottleneck,)), jnp.zeros((bottleneck, hidden)), jnp.zeros((hidden,)),
                          config)


def check_layers(config: AdaptersConfig, n_layers: int) -> None:
    outside = [i for i in config.leave_out if i >= n_layers]
    if outside:
        raise ConfigError(f"leave_out={list(config.leave_out)}: layers {outside} do not exist (the model has "
                          f"{n_layers} layers, 0..{n_layers - 1})")
    if len(config.leave_out) == n_layers:
        raise ConfigError(f"leave_out={list(config.leave_out)} leaves out every layer; no adapter would be added")


class Adapters(Method):
    name = "adapters"
    config_cls = AdaptersConfig
    mergeable = False
    identity_at_init = True

    def prepare(self, config: AdaptersConfig, *, model_config: Any, tokenizer: Any = None) -> AdaptersConfig:
        bottleneck_size(model_config.hidden_size, config.reduction_factor)
        check_layers(config, model_config.num_hidden_layers)
        return config

    def init(self, key: jax.Array, params: Mapping, config: AdaptersConfig) -> dict:
        if not layer_indices(params):
            raise ConfigError("these parameters have no decoder layers (model/layers/<i>); bottleneck adapters go "
                              "into a Llama-family model's layers")
        flat = flatten_params(params)
        if any(self.is_adapter(p, config) for p in flat):
            raise ConfigError("these parameters already carry bottleneck adapters; split them off "
                              "(Adapters().split(...)[1]) before adding another")
        layers = layer_indices(params)
        check_layers(config, len(layers))
        hidden = hidden_size_of(params)
        bottleneck = bottleneck_size(hidden, config.reduction_factor)
        sites = [(i, loc) for i in layers if i not in config.leave_out for loc in config.locations]
        for k, (i, loc) in zip(jax.random.split(key, len(sites)), sites):
            sub = flatten_params(_new_adapter(k, hidden, bottleneck, config))
            flat.update({("model", "layers", str(i), loc) + p: v for p, v in sub.items()})
        return unflatten_params(flat)

    def is_adapter(self, path: Path, config: Any) -> bool:
        return len(path) > 4 and path[:2] == ("model", "layers") and path[3] in LOCATIONS

    def is_trainable(self, path: Path, config: Any) -> bool:
        return self.is_adapter(path, config) and path[4] in TRAINABLE_MODULES

    def save(self, path: Any, params: Mapping, config: AdaptersConfig, *, model_config: Any,
             base_model_name_or_path: str, tokenizer: Any = None, overwrite: bool = False) -> None:
        save_adapterhub(path, params, config, model_config=model_config,
                        base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)

    def load(self, path: Any, model: Any, params: Mapping) -> tuple[Any, dict, AdaptersConfig]:
        return load_adapterhub(path, model, params)

    def model_kwargs(self, config: AdaptersConfig) -> dict[str, Any]:
        return {"dropout_rate": config.dropout}


# Where each adapter sits: the end of the attention sublayer and of the MLP sublayer.
RESIDUAL_HOOKS = (hooks.ResidualHook(key="attention_adapter", site="attention", apply=apply_bottleneck),
                  hooks.ResidualHook(key="output_adapter", site="mlp", apply=apply_bottleneck))


def save_adapterhub(out_dir: str | os.PathLike, params: Mapping, config: AdaptersConfig, *, model_config: Any,
                    base_model_name_or_path: str, overwrite: bool = False) -> FsPath:
    """Writes the bottleneck adapter in `params` (base + adapter leaves) as a folder that the package's
    `model.load_adapter(out_dir)` reads. The folder appears whole or not at all."""
    adapterhub.check_model_type(getattr(model_config, "model_type", None), doing="write")
    adapterhub.check_plugin_options(model_config.model_type, config)
    adapterhub.check_saveable(params, config)
    tensors = adapterhub.adapterhub_tensors(params, config)
    cfg = adapterhub.adapterhub_config_dict(config, hidden_size=hidden_size_of(params),
                                            model_type=model_config.model_type, model_name=base_model_name_or_path)
    return adapterhub.write_folder(out_dir, cfg, tensors, overwrite=overwrite)


def load_adapterhub(folder: str | os.PathLike, model: Any, params: Mapping, *, allow_pickle: bool = False,
                    adapter_dtype: Any = jnp.float32) -> tuple[Any, dict, AdaptersConfig]:
    """Reads an AdapterHub bottleneck adapter folder (ours or the package's) onto base `params`.

    Returns (model with the adapter's dropout, params with the adapter leaves, AdaptersConfig).
    `pytorch_adapter.bin` (a pickle) is read only with `allow_pickle=True`, through torch's weights-only loader.
    """
    folder = FsPath(folder)
    adapterhub.check_model_type(getattr(getattr(model, "config", None), "model_type", None), doing="read")
    raw = adapterhub.read_config(folder)
    config = AdaptersConfig(**adapterhub.config_kwargs(raw))
    tensors = adapterhub.read_adapter_tensors(folder, allow_pickle)
    adapted = adapterhub.attach(params, config, raw, tensors, adapter_dtype)
    return model.clone(dropout_rate=config.dropout), adapted, config
