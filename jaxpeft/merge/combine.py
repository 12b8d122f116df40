"""Weighted combination of LoRA adapters trained on one base: PEFT's `add_weighted_adapter`, and an exact variant.

Legend: I, O = a kernel's input/output size, R_i = adapter i's rank at a module, K = the combined rank.
Our layout is lora_a (I, R), lora_b (R, O), delta ΔW_i = s_i·A_i·B_i (I, O) = PEFT's `get_delta_weight`.T.

Inputs are trees carrying LoRA leaves: full trees (base + adapter, as `load_peft_adapter` returns them)
or adapter-only trees (`Lora().split(...)[0]`). The result has adapters[0]'s structure with each module's
lora_a/lora_b/lora_scale replaced, and a LoraConfig that describes it (lora_alpha = r, so scale = 1, as
PEFT sets it; modules whose rank differs from r are listed in rank_pattern/alpha_pattern), ready for
`save_peft_adapter`. Other leaves (the base, modules_to_save) are adapters[0]'s: only shapes are compared.

semantics="peft" reproduces peft 0.21 `add_weighted_adapter` (tuners/lora/model.py):
* cat: A = [w_i·s_i·A_i] concatenated along the rank, B = [B_i]; rank Σ R_i. Exact: ΔW = Σ w_i·ΔW_i.
* linear, ties, dare_linear, dare_ties, magnitude_prune: A and B are merged SEPARATELY with the
  merge_utils function, A with weights sign(w_i·s_i)·sqrt(|w_i·s_i|), B with sqrt(|w_i·s_i|). All ranks
  must agree. linear therefore gives (Σ √(w_i s_i) A_i)(Σ √(w_i s_i) B_i): the cross terms
  √(w_i s_i w_j s_j)·A_i B_j stay, so [0.5, 0.5] is far from 0.5·ΔW1 + 0.5·ΔW2 (peft#3004).
* svd, ties_svd, dare_*_svd, magnitude_prune_svd: the merge_utils function on the deltas ΔW_i with the
  plain weights w_i, then a truncated SVD ΔW (I, O) = U·S·Vᵀ: lora_a = U_K, lora_b = diag(S_K)·V_Kᵀ
  (in torch layout PEFT's A = Vh, B = U·S), K = svd_rank or the largest input rank, capped at min(I, O)
  (PEFT fails or builds mismatched factors there); `svd_clamp` clamps both factors to ± the
  clamp-quantile of their entries, as PEFT does. That quantile is over signed entries, so it depends on
  the SVD library's arbitrary sign per singular pair: torch and XLA pick different signs for some
  shapes, and then the clamped results differ from PEFT's.
* one adapter: always linear (PEFT's rule).
semantics="exact" merges the full deltas: ΔW = merge_i(w_i·ΔW_i) (Σ for linear/svd; trim/elect/drop
applied to the deltas for ties/dare/magnitude_prune, `_svd` suffix or not), refactored by SVD at
K = svd_rank or Σ R_i, capped at min(I, O); at that default, linear/svd/cat are exact (a trimmed or
dropped delta is dense, so for those K is a truncation). cat is the same concatenation as in PEFT.

Default semantics: "exact". Merging is asked for as "the weighted sum of what the adapters do", and
only the exact path delivers it: PEFT's linear mixes in cross terms that no weight choice removes
(A_1 B_2 is a direction neither adapter learned), and trimming/electing A and B separately prunes
factors whose product is what matters. semantics="peft" stays available for reproducing a PEFT merge
(equal to fp32 rounding; DARE's random draw and svd_clamp's signs aside). Low-rank deltas (linear/svd)
are refactored through QR of the stacked factors, never forming the (I, O) product; dense ones (ties,
dare, magnitude) need the full SVD.

Not reproduced: PEFT keeps adapters[0]'s use_rslora while setting lora_alpha = r, so when the first
adapter is rsLoRA its merged adapter runs at scale sqrt(r) instead of the 1 its factors were built for;
we return scale 1 (the delta PEFT's arithmetic intends). DoRA adapters are refused (PEFT keeps a
magnitude vector computed for the freshly initialised new adapter, which no longer fits).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.tree import Path, dotted, flatten_params, kernel_shape, module_leaves, unflatten_params
from jaxpeft.merge import ops
from jaxpeft.methods.lora import LoraConfig

COMBINATION_TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
SEMANTICS = ("peft", "exact")
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # PEFT merges A and B apart

Factors = tuple[jax.Array, jax.Array]  # (a_IxK, b_KxO)


def combine_adapters(adapters: Sequence[Mapping], weights: Sequence[float], *, combination_type: str,
                     semantics: str = "exact", density: float | None = None, svd_rank: int | None = None,
                     svd_clamp: float | None = None, majority_sign_method: str = "total",
                     seed: int = 0) -> tuple[dict, LoraConfig]:
    """Combines LoRA adapters of one base into one: returns (tree with the new LoRA leaves, its LoraConfig).

    combination_type: one of COMBINATION_TYPES; semantics: "exact" (Σ w_i·ΔW_i, see the module doc) or
    "peft" (PEFT's add_weighted_adapter); density: fraction kept by ties/dare/magnitude_prune;
    svd_rank: rank of SVD refactoring; svd_clamp: PEFT's quantile clamp of the SVD factors;
    majority_sign_method: "total" or "frequency" (TIES); seed: DARE's random drop. density and svd_rank are
    ignored by the types that do not use them (as in PEFT). Raises ConfigError listing every bad argument,
    or every module where the adapters disagree (target modules, base shapes, ranks for PEFT's factorwise
    types), or DoRA adapters.
    """
    _check_args(adapters, weights, combination_type, semantics, density, svd_rank, svd_clamp, majority_sign_method)
    modules = _lora_modules(adapters)
    kind = "linear" if semantics == "peft" and len(adapters) == 1 else combination_type
    if semantics == "peft" and kind in _FACTORWISE:
        _check_equal_ranks(modules, kind)
    max_rank = max(int(m[p]["lora_a"].shape[1]) for m in modules for p in m)
    root = jax.random.key(seed)
    flat = flatten_params(adapters[0])
    ranks: dict[str, int] = {}
    for n, path in enumerate(sorted(modules[0])):
        per = [m[path] for m in modules]
        a32, b32 = _combine_module(per, weights, kind, semantics, density=density, svd_rank=svd_rank,
                                   max_rank=max_rank, svd_clamp=svd_clamp, sign_method=majority_sign_method,
                                   key=jax.random.fold_in(root, n))
        dtype = per[0]["lora_a"].dtype
        flat[path + ("lora_a",)] = a32.astype(dtype)
        flat[path + ("lora_b",)] = b32.astype(dtype)
        flat[path + ("lora_scale",)] = jnp.asarray(1.0, jnp.float32)
        ranks[dotted(path)] = int(a32.shape[1])
    return unflatten_params(flat), _config(ranks)


def _combine_module(per: Sequence[Mapping[str, Any]], weights: Sequence[float], kind: str, semantics: str, *,
                    density: float | None, svd_rank: int | None, max_rank: int, svd_clamp: float | None,
                    sign_method: str, key: jax.Array) -> Factors:
    a_list = [jnp.asarray(p["lora_a"], jnp.float32) for p in per]
    b_list = [jnp.asarray(p["lora_b"], jnp.float32) for p in per]
    s_list = [float(p["lora_scale"]) for p in per]
    in_dim, out_dim = a_list[0].shape[0], b_list[0].shape[1]
    if kind == "cat":
        return (jnp.concatenate([w * s * a for w, s, a in zip(weights, s_list, a_list)], axis=1),
                jnp.concatenate(b_list, axis=0))
    base_kind = kind.removesuffix("_svd") if kind != "svd" else "linear"
    if semantics == "peft" and kind in _FACTORWISE:
        ws = [w * s for w, s in zip(weights, s_list)]
        wa = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in ws]  # the sign goes on A only
        wb = [math.sqrt(abs(x)) for x in ws]
        merge = lambda ts, w, i: ops.merge_task_tensors(  # noqa: E731
            base_kind, ts, w, density=density, majority_sign_method=sign_method, key=jax.random.fold_in(key, i))
        return merge(a_list, wa, 0), merge(b_list, wb, 1)
    default_rank = max_rank if semantics == "peft" else sum(a.shape[1] for a in a_list)
    rank = min(svd_rank or default_rank, in_dim, out_dim)
    a_cat_IxC = jnp.concatenate([w * s * a for w, s, a in zip(weights, s_list, a_list)], axis=1)
    if base_kind == "linear" and rank <= a_cat_IxC.shape[1]:  # a low-rank sum: refactor from the factors
        u_IxK, s_K, vt_KxO = _lowrank_svd(a_cat_IxC, jnp.concatenate(b_list, axis=0))
    else:  # dense, or a rank above Σ R_i asked for: the extra directions get singular value 0, as in PEFT
        deltas_NxIxO = jnp.stack([s * a @ b for s, a, b in zip(s_list, a_list, b_list)])
        delta_IxO = ops.merge_task_tensors(base_kind, deltas_NxIxO, weights, density=density,
                                           majority_sign_method=sign_method, key=key)
        u_IxK, s_K, vt_KxO = jnp.linalg.svd(delta_IxO, full_matrices=False)
    a_IxK, b_KxO = u_IxK[:, :rank], s_K[:rank, None] * vt_KxO[:rank]
    if svd_clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b_KxO.reshape(-1), a_IxK.reshape(-1)]), svd_clamp)
        a_IxK, b_KxO = jnp.clip(a_IxK, -hi, hi), jnp.clip(b_KxO, -hi, hi)
    return a_IxK, b_KxO


def _lowrank_svd(a_IxR: jax.Array, b_RxO: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thin SVD of a_IxR @ b_RxO from QR of both factors: O((I + O)·R²), no (I, O) product."""
    qa_IxP, ra_PxR = jnp.linalg.qr(a_IxR)
    qb_OxQ, rb_QxR = jnp.linalg.qr(b_RxO.T)
    uc_PxK, s_K, vct_KxQ = jnp.linalg.svd(ra_PxR @ rb_QxR.T, full_matrices=False)
    return qa_IxP @ uc_PxK, s_K, vct_KxQ @ qb_OxQ.T


def _config(ranks: Mapping[str, int]) -> LoraConfig:
    r = max(ranks.values())
    pattern = {re.escape(name): k for name, k in sorted(ranks.items()) if k != r}
    return LoraConfig(r=r, lora_alpha=float(r), target_modules=tuple(sorted(ranks)), rank_pattern=pattern,
                      alpha_pattern={k: float(v) for k, v in pattern.items()})


def _check_args(adapters: Sequence[Mapping], weights: Sequence[float], combination_type: str, semantics: str,
                density: float | None, svd_rank: int | None, svd_clamp: float | None, sign_method: str) -> None:
    problems = []
    if not adapters:
        problems.append("no adapters: pass at least one tree carrying LoRA leaves")
    if len(weights) != len(adapters):
        problems.append(f"{len(adapters)} adapters but {len(weights)} weights: pass one weight per adapter")
    if combination_type not in COMBINATION_TYPES:
        problems.append(f"combination_type={combination_type!r} is unknown; use one of {list(COMBINATION_TYPES)}")
    else:
        problems += ops.check_density(density, combination_type)
    if semantics not in SEMANTICS:
        problems.append(f"semantics={semantics!r}: use 'exact' (Σ w_i·ΔW_i) or 'peft' (add_weighted_adapter)")
    if svd_rank is not None and int(svd_rank) < 1:
        problems.append(f"svd_rank={svd_rank}: must be at least 1 (or None for the default rank)")
    if svd_clamp is not None and not 0.0 < float(svd_clamp) <= 1.0:
        problems.append(f"svd_clamp={svd_clamp}: a quantile in (0, 1], or None for no clamping")
    if sign_method not in ops.SIGN_METHODS:
        problems.append(f"majority_sign_method={sign_method!r}: use one of {list(ops.SIGN_METHODS)}")
    if problems:
        raise ConfigError("cannot combine the adapters:\n" + bullet_list(problems))


def _lora_modules(adapters: Sequence[Mapping]) -> list[dict[Path, dict[str, Any]]]:
    """Per adapter, {module path: its leaves}; one error lists every mismatch between the adapters."""
    out, problems = [], []
    for i, tree in enumerate(adapters):
        mods = {p: g for p, g in module_leaves(tree).items() if "lora_a" in g}
        if not mods:
            problems.append(f"adapter {i}: no LoRA leaves (lora_a/lora_b); pass trees from load_peft_adapter "
                            "or Lora().split(...)[0]")
        problems += [f"adapter {i}: {dotted(p)} is DoRA (lora_magnitude); DoRA's magnitude does not combine "
                     "linearly, so DoRA adapters cannot be combined" for p, g in mods.items() if "lora_magnitude" in g]
        out.append(mods)
    if problems:
        raise ConfigError("cannot combine the adapters:\n" + bullet_list(problems))
    names = [{dotted(p) for p in m} for m in out]
    union = set().union(*names)
    problems += [f"adapter {i}: does not adapt {sorted(union - n)}" for i, n in enumerate(names) if union - n]
    if problems:
        raise ConfigError("the adapters adapt different modules:\n" + bullet_list(problems)
                          + "\nCombine adapters with the same target modules (retrain or drop the odd one).")
    for path in sorted(out[0]):
        shapes = [_io_shape(m[path]) for m in out]
        if len(set(shapes)) > 1:
            problems.append(f"{dotted(path)}: (in, out) = {shapes} across the adapters")
    if problems:
        raise ConfigError("the adapters were trained on different base shapes:\n" + bullet_list(problems)
                          + "\nCombine only adapters of the same base model.")
    return out


def _check_equal_ranks(modules: Sequence[Mapping[Path, Mapping[str, Any]]], kind: str) -> None:
    odd = [f"{dotted(p)}: ranks {[int(m[p]['lora_a'].shape[1]) for m in modules]}" for p in sorted(modules[0])
           if len({int(m[p]["lora_a"].shape[1]) for m in modules}) > 1]
    if odd:
        raise ConfigError(f"PEFT's {kind!r} merges the A and B factors entry by entry, so every adapter needs the "
                          f"same rank at each module:\n{bullet_list(odd)}\nUse 'cat' or an SVD type, or "
                          "semantics='exact'.")


def _io_shape(leaves: Mapping[str, Any]) -> tuple[int, ...]:
    a, b = leaves["lora_a"], leaves["lora_b"]
    shape = (int(a.shape[0]), int(b.shape[1]))
    try:
        return shape + tuple(int(d) for d in kernel_shape(leaves))
    except KeyError:  # an adapter-only tree holds no kernel
        return shape
