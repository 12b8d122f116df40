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

The k-th largest magnitude is found by selection (`kth_largest_abs`: a 32-step bisection on the bit
pattern of |x|, O(32 n), jittable), not by `lax.top_k` or a sort (top_k with k = n/2 on an 8192 x 2048
matrix took 24 s here). Entries equal to the k-th magnitude are all kept (top_k would pick some of them).

`elect_and_merge` is the one sign-election step of every TIES-like merge, with both conventions:
PEFT's (vote on the unweighted tensors, divide by the count of agreeing entries) used by `ties` and
`dare_ties` here, and mergekit's (vote on the weighted tensors, divide by the summed weights of the
agreeing entries, or not at all) used by jaxpeft.merge.kit.

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


def _abs_bits(x: jax.Array) -> jax.Array:
    """|x| as uint32 bit patterns: for non-negative floats the integer order is the numeric order."""
    return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def kth_largest_bits(bits: jax.Array, k: int | jax.Array) -> jax.Array:
    """The k-th largest (1-based) of uint32 `bits`, by bisection on the bits from the top (32 counting passes)."""
    def step(i, found):
        candidate = found | jnp.left_shift(jnp.uint32(1), jnp.uint32(31 - i))
        return jnp.where((bits >= candidate).sum() >= k, candidate, found)
    return jax.lax.fori_loop(0, 32, step, jnp.uint32(0))


def kth_largest_abs(x: jax.Array, k: int | jax.Array) -> jax.Array:
    """The k-th largest |x| (1-based, k <= x.size), as float32, by selection (no sort)."""
    return jax.lax.bitcast_convert_type(kth_largest_bits(_abs_bits(x).reshape(-1), k), jnp.float32)


def top_magnitude_mask(x: jax.Array, k: int) -> jax.Array:
    """True on the k entries of largest |x| (and on any entry equal to the k-th); all False for k = 0."""
    if k <= 0:
        return jnp.zeros(x.shape, bool)
    bits = _abs_bits(x)
    return bits >= kth_largest_bits(bits.reshape(-1), k)


def prune_magnitude(x: jax.Array, density: float) -> jax.Array:
    """Keeps the int(density·size) entries of largest |x| (PEFT's count), zeroes the rest."""
    if density >= 1:
        return x
    k = int(density * x.size)  # PEFT's rounding (floor of the float product)
    return jnp.where(top_magnitude_mask(x, k), x, 0).astype(x.dtype)


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


def round_like(x: jax.Array, dtype: Any) -> jax.Array:
    """fp32 `x` rounded to `dtype` (nearest even) but kept fp32: emulates a torch op computed in that dtype.

    For bf16 the rounding is integer arithmetic on the bits, since XLA on the CPU may drop a
    convert-to-bf16-and-back pair (excess precision allowed); fp32 is left as it is; fp16 by converts.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32 or dtype == jnp.float64:
        return x
    if dtype != jnp.bfloat16:
        return x.astype(dtype).astype(x.dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def elect_and_merge(t_NxX: jax.Array, w_N: jax.Array, *, method: str = "total", vote: str = "unweighted",
                    divide: str = "count", round_to: Any = None) -> jax.Array:
    """Sign election and disjoint sum of the weighted tensors, in PEFT's or mergekit's convention.

    vote: "unweighted" (PEFT) elects from t_i, "weighted" (mergekit) from w_i·t_i.
    divide: "count" (PEFT) by the number of agreeing entries, "weights" (mergekit's normalize) by the sum of
    their weights (1 where that sum is 0), "none" not at all.
    round_to: a dtype each intermediate is rounded to (mergekit works in the inputs' dtype, e.g. bf16).
    """
    def rd(x):
        return x if round_to is None else round_like(x, round_to)
    weighted_NxX = rd(_weighted(t_NxX, w_N))
    mask_NxX = majority_sign_mask(weighted_NxX if vote == "weighted" else t_NxX, method)
    if divide == "count":
        return rd(disjoint_merge(weighted_NxX, mask_NxX))
    total_X = rd(jnp.where(mask_NxX, weighted_NxX, 0).sum(axis=0))
    if divide == "none":
        return total_X
    divisor_X = rd(jnp.where(mask_NxX, w_N.reshape((-1,) + (1,) * (t_NxX.ndim - 1)), 0).sum(axis=0))
    return rd(total_X / jnp.where(divisor_X == 0, 1, divisor_X))


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
    return elect_and_merge(t_NxX, w_N, method=majority_sign_method)


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
    return elect_and_merge(t_NxX, w_N, method=majority_sign_method)


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
