"""Parameter-tree helpers: flatten to key paths, rebuild, and dotted HF module names."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

Path = tuple[str, ...]


def flatten_params(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts -> {path tuple: leaf}. Non-dict values (arrays, quantized pytrees) are leaves."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, Mapping):
            out.update(flatten_params(value, path))
        else:
            out[path] = value
    return out


def unflatten_params(flat: Mapping[Path, Any]) -> dict:
    """The inverse of `flatten_params`."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def module_paths(tree: Mapping) -> Iterator[tuple[Path, Mapping]]:
    """Yields (module path, its leaves) for every module that directly holds leaves."""
    groups: dict[Path, dict] = {}
    for path, leaf in flatten_params(tree).items():
        groups.setdefault(path[:-1], {})[path[-1]] = leaf
    yield from groups.items()


def dotted(path: Path) -> str:
    """The HF module name of a tree path: model/layers/0/self_attn/q_proj -> model.layers.0.self_attn.q_proj."""
    return ".".join(path)
