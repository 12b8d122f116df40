"""mergekit's merge methods, one small jitted function of one parameter's tensors each (mergekit 0.1.5's definitions).

Legend: N = number of non-base inputs, X = the parameter's shape. `base_X` is the base model's tensor,
`xs_NxX` the others', in the order of the configuration (mergekit puts the base first and keeps the rest
in order). The methods work in fp32 (fp64 inputs stay fp64 nowhere: they are refused upstream) and return
the dtype mergekit returns: the base's for the task-vector family, the first input's otherwise.

The task-vector family (`task_arithmetic`, `ties`, `dare_*`, `breadcrumbs*`, `della*`) is one function,
`task_vector_merge`, built from jaxpeft.merge.ops (the same selection and sign election as the adapter
merges) with mergekit's conventions: the sign is elected from the weighted deltas, `normalize` divides by
the summed weights of the entries that agree, sparsification keeps max(1, int(density * size)) entries
(magnitude) and `rescale` multiplies each sparsified delta by one L1-matching factor, |d|_1 / |kept|_1.
The delta is taken in the inputs' dtype as mergekit does (a bf16 delta is rounded to bf16 before it is
ranked), then everything is fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.merge.ops import _abs_bits, elect_and_merge, round_like

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALE_EPS = 1e-7


def _rounder(dtype):
    """Rounds fp32 values to `dtype` and back: mergekit's torch ops work in the inputs' dtype (bf16 too)."""
    return lambda x: round_like(x.astype(jnp.float32), dtype)


def _rescaled(d: jax.Array, keep: jax.Array, rescale: bool, rd=lambda x: x) -> jax.Array:
    """The kept entries, times |d|_1 / |kept|_1 if `rescale` (unless either norm is below 1e-7)."""
    kept = jnp.where(keep, d, 0)
    if not rescale:
        return kept
    before, after = rd(jnp.abs(d).sum()), rd(jnp.abs(kept).sum())
    ok = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
    return jnp.where(ok, rd(kept * rd(before / jnp.where(ok, after, 1))), kept)


def magnitude_counts(density: float, n: int) -> int:
    """mergekit's `magnitude`: how many entries of largest |d| are kept, max(1, int(density * n))."""
    return n if density >= 1 else (0 if density <= 0 or n == 0 else max(1, int(density * n)))


def outlier_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """mergekit's `magnitude_outliers` (breadcrumbs): (skip, keep): the `skip` largest |d| go (int(gamma * n),
    fewer when needed to keep int(density * n)), the next `keep` = int(density * n) stay, the rest go."""
    if density >= 1:
        return 0, n
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return n - n_bot - target, target


def _rank_keep(bits_X: jax.Array, lower: jax.Array, upper: jax.Array, has_upper: jax.Array, any_kept: jax.Array,
               at_lower: jax.Array):
    """True where lower < |d| (< upper if has_upper), plus the first `at_lower` entries (in flat order) equal to
    `lower`, so that exactly the count asked for is kept even when many magnitudes tie at the cut (bf16
    deltas often do; mergekit's choice among them is torch's unstable sort's, unspecified)."""
    eq = bits_X == lower
    first = (jnp.cumsum(eq.reshape(-1)).reshape(bits_X.shape) <= at_lower) & eq
    return ((bits_X > lower) | first) & (~has_upper | (bits_X < upper)) & any_kept


def host_thresholds(base_X, xs_NxX, counts: list[tuple[int, int]], dtype) -> tuple[np.ndarray, ...]:
    """Per input, the bit patterns of the (skip + keep)-th and skip-th largest |x_i - base| (the delta rounded to
    the inputs' dtype, as mergekit ranks it), by selection (np.partition: introselect, O(n), no sort)."""
    b32 = np.asarray(base_X, np.float32).reshape(-1)
    n = b32.size
    lower, upper, has_upper, any_kept, at_lower = [], [], [], [], []
    for x, (skip, keep) in zip(xs_NxX, counts):
        if skip == 0 and keep >= n:
            lower.append(0), upper.append(0), has_upper.append(False), any_kept.append(True), at_lower.append(n)
            continue
        d = np.asarray(x, np.float32).reshape(-1) - b32
        if np.dtype(dtype) != np.float32:
            d = d.astype(dtype).astype(np.float32)
        bits = np.abs(d).view(np.uint32)
        lower.append(np.partition(bits, n - (skip + keep))[n - (skip + keep)] if keep > 0 else 0)
        upper.append(np.partition(bits, n - skip)[n - skip] if skip > 0 else 0)
        has_upper.append(skip > 0), any_kept.append(keep > 0)
        above = int((bits > lower[-1]).sum()) - (int((bits >= upper[-1]).sum()) if skip > 0 else 0)
        at_lower.append(max(0, keep - above))
    return (np.asarray(lower, np.uint32), np.asarray(upper, np.uint32), np.asarray(has_upper),
            np.asarray(any_kept), np.asarray(at_lower, np.int32))


def della_probs(d_X: jax.Array, density: float, epsilon: float) -> jax.Array:
    """mergekit's `della_magprune` keep probabilities: per row, from density - epsilon (smallest |d|) rising
    linearly with the magnitude's rank to density + epsilon (largest)."""
    rows = d_X.reshape(1, -1) if d_X.ndim < 2 else d_X
    ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=1), axis=1).astype(jnp.float32)  # 0 = smallest
    rank_norm = jnp.clip(ranks / max(rows.shape[1] - 1, 1), 0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(d_X.shape)


def _sparsify(key, d_NxX, sparsifier, dens_N, thresholds, eps_N, rescale, rd):
    if sparsifier is None:
        return d_NxX
    col = (-1,) + (1,) * (d_NxX.ndim - 1)
    if sparsifier in ("magnitude", "magnitude_outliers"):
        keep_NxX = jax.vmap(_rank_keep)(_abs_bits(d_NxX), *thresholds)
    elif sparsifier == "random":
        keep_NxX = jax.random.uniform(key, d_NxX.shape) < dens_N.reshape(col)
    else:
        keep_NxX = jax.random.uniform(key, d_NxX.shape) < jax.vmap(della_probs)(d_NxX, dens_N, eps_N)
    out = jax.vmap(lambda d, k: _rescaled(d, k, rescale, rd))(d_NxX, keep_NxX)
    return jnp.where((dens_N >= 1).reshape(col), d_NxX, out)  # density 1: the delta as it is (no rescale)


@functools.partial(jax.jit, static_argnames=("sparsifier", "consensus", "normalize", "rescale"))
def _task_vector_core(base_X, xs_NxX, key, w_N, dens_N, thresholds, eps_N, lam, *, sparsifier, consensus,
                      normalize, rescale):
    rd = _rounder(base_X.dtype)
    w_N = rd(w_N)
    d_NxX = _sparsify(key, rd(xs_NxX.astype(jnp.float32) - base_X.astype(jnp.float32)), sparsifier, dens_N, thresholds, eps_N, rescale,
                      rd)
    if consensus is not None:
        mixed_X = elect_and_merge(d_NxX, w_N, method={"sum": "total", "count": "frequency"}[consensus],
                                  vote="weighted", divide="weights" if normalize else "none", round_to=base_X.dtype)
    else:
        mixed_X = rd(rd(d_NxX * w_N.reshape((-1,) + (1,) * base_X.ndim)).sum(axis=0))
        if normalize:
            total = rd(w_N.sum())
            mixed_X = rd(mixed_X / jnp.where(jnp.abs(total) < 1e-8, 1.0, total))
    mixed_X = jnp.where(lam != 1, rd(mixed_X * lam), mixed_X)
    return (base_X.astype(jnp.float32) + mixed_X).astype(base_X.dtype)


def _padded(x, size: int) -> np.ndarray:
    """x flattened and zero-padded to `size`, in numpy (eager jnp ops would compile once per shape)."""
    flat = np.asarray(x).reshape(-1)
    return np.pad(flat, (0, size - flat.size))


def bucket(n: int) -> int:
    """The padded length of an n-entry tensor: the next power of two, so that few shapes are compiled."""
    return 1 << max(0, (n - 1).bit_length())


def task_vector_merge(base_X: jax.Array, xs_NxX: jax.Array, key: jax.Array, *, sparsifier: str | None,
                      consensus: str | None, weights: tuple[float, ...], densities: tuple[float, ...],
                      gammas: tuple[float, ...] = (), epsilons: tuple[float, ...] = (), normalize: bool,
                      rescale: bool, lam: float = 1.0) -> jax.Array:
    """mergekit's generalized task arithmetic: base + lam * merge_i(sparsify(x_i - base)), in the base's dtype.

    consensus: None (a weighted sum), "sum" or "count" (TIES sign election, ops' "total"/"frequency").
    Every step but DELLA's per-row ranks is blind to the layout, so the tensors are flattened and padded with
    zeros to a power of two (a zero delta is never kept over a nonzero one and adds nothing to a norm): one
    compilation serves many shapes; the weights, densities and counts are traced, not static.
    """
    n, size = xs_NxX.shape[0], base_X.size
    gammas = gammas or (0.0,) * n
    epsilons = epsilons or (0.0,) * n
    counts = [(0, magnitude_counts(d, size)) if sparsifier != "magnitude_outliers" else outlier_counts(d, g, size)
              for d, g in zip(densities, gammas)]
    if sparsifier in ("magnitude", "magnitude_outliers"):
        thresholds = host_thresholds(base_X, xs_NxX, counts, np.asarray(base_X).dtype)
    else:
        thresholds = (np.zeros(n, np.uint32), np.zeros(n, np.uint32), np.zeros(n, bool), np.ones(n, bool),
                      np.zeros(n, np.int32))
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    args = (key, f32(weights), f32(densities), thresholds, f32(epsilons), f32(lam))
    kw = dict(sparsifier=sparsifier, consensus=consensus, normalize=normalize, rescale=rescale)
    if sparsifier == "della_magprune":
        return _task_vector_core(base_X, xs_NxX, *args, **kw)
    p = bucket(size)
    out = _task_vector_core(_padded(base_X, p), np.stack([_padded(x, p) for x in xs_NxX]), *args, **kw)
    return np.asarray(out)[:size].reshape(base_X.shape)


@jax.jit
def _linear_core(xs_NxX, w_N, normalize):
    out = (xs_NxX.astype(jnp.float32) * w_N.reshape((-1,) + (1,) * (xs_NxX.ndim - 1))).sum(axis=0)
    return jnp.where(normalize, out / w_N.sum(), out).astype(xs_NxX.dtype)


def linear(xs_NxX: jax.Array, *, weights: tuple[float, ...], normalize: bool = True) -> jax.Array:
    """Σ w_i·x_i (divided by Σ w_i if `normalize`), in fp32, returned in the inputs' dtype."""
    shape, p = xs_NxX.shape[1:], bucket(xs_NxX[0].size)
    out = _linear_core(np.stack([_padded(x, p) for x in xs_NxX]), np.asarray(weights, np.float32),
                       np.asarray(normalize))
    return np.asarray(out)[: int(np.prod(shape))].reshape(shape)


def _slerp_vectors(t, a, b, dot_threshold, eps):
    norm_a, norm_b = jnp.linalg.norm(a), jnp.linalg.norm(b)
    norm_a = jnp.where(norm_a > eps, norm_a, 1)
    norm_b = jnp.where(norm_b > eps, norm_b, 1)
    dot = jnp.clip(jnp.sum((a / norm_a) * (b / norm_b)), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    sin_theta = jnp.sin(theta)
    safe = jnp.where(lin, 1.0, sin_theta)
    coef_a = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / safe)
    coef_b = jnp.where(lin, t, jnp.sin(t * theta) / safe)
    return coef_a * a + coef_b * b


@jax.jit
def _slerp_core(v0_P, v1_P, t):
    return _slerp_vectors(t, v0_P.astype(jnp.float32), v1_P.astype(jnp.float32), 0.9995, 1e-8).astype(v0_P.dtype)


def slerp(v0_X: jax.Array, v1_X: jax.Array, *, t: float) -> jax.Array:
    """mergekit's slerp of the whole tensor (one vector): v0 is the base; linear where |cos| > 0.9995.
    Zero padding to a power of two changes no norm or dot product."""
    p = bucket(v0_X.size)
    out = _slerp_core(_padded(v0_X, p), _padded(v1_X, p), np.float32(t))
    return np.asarray(out)[: v0_X.size].reshape(v0_X.shape)


def _nuslerp_rows(t, v0, v1, eps=1e-8):
    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)
    cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - cos * cos) <= eps ** 2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin_theta = jnp.where(colinear, 1.0, jnp.sin(theta))
    out = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / sin_theta
    return jnp.where(colinear, (1 - t) * v0 + t * v1, out)


@functools.partial(jax.jit, static_argnames=("weights", "row_wise", "flatten"))
def nuslerp(base_X: jax.Array | None, x0_X: jax.Array, x1_X: jax.Array, *, weights: tuple[float, float],
            row_wise: bool = False, flatten: bool = True) -> jax.Array:
    """mergekit's nuslerp: t = w1 / (w0 + w1); of the two deltas from the base when there is one."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dtype = x0_X.dtype
    v0, v1 = x0_X.astype(jnp.float32), x1_X.astype(jnp.float32)
    if base_X is not None:
        v0, v1 = v0 - base_X.astype(jnp.float32), v1 - base_X.astype(jnp.float32)
    if flatten:
        out = _nuslerp_rows(t, v0.reshape(-1), v1.reshape(-1)).reshape(x0_X.shape)
    elif row_wise:
        out = _nuslerp_rows(t, jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1))
        out = jnp.swapaxes(out, 0, -1)
    else:
        out = _nuslerp_rows(t, v0, v1)
    if base_X is not None:
        out = base_X.astype(jnp.float32) + out
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnames=("filter_wise",))
def model_stock(base_X: jax.Array, xs_NxX: jax.Array, *, filter_wise: bool = False) -> jax.Array:
    """Model Stock (Jang et al. 2024): t·mean(x_i) + (1 - t)·base, t = N·cos / (1 + (N - 1)·cos), cos the mean
    pairwise cosine of the deltas (per row if `filter_wise`); the base where the denominator vanishes."""
    n = xs_NxX.shape[0]
    w0 = base_X.astype(jnp.float32)
    ws = xs_NxX.astype(jnp.float32)
    if filter_wise:
        w0 = w0.reshape(1, -1) if w0.ndim == 1 else w0
        ws = ws.reshape(n, 1, -1) if base_X.ndim == 1 else ws
    else:
        w0, ws = w0.reshape(-1), ws.reshape(n, -1)
    offsets = ws - w0
    norms = jnp.linalg.norm(offsets, axis=-1)
    cos = [jnp.clip((offsets[i] * offsets[j]).sum(-1) / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1)
           for i in range(n) for j in range(i + 1, n)]
    cos_theta = jnp.stack(cos).mean(axis=0)[..., None]
    denominator = 1 + (n - 1) * cos_theta
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0.0, n * cos_theta / jnp.where(singular, 1.0, denominator))
    out = t * ws.mean(axis=0) + (1 - t) * w0
    return out.reshape(base_X.shape).astype(base_X.dtype)


def passthrough(x_X: jax.Array, *, scale: float | None = None) -> jax.Array:
    """The one input as it is, or times `scale`."""
    return x_X if scale is None else (x_X.astype(jnp.float32) * scale).astype(x_X.dtype)
