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


def module_leaves(tree: Mapping) -> dict[Path, dict[str, Any]]:
    """{module path: {leaf name: leaf}} for every module that directly holds leaves (a nested tree or an
    already flat {path: leaf} dict), in the order the leaves come."""
    flat = tree if tree and all(isinstance(k, tuple) for k in tree) else flatten_params(tree)
    groups: dict[Path, dict[str, Any]] = {}
    for path, leaf in flat.items():
        groups.setdefault(path[:-1], {})[path[-1]] = leaf
    return groups


def module_paths(tree: Mapping) -> Iterator[tuple[Path, Mapping]]:
    """Yields (module path, its leaves) for every module that directly holds leaves."""
    yield from module_leaves(tree).items()


def kernel_shape(leaves: Mapping[str, Any]) -> tuple[int, int]:
    """The logical (I, O) shape of a linear module's kernel: a dense `kernel` or a quantized `qkernel`
    (which knows its shape)."""
    for key in ("kernel", "qkernel"):
        if key in leaves:
            return tuple(leaves[key].shape)  # type: ignore[return-value]
    raise KeyError(f"no kernel (kernel or qkernel) among the leaves {sorted(leaves)}")


def dotted(path: Path) -> str:
    """The HF module name of a tree path: model/layers/0/self_attn/q_proj -> model.layers.0.self_attn.q_proj."""
    return ".".join(path)
