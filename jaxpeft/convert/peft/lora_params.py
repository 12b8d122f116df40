"""LoRA on bare parameters in PEFT 0.21.2's `target_parameters` form (its `ParamWrapper`): the format only.

Two kinds of targeted parameter:
- a 3-D MoE expert stack W (E, O, I) (transformers 5.24's `mlp.experts.gate_up_proj` (E, 2I, H) and
  `mlp.experts.down_proj` (E, H, I)): PEFT holds `lora_A` (R*E, I) and `lora_B` (O, R*E); A's rows are
  expert-major (row e*R + j: expert e, rank j) and B's columns rank-major (column j*E + e), so that
  delta_e = scale * B.reshape(O, R, E)[:, :, e] @ A.reshape(E, R, I)[e]  (E, O, I)  (PEFT's `get_delta_weight`).
  The tree keeps one expert's factors together: `lora_a` (E, R, I), `lora_b` (E, O, R), `lora_scale`, beside the
  stack's `weight` (`models/moe.py`).
- a 2-D parameter such as the router `mlp.gate.weight` (E, H): PEFT's factors are a Linear's (lora_A (R, H),
  lora_B (E, R)), so it is plain linear LoRA on the `gate` module here and in the files; only adapter_config.json
  lists it under `target_parameters` instead of `target_modules`.

Keys: `base_model.model.<container>.lora_A.weight` / `.lora_B.weight`, the container being the module holding the
parameter (`model.layers.<i>.mlp.experts`). One wrapper adapts one parameter; with two targeted parameters in one
container PEFT nests the wrappers, the first parameter of the module (in its own order: gate_up_proj, then
down_proj) innermost: its keys read `<container>.base_layer.lora_A.weight` (checked with peft 0.21.2: whatever the
order of `target_parameters`, gate_up_proj is the inner one).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxpeft.convert.peft.common import PREFIX, f32
from jaxpeft.core.tree import Path, dotted

PARAM_ORDER = ("gate_up_proj", "down_proj")  # a container's parameters in their module's order
_A, _B = ".lora_A.weight", ".lora_B.weight"


def is_param_scope(leaves: Mapping[str, Any]) -> bool:
    """Whether a scope is a bare 3-D parameter (an expert stack) rather than a linear kernel."""
    return "weight" in leaves and np.ndim(leaves["weight"]) == 3


def param_scopes(by_module: Mapping[Path, Mapping[str, Any]]) -> list[Path]:
    """Every bare-parameter scope that carries LoRA leaves."""
    return sorted(p for p, leaves in by_module.items() if "lora_a" in leaves and is_param_scope(leaves))


def _nesting(scopes: list[Path]) -> dict[Path, str]:
    """{scope: its PEFT module name}: `<container>.base_layer` for all but the last targeted parameter of a
    container (PEFT's nested wrappers, the module's first parameter innermost)."""
    by_container: dict[Path, list[str]] = {}
    for p in scopes:
        by_container.setdefault(p[:-1], []).append(p[-1])
    out = {}
    for container, names in by_container.items():
        ordered = sorted(names, key=lambda n: PARAM_ORDER.index(n) if n in PARAM_ORDER else len(PARAM_ORDER))
        for depth, name in enumerate(ordered):
            out[container + (name,)] = dotted(container) + ".base_layer" * (len(ordered) - 1 - depth)
    return out


def to_peft(factors_a_ExRxI: np.ndarray, factors_b_ExOxR: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A (R*E, I) expert-major rows, lora_B (O, R*E) rank-major columns) of the tree's factors."""
    a, b = f32(factors_a_ExRxI), f32(factors_b_ExOxR)
    e, r, i = a.shape
    return a.reshape(e * r, i), np.transpose(b, (1, 2, 0)).reshape(b.shape[1], r * e)


def from_peft(lora_a_RExI: np.ndarray, lora_b_OxRE: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `to_peft`: (lora_a (E, R, I), lora_b (E, O, R))."""
    r = lora_a_RExI.shape[0] // experts
    a = np.asarray(lora_a_RExI).reshape(experts, r, lora_a_RExI.shape[1])
    b = np.transpose(np.asarray(lora_b_OxRE).reshape(lora_b_OxRE.shape[0], r, experts), (2, 0, 1))
    return a, b


def peft_param_keys(by_module: Mapping[Path, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The PEFT tensors of every adapted expert stack."""
    out = {}
    for scope, module in _nesting(param_scopes(by_module)).items():
        a, b = to_peft(by_module[scope]["lora_a"], by_module[scope]["lora_b"])
        out[PREFIX + module + _A], out[PREFIX + module + _B] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return out


def take_param_keys(tensors: Mapping[str, np.ndarray], by_module: Mapping[Path, Mapping[str, Any]],
                    target_parameters: tuple[str, ...], scale_of, dtype: Any
                    ) -> tuple[dict[Path, dict[str, Any]], dict[str, np.ndarray], list[str]]:
    """(the tree leaves for each expert stack the adapter targets, the tensors left for linear LoRA, problems).

    The stacks targeted are those whose dotted path ends with a `target_parameters` entry; their expected key
    names follow PEFT's nesting (module docstring)."""
    targeted = [p for p, leaves in by_module.items() if is_param_scope(leaves)
                and any(dotted(p) == t or dotted(p).endswith("." + t) for t in target_parameters)]
    rest = dict(tensors)
    leaves: dict[Path, dict[str, Any]] = {}
    problems: list[str] = []
    for scope, module in _nesting(sorted(targeted)).items():
        a_key, b_key = PREFIX + module + _A, PREFIX + module + _B
        if a_key not in rest or b_key not in rest:
            problems.append(f"{dotted(scope)}: targeted by target_parameters but {a_key} / {b_key} are missing")
            continue
        a, b = rest.pop(a_key), rest.pop(b_key)
        weight = by_module[scope]["weight"]
        e, o, i = np.shape(weight)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] % e or a.shape[0] != b.shape[1] or a.shape[1] != i \
                or b.shape[0] != o:
            problems.append(f"{dotted(scope)}: lora_A {a.shape} / lora_B {b.shape} do not fit the (E, O, I) = "
                            f"{(e, o, i)} stack (need (R*E, I) and (O, R*E))")
            continue
        fa, fb = from_peft(a, b, e)
        leaves[scope] = {"lora_a": jnp.asarray(fa, dtype), "lora_b": jnp.asarray(fb, dtype),
                         "lora_scale": jnp.asarray(scale_of(dotted(scope)), jnp.float32)}
    return leaves, rest, problems
