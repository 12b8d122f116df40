"""Splitting parameter trees: adapter vs base, trainable vs frozen, and the labels that drive optax.

A labels tree has the structure of the params and holds "trainable" or "frozen" at every leaf. A leaf
without a label is an error, never a default.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, flatten_params, unflatten_params

TRAINABLE, FROZEN = "trainable", "frozen"


def split_by(params: Mapping, predicate: Callable[[Path], bool]) -> tuple[dict, dict]:
    """(leaves where predicate(path) is true, the rest), both as nested dicts."""
    yes, no = {}, {}
    for path, leaf in flatten_params(params).items():
        (yes if predicate(path) else no)[path] = leaf
    return unflatten_params(yes), unflatten_params(no)


def combine(*trees: Mapping) -> dict:
    """Union of disjoint trees; later trees override earlier ones at the same path (adapters over base)."""
    flat: dict = {}
    for tree in trees:
        flat.update(flatten_params(tree))
    return unflatten_params(flat)


def check_labels(params: Mapping, labels: Mapping) -> None:
    """Every leaf has exactly one of the two labels; lists every offender at once."""
    flat_p, flat_l = flatten_params(params), flatten_params(labels)
    problems = [f"{'/'.join(p)}: no label" for p in flat_p if p not in flat_l]
    problems += [f"{'/'.join(p)}: label {flat_l[p]!r}" for p in flat_p
                 if p in flat_l and flat_l[p] not in (TRAINABLE, FROZEN)]
    problems += [f"{'/'.join(p)}: labelled but not a parameter" for p in flat_l if p not in flat_p]
    if problems:
        raise ConfigError("every parameter must be labelled 'trainable' or 'frozen':\n"
                          + bullet_list(problems[:30]) + "\nBuild the labels from the same parameter tree.")


def split_trainable(params: Mapping, labels: Mapping) -> tuple[dict, dict]:
    """(trainable, frozen) partitions of `params` by `labels`."""
    check_labels(params, labels)
    flat_l = flatten_params(labels)
    return split_by(params, lambda p: flat_l[p] == TRAINABLE)


def count(tree: Mapping) -> int:
    """Number of scalars in a tree (quantized leaves count their logical size via `.size`)."""
    return int(sum(getattr(leaf, "logical_size", None) or leaf.size for leaf in flatten_params(tree).values()))


def label_tree(params: Mapping, is_trainable: Callable[[Path], bool]) -> dict[str, Any]:
    return unflatten_params({p: TRAINABLE if is_trainable(p) else FROZEN for p in flatten_params(params)})
