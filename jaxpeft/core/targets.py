"""Which modules a method adapts: PEFT's target rules over dotted HF module names.

* a list/tuple of names: a module matches when its name equals one or ends with "." + it;
* a string: a regex that must match the whole module name (PEFT's `re.fullmatch`);
* "all-linear": every linear module except the output head.
`layers_to_transform` keeps modules whose name has a `.layers.<i>.` index in the given set.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, dotted, module_paths

Targets = str | Sequence[str]
LINEAR_KERNELS = ("kernel", "qkernel")
OUTPUT_HEADS = ("lm_head",)
_LAYER_INDEX = re.compile(r"(?:^|.*?\.)layers\.(\d+)\.")


def linear_modules(params: Mapping) -> dict[str, Path]:
    """Dotted name -> path of every module holding a linear kernel (dense or quantized)."""
    return {dotted(path): path for path, leaves in module_paths(params) if any(k in leaves for k in LINEAR_KERNELS)}


def moe_routers(params: Mapping) -> set[Path]:
    """The linear modules that are MoE routers: a `gate` beside an `experts` scope (transformers 5.24 keeps the
    router a bare parameter, so bitsandbytes leaves it dense and PEFT targets it as `<parent>.gate.weight`)."""
    scopes = {path for path, _ in module_paths(params)}
    parents = {p[:i] for p in scopes for i in range(len(p)) if p[i:i + 1] == ("experts",)}
    return {path for path in linear_modules(params).values() if path[-1] == "gate" and path[:-1] in parents}


def layer_index(name: str) -> int | None:
    m = _LAYER_INDEX.match(name)
    return int(m.group(1)) if m else None


def name_matches(name: str, targets: Targets) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return name.split(".")[-1] not in OUTPUT_HEADS
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def match_targets(
    params: Mapping,
    targets: Targets,
    *,
    layers_to_transform: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
) -> list[Path]:
    """Paths of the linear modules that `targets` selects; an error lists what exists when none match."""
    modules = linear_modules(params)
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise ConfigError(f"target regex {targets!r} does not compile: {e}") from e
    if not isinstance(targets, str):  # a listed name must name a module (PEFT would ignore a typo silently)
        absent = [t for t in targets if not any(name_matches(n, [t]) for n in modules)]
        if absent:
            suffixes = sorted({n.split(".")[-1] for n in modules})
            raise ConfigError(
                f"target modules {absent} match no linear module of this model. Linear module names end in:\n"
                f"{bullet_list(suffixes)}\nName those suffixes, full dotted names, a regex, or 'all-linear'.")
    chosen = []
    for name, path in sorted(modules.items()):
        if not name_matches(name, targets) or name_matches(name, list(exclude)):
            continue
        if layers_to_transform is not None and layer_index(name) not in set(layers_to_transform):
            continue
        chosen.append(path)
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in modules})
        raise ConfigError(
            f"targets {targets!r}"
            + (f" with layers_to_transform={list(layers_to_transform)}" if layers_to_transform is not None else "")
            + f" match no linear module of this model. Linear module names end in:\n{bullet_list(suffixes)}\n"
            f"e.g. {sorted(modules)[0]!r}. Use those suffixes, a regex over full names, or 'all-linear'."
        )
    return chosen


def pattern_value(patterns: Mapping[str, float], name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching as a suffix `(.*\\.)?(key)$`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def compact_targets(params: Mapping, chosen: Sequence[Path], layers_to_transform=None) -> list[str]:
    """The shortest PEFT `target_modules` list that selects exactly `chosen`: suffixes if they do, else names."""
    names = {dotted(p) for p in chosen}
    suffixes = sorted({n.split(".")[-1] for n in names})
    again = {dotted(p) for p in match_targets(params, suffixes, layers_to_transform=layers_to_transform)}
    return suffixes if again == names else sorted(names)
