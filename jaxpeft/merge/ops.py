"""Task-vector merging on arrays: task arithmetic, magnitude pruning, TIES, DARE (PEFT's merge_utils in jnp).

Legend: N = number of task tensors (stacked on axis 0), X = a tensor's own shape (any rank).
A task tensor is what one task adds: a LoRA delta, a LoRA factor, or `finetuned - base` for a full
fine-tune. Every merge takes `task_tensors` (N same-shape arrays, or one (N, *X) array) and `weights_N`,
and returns the merged (X) tensor, following peft/utils/merge_utils.py step for step:

* task_arithmetic  Σ w_i·t_i
* magnitude_prune  each t_i keeps its top int(density·size) entries by |value|, then Σ w_i·t_i
* ties             trim as above; elect a sign per entry from the UNWEIGHTED trimmed tensors
                   ("total": sign of Σ t_i, "frequency": sign of Σ sign(t_i); a tie elects +); disjoint
                   mean of the WEIGHTED entries that carry the elected sign (Yadav et al. 2023). Electing
                   before weighting is PEFT's order; kept so that the two agree.
* dare_linear      each t_i keeps each entry with probability `density` and is rescaled by 1/density
                   (Yu et al. 2023), then Σ w_i·t_i
* dare_ties        DARE's drop-and-rescale, then TIES' sign election and disjoint mean
density >= 1 leaves a tensor as it is (PEFT does the same), density must be in (0, 1].
DARE draws from a JAX key (it cannot match torch's generator bit for bit; only its statistics match).

`merge_full_models` applies these to whole fine-tuned models: base + merge(finetuned_i - base).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import dotted, flatten_params, unflatten_params

SIGN_METHODS = ("total", "frequency")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_KEY = ("dare_linear", "dare_ties")
TASK_MERGES = ("linear",) + NEEDS_DENSITY

TaskTensors = Sequence[jax.Array] | jax.Array


def check_density(density: float | None, combination_type: str) -> list[str]:
    """The problems with `density` for this merge (empty when fine): it must be in (0, 1] where it is used."""
    base = combination_type.removesuffix("_svd")
    if base not in NEEDS_DENSITY:
        return []
    if density is None:
        return [f"density=None: {combination_type!r} needs density in (0, 1] (the fraction of entries kept)"]
    if not 0.0 < float(density) <= 1.0:
        return [f"density={density}: must be in (0, 1] (the fraction of entries kept; 1 keeps all)"]
    return []


def _check(density: float | None, kind: str, majority_sign_method: str = "total") -> None:
    problems = check_density(density, kind)
    if majority_sign_method not in SIGN_METHODS:
        problems.append(f"majority_sign_method={majority_sign_method!r}: use one of {list(SIGN_METHODS)}")
    if problems:
        raise ConfigError(f"invalid {kind} merge arguments:\n" + bullet_list(problems))


def _stack(task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array) -> tuple[jax.Array, jax.Array]:
    t_NxX = jnp.stack([jnp.asarray(t) for t in task_tensors]) if not isinstance(task_tensors, jax.Array) \
        else task_tensors
    w_N = jnp.asarray(weights_N, t_NxX.dtype)
    if w_N.shape != t_NxX.shape[:1]:
        raise ConfigError(f"got {t_NxX.shape[0]} task tensors but {w_N.size} weights; pass one weight per tensor")
    return t_NxX, w_N


def _weighted(t_NxX: jax.Array, w_N: jax.Array) -> jax.Array:
    return t_NxX * w_N.reshape((-1,) + (1,) * (t_NxX.ndim - 1))


def prune_magnitude(x: jax.Array, density: float) -> jax.Array:
    """Keeps the int(density·size) entries of largest |x| (torch.topk's choice), zeroes the rest."""
    if density >= 1:
        return x
    flat = x.reshape(-1)
    k = int(density * flat.size)  # PEFT's rounding (floor of the float product)
    if k == 0:
        return jnp.zeros_like(x)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    return (flat * jnp.zeros_like(flat).at[idx].set(1)).reshape(x.shape)


def prune_random(key: jax.Array, x: jax.Array, density: float, rescale: bool = True) -> jax.Array:
    """Keeps each entry with probability `density` (Bernoulli), dividing the kept ones by density if `rescale`."""
    if density >= 1:
        return x
    kept = x * jax.random.bernoulli(key, density, x.shape).astype(x.dtype)
    return kept / density if rescale else kept


def majority_sign_mask(t_NxX: jax.Array, method: str = "total") -> jax.Array:
    """True where t_i's sign is the elected one (zeros never match); a tied vote elects +."""
    sign_NxX = jnp.sign(t_NxX)
    if method == "total":
        votes_X = t_NxX.sum(axis=0)
    elif method == "frequency":
        votes_X = sign_NxX.sum(axis=0)
    else:
        raise ConfigError(f"majority_sign_method={method!r}: use one of {list(SIGN_METHODS)}")
    return sign_NxX == jnp.where(votes_X >= 0, 1, -1).astype(t_NxX.dtype)


def disjoint_merge(weighted_NxX: jax.Array, mask_NxX: jax.Array) -> jax.Array:
    """The mean over the tensors that carry the elected sign (0 where none does)."""
    total_X = jnp.where(mask_NxX, weighted_NxX, 0).sum(axis=0)
    count_X = mask_NxX.sum(axis=0).astype(weighted_NxX.dtype)
    return total_X / jnp.maximum(count_X, 1.0)


def task_arithmetic(task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array) -> jax.Array:
    """Σ w_i·t_i."""
    t_NxX, w_N = _stack(task_tensors, weights_N)
    return _weighted(t_NxX, w_N).sum(axis=0)


def magnitude_prune(task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array, density: float) -> jax.Array:
    """Σ w_i·trim(t_i): each tensor keeps its top `density` fraction by magnitude."""
    _check(density, "magnitude_prune")
    t_NxX, w_N = _stack(task_tensors, weights_N)
    t_NxX = jnp.stack([prune_magnitude(t, density) for t in t_NxX])
    return _weighted(t_NxX, w_N).sum(axis=0)


def ties(task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array, density: float,
         majority_sign_method: str = "total") -> jax.Array:
    """TIES: trim by magnitude, elect sign (on the unweighted trimmed tensors), disjoint mean of the weighted."""
    _check(density, "ties", majority_sign_method)
    t_NxX, w_N = _stack(task_tensors, weights_N)
    t_NxX = jnp.stack([prune_magnitude(t, density) for t in t_NxX])
    return disjoint_merge(_weighted(t_NxX, w_N), majority_sign_mask(t_NxX, majority_sign_method))


def _drop(key: jax.Array, t_NxX: jax.Array, density: float) -> jax.Array:
    keys = jax.random.split(key, t_NxX.shape[0])
    return jnp.stack([prune_random(k, t, density, rescale=True) for k, t in zip(keys, t_NxX)])


def dare_linear(task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array, density: float, *,
                key: jax.Array) -> jax.Array:
    """DARE: Σ w_i·drop(t_i), each entry kept with probability `density` and rescaled by 1/density."""
    _check(density, "dare_linear")
    t_NxX, w_N = _stack(task_tensors, weights_N)
    return _weighted(_drop(key, t_NxX, density), w_N).sum(axis=0)


def dare_ties(task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array, density: float,
              majority_sign_method: str = "total", *, key: jax.Array) -> jax.Array:
    """DARE's random drop-and-rescale, then TIES' sign election and disjoint mean."""
    _check(density, "dare_ties", majority_sign_method)
    t_NxX, w_N = _stack(task_tensors, weights_N)
    t_NxX = _drop(key, t_NxX, density)
    return disjoint_merge(_weighted(t_NxX, w_N), majority_sign_mask(t_NxX, majority_sign_method))


def merge_task_tensors(combination_type: str, task_tensors: TaskTensors, weights_N: Sequence[float] | jax.Array, *,
                       density: float | None = None, majority_sign_method: str = "total",
                       key: jax.Array | None = None) -> jax.Array:
    """Dispatches on `combination_type` (linear, ties, dare_linear, dare_ties, magnitude_prune)."""
    fns: dict[str, Callable[[], jax.Array]] = {
        "linear": lambda: task_arithmetic(task_tensors, weights_N),
        "magnitude_prune": lambda: magnitude_prune(task_tensors, weights_N, density),
        "ties": lambda: ties(task_tensors, weights_N, density, majority_sign_method),
        "dare_linear": lambda: dare_linear(task_tensors, weights_N, density, key=key),
        "dare_ties": lambda: dare_ties(task_tensors, weights_N, density, majority_sign_method, key=key),
    }
    if combination_type not in fns:
        raise ConfigError(f"unknown task merge {combination_type!r}; use one of {list(fns)}")
    if combination_type in NEEDS_KEY and key is None:
        raise ConfigError(f"{combination_type} drops entries at random: pass key=jax.random.key(seed)")
    return fns[combination_type]()


def merge_full_models(base_params: Mapping, finetuned_list: Sequence[Mapping], weights: Sequence[float],
                      combination_type: str = "linear", *, density: float | None = None,
                      majority_sign_method: str = "total", seed: int = 0) -> dict:
    """Merges full fine-tunes of one base: base + merge_i(finetuned_i - base) for every floating leaf.

    Non-floating leaves (integer buffers) are taken from the base. Every fine-tune must have the base's
    leaves with the base's shapes; the error lists every leaf that does not.
    """
    problems = []
    if combination_type not in TASK_MERGES:
        problems.append(f"combination_type={combination_type!r}: full models merge with one of {list(TASK_MERGES)}")
    if len(weights) != len(finetuned_list) or not finetuned_list:
        problems.append(f"{len(finetuned_list)} fine-tuned models but {len(weights)} weights: pass one weight each")
    problems += check_density(density, combination_type)
    if majority_sign_method not in SIGN_METHODS:
        problems.append(f"majority_sign_method={majority_sign_method!r}: use one of {list(SIGN_METHODS)}")
    flat_base = flatten_params(base_params)
    flats = [flatten_params(ft) for ft in finetuned_list]
    for i, flat in enumerate(flats):
        problems += [f"model {i}: {dotted(p)} missing" for p in flat_base if p not in flat]
        problems += [f"model {i}: {dotted(p)} is not in the base" for p in flat if p not in flat_base]
        problems += [f"model {i}: {dotted(p)} has shape {tuple(jnp.shape(flat[p]))}, the base "
                     f"{tuple(jnp.shape(v))}" for p, v in flat_base.items()
                     if p in flat and jnp.shape(flat[p]) != jnp.shape(v)]
    if problems:
        raise ConfigError("cannot merge the fine-tuned models:\n" + bullet_list(problems)
                          + "\nPass one weight per fine-tune, and only fine-tunes of this exact base model.")
    root = jax.random.key(seed)
    out: dict[Any, Any] = {}
    for n, (path, base_leaf) in enumerate(flat_base.items()):
        base_leaf = jnp.asarray(base_leaf)
        if not jnp.issubdtype(base_leaf.dtype, jnp.floating):
            out[path] = base_leaf
            continue
        base32 = base_leaf.astype(jnp.float32)
        tasks_NxX = jnp.stack([jnp.asarray(f[path], jnp.float32) - base32 for f in flats])
        merged = merge_task_tensors(combination_type, tasks_NxX, weights, density=density,
                                    majority_sign_method=majority_sign_method, key=jax.random.fold_in(root, n))
        out[path] = (base32 + merged).astype(base_leaf.dtype)
    return unflatten_params(out)
