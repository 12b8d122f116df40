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

Out of core: every tensor is seen as rows x cols (`RowChunks`) and merged in chunks of whole rows, at most
`budget` bytes of fp32 per input chunk (default 64 MB), read through a `Read` callback (kit_exec reads the
rows with safetensors' get_slice). What needs the whole tensor comes first: the k-th magnitudes (one uint32
copy of |delta| for one input at a time, np.partition in place), the L1 rescale norms and slerp's norms and
dot product (row sums in fp32, their total in fp64). The random masks hash each entry's flat index. So the
output is bit-identical whatever the budget. nuslerp and model_stock still take whole tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.merge.ops import _abs_bits, elect_and_merge, round_like

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALE_EPS = 1e-7
DEFAULT_CHUNK_BYTES = 64 << 20  # fp32 bytes of one input's row chunk


def _rounder(dtype):
    """Rounds fp32 values to `dtype` and back: mergekit's torch ops work in the inputs' dtype (bf16 too)."""
    return lambda x: round_like(x.astype(jnp.float32), dtype)


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


def _rank_keep(bits_RxC: jax.Array, lower: jax.Array, upper: jax.Array, has_upper: jax.Array, any_kept: jax.Array,
               cut: jax.Array):
    """True where lower < |d| (< upper if has_upper), plus the entries equal to `lower` before flat position
    `cut` of the chunk, so that exactly the count asked for is kept even when many magnitudes tie at the cut
    (bf16 deltas often do; mergekit's choice among them is torch's unstable sort's, unspecified): the first
    ones in flat order, across chunks (task_vector_chunks finds `cut`)."""
    rows, cols = bits_RxC.shape
    flat = jnp.arange(rows, dtype=jnp.int32)[:, None] * cols + jnp.arange(cols, dtype=jnp.int32)[None]
    first = (bits_RxC == lower) & (flat < cut)
    return ((bits_RxC > lower) | first) & (~has_upper | (bits_RxC < upper)) & any_kept


@dataclasses.dataclass(frozen=True)
class RowChunks:
    """A tensor seen as `rows` x `cols` (shape[0] x the rest; a vector is one row), cut into chunks of `per`
    rows: the largest power of two whose fp32 copy fits `budget` bytes (at least one row), or the whole
    tensor padded to a power of two of rows when it fits one chunk (so that few shapes are compiled).
    Chunks hold whole rows, so per-row statistics (DELLA's ranks, the row sums behind every global sum)
    and the random masks (a hash of each entry's flat index) are the same whatever the budget."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    per: int

    @classmethod
    def of(cls, shape: tuple[int, ...], budget: int) -> "RowChunks":
        shape = tuple(int(s) for s in shape)
        rows, cols = (1, int(np.prod(shape, dtype=np.int64))) if len(shape) < 2 else (
            shape[0], int(np.prod(shape[1:], dtype=np.int64)))
        fit = max(1, budget // (4 * max(cols, 1)))
        per = bucket(rows) if rows <= fit else 1 << (fit.bit_length() - 1)
        return cls(shape, rows, cols, per)

    def spans(self) -> list[tuple[int, int]]:
        return [(a, min(a + self.per, self.rows)) for a in range(0, self.rows, self.per)]


Read = Callable[[int, int, int], np.ndarray]  # read(i, start, stop): rows start..stop of input i, rows x cols


def array_reader(arrays: Sequence[np.ndarray]) -> Read:
    """A `Read` over tensors in memory (input 0 first)."""
    def read(i: int, start: int, stop: int) -> np.ndarray:
        a = np.asarray(arrays[i])
        return a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], -1)[start:stop]
    return read


def _pad_rows(x_RxC: np.ndarray, rows: int) -> np.ndarray:
    return x_RxC if x_RxC.shape[0] == rows else np.pad(x_RxC, ((0, rows - x_RxC.shape[0]), (0, 0)))


def _chunk(read: Read, inputs: Sequence[int], view: RowChunks, start: int, stop: int) -> np.ndarray:
    return np.stack([_pad_rows(read(i, start, stop), view.per) for i in inputs])


def _hash32(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons' integer hash), a bijection of uint32 with good avalanche."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _uniform(seed_N: jax.Array, first_row: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """U[0, 1) per input and entry, a function of (seed, flat index) only: a chunk's draws do not depend on
    how the tensor is chunked."""
    n, rows, cols = shape
    idx = (first_row.astype(jnp.uint32) + jnp.arange(rows, dtype=jnp.uint32))[:, None] * jnp.uint32(cols) + \
        jnp.arange(cols, dtype=jnp.uint32)[None]
    h = _hash32(_hash32(idx[None] * jnp.uint32(0x9E3779B9) ^ seed_N[:, None, None]) + seed_N[:, None, None])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def della_probs(d_X: jax.Array, density: float, epsilon: float) -> jax.Array:
    """mergekit's `della_magprune` keep probabilities: per row, from density - epsilon (smallest |d|) rising
    linearly with the magnitude's rank to density + epsilon (largest)."""
    rows = d_X.reshape(1, -1) if d_X.ndim < 2 else d_X
    ranks = jnp.argsort(jnp.argsort(jnp.abs(rows), axis=1), axis=1).astype(jnp.float32)  # 0 = smallest
    rank_norm = jnp.clip(ranks / max(rows.shape[1] - 1, 1), 0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(d_X.shape)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _delta_bits(base_RxC, x_RxC, *, dtype):
    """|x - base| as mergekit ranks it (the delta rounded to the inputs' dtype), as uint32 bit patterns."""
    return _abs_bits(round_like(x_RxC.astype(jnp.float32) - base_RxC.astype(jnp.float32), dtype))


def host_thresholds(read: Read, view: RowChunks, counts: list[tuple[int, int]], dtype) -> tuple[np.ndarray, ...]:
    """Per input, the bit patterns of the (skip + keep)-th and skip-th largest |x_i - base|, by selection
    (np.partition in place: introselect, O(n), no sort) over ONE uint32 copy of the whole |delta| at a time,
    filled chunk by chunk."""
    n = view.rows * view.cols
    lower, upper, has_upper, any_kept, at_lower, cuts = [], [], [], [], [], []
    for i, (skip, keep) in enumerate(counts, start=1):
        if skip == 0 and keep >= n:
            lower.append(0), upper.append(0), has_upper.append(False), any_kept.append(True), at_lower.append(n)
            cuts.append(-1)
            continue
        bits = np.empty((view.rows, view.cols), np.uint32)
        for a, b in view.spans():
            bits[a:b] = np.asarray(_delta_bits(read(0, a, b), read(i, a, b), dtype=np.dtype(dtype)))
        bits = bits.reshape(-1)
        ordered = bits.copy() if len(view.spans()) == 1 else None  # one chunk: find the tie break's cut here
        if keep > 0:
            bits.partition(n - (skip + keep))
        lower.append(bits[n - (skip + keep)] if keep > 0 else 0)
        above = int((bits > lower[-1]).sum())
        if skip > 0:
            bits.partition(n - skip)
            upper.append(bits[n - skip])
            above -= int((bits >= upper[-1]).sum())
        else:
            upper.append(0)
        del bits
        has_upper.append(skip > 0), any_kept.append(keep > 0), at_lower.append(max(0, keep - above))
        cuts.append(-1)
        if ordered is not None and at_lower[-1] > 0:
            at = np.flatnonzero(ordered == lower[-1])
            cuts[-1] = at[at_lower[-1] - 1] + 1 if at_lower[-1] < at.size else -1
        elif ordered is not None:
            cuts[-1] = 0
    # at_lower: how many entries equal to `lower` are kept; cuts: where the last of them is, when known (-1)
    return (np.asarray(lower, np.uint32), np.asarray(upper, np.uint32), np.asarray(has_upper),
            np.asarray(any_kept), np.asarray(at_lower, np.int64), np.asarray(cuts, np.int64))


def _rescaled(d, keep, before, after, rd):
    """The kept entries, times |d|_1 / |kept|_1 (the whole tensor's L1 norms, summed in a first pass; left
    as they are if either norm is below 1e-7)."""
    kept = jnp.where(keep, d, 0)
    before, after = rd(before), rd(after)
    ok = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
    return jnp.where(ok, rd(kept * rd(before / jnp.where(ok, after, 1))), kept)


@functools.partial(jax.jit, static_argnames=("sparsifier", "consensus", "normalize", "rescale", "stage", "rest"))
def _task_vector_chunk(base_RxC, xs_NxRxC, seed_N, first_row, valid_rows, w_N, dens_N, thresholds, eps_N, lam,
                       before_N, after_N, *, sparsifier, consensus, normalize, rescale, stage, rest):
    """One chunk of rows of the task-vector merge. stage "sums": the row sums of |d| and of |kept d| (for the
    L1 rescale); "merge": the merged rows. Both also count each input's entries equal to its cut (so the next
    chunk knows how many of those are already kept)."""
    rd = _rounder(base_RxC.dtype)
    w_N = rd(w_N)
    d_NxRxC = rd(xs_NxRxC.astype(jnp.float32) - base_RxC.astype(jnp.float32))
    col = (-1, 1, 1)
    eq_N = jnp.zeros(d_NxRxC.shape[0], jnp.int32)
    if sparsifier is None:
        keep_NxRxC = jnp.ones(d_NxRxC.shape, bool)
    elif sparsifier in ("magnitude", "magnitude_outliers"):
        bits = _abs_bits(d_NxRxC)
        keep_NxRxC = jax.vmap(_rank_keep)(bits, *thresholds)  # thresholds[4]: the cut positions
        valid_R = jnp.arange(bits.shape[1]) < valid_rows
        eq_N = ((bits == thresholds[0][:, None, None]) & valid_R[None, :, None]).sum(axis=(1, 2), dtype=jnp.int32)
    elif sparsifier == "random":
        keep_NxRxC = _uniform(seed_N, first_row, d_NxRxC.shape) < dens_N.reshape(col)
    else:
        shape = (d_NxRxC.shape[0], -1) + rest
        probs = jax.vmap(della_probs)(d_NxRxC.reshape(shape), dens_N, eps_N).reshape(d_NxRxC.shape)
        keep_NxRxC = _uniform(seed_N, first_row, d_NxRxC.shape) < probs
    if stage == "sums":
        return jnp.abs(d_NxRxC).sum(axis=2), jnp.abs(jnp.where(keep_NxRxC, d_NxRxC, 0)).sum(axis=2), eq_N
    if sparsifier is not None:
        if rescale:
            out = jax.vmap(lambda d, k, b, a: _rescaled(d, k, b, a, rd))(d_NxRxC, keep_NxRxC, before_N, after_N)
        else:
            out = jnp.where(keep_NxRxC, d_NxRxC, 0)
        d_NxRxC = jnp.where((dens_N >= 1).reshape(col), d_NxRxC, out)  # density 1: the delta as it is
    if consensus is not None:
        mixed = elect_and_merge(d_NxRxC, w_N, method={"sum": "total", "count": "frequency"}[consensus],
                                vote="weighted", divide="weights" if normalize else "none", round_to=base_RxC.dtype)
    else:
        mixed = rd(rd(d_NxRxC * w_N.reshape(col)).sum(axis=0))
        if normalize:
            total = rd(w_N.sum())
            mixed = rd(mixed / jnp.where(jnp.abs(total) < 1e-8, 1.0, total))
    mixed = jnp.where(lam != 1, rd(mixed * lam), mixed)
    return (base_RxC.astype(jnp.float32) + mixed).astype(base_RxC.dtype), eq_N


def task_vector_chunks(read: Read, n: int, shape: tuple[int, ...], dtype, key: jax.Array, *,
                       sparsifier: str | None, consensus: str | None, weights: tuple[float, ...],
                       densities: tuple[float, ...], gammas: tuple[float, ...] = (),
                       epsilons: tuple[float, ...] = (), normalize: bool, rescale: bool, lam: float = 1.0,
                       budget: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """mergekit's generalized task arithmetic, base + lam * merge_i(sparsify(x_i - base)), of input 0 (the
    base) and inputs 1..n as `read` gives them, in row chunks of at most `budget` fp32 bytes per input:
    the thresholds (one |delta| copy at a time, np.partition) and the L1 norms (row sums) first, then the
    elementwise merge chunk by chunk into the output (`dtype`, the base's). Bit-identical for any budget."""
    view = RowChunks.of(shape, budget)
    size = view.rows * view.cols
    gammas, epsilons = gammas or (0.0,) * n, epsilons or (0.0,) * n
    counts = [(0, magnitude_counts(d, size)) if sparsifier != "magnitude_outliers" else outlier_counts(d, g, size)
              for d, g in zip(densities, gammas)]
    if sparsifier in ("magnitude", "magnitude_outliers"):
        thresholds = host_thresholds(read, view, counts, dtype)
    else:
        thresholds = (np.zeros(n, np.uint32), np.zeros(n, np.uint32), np.zeros(n, bool), np.ones(n, bool),
                      np.zeros(n, np.int64), np.full(n, -1, np.int64))
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    seed_N = np.asarray(jax.random.bits(key, (n,), jnp.uint32))
    kw = dict(sparsifier=sparsifier, consensus=consensus, normalize=normalize, rescale=rescale,
              rest=tuple(view.shape[1:]) if len(view.shape) > 1 else (view.cols,))
    params = (f32(weights), f32(densities))
    before = after = np.zeros(n, np.float32)

    def run(stage: str, before, after):
        left, results = thresholds[4].astype(np.int64), []  # entries equal to the cut still to keep, per input
        for a, b in view.spans():
            chunk = _chunk(read, range(n + 1), view, a, b)

            def call(cut_N):
                return _task_vector_chunk(chunk[0], chunk[1:], seed_N, np.int32(a), np.int32(b - a), *params,
                                          thresholds[:4] + (cut_N,), f32(epsilons), f32(lam), before, after,
                                          stage=stage, **kw)
            # keep every entry equal to the cut, or none once enough are kept; where this chunk holds more
            # than are left, find the position of the last one to keep and run the chunk again (once per input)
            known = thresholds[5] >= 0
            cut_N = np.where(known, thresholds[5], np.where(left > 0, np.iinfo(np.int32).max, 0)).astype(np.int32)
            *res, eq = call(cut_N)
            eq = np.asarray(eq)
            split = (left > 0) & (eq > left) & ~known
            if split.any():
                for i in np.flatnonzero(split):
                    bits = np.asarray(_delta_bits(chunk[0], chunk[i + 1], dtype=np.dtype(dtype))).reshape(-1)
                    cut_N[i] = np.flatnonzero(bits == thresholds[0][i])[left[i] - 1] + 1
                *res, eq = call(cut_N)
            left -= np.asarray(eq)
            results.append((a, b, [np.asarray(r) for r in res]))
        return results

    if rescale and sparsifier is not None:
        sums = run("sums", before, after)
        row_sums = [np.concatenate([r[k][:, : b - a] for a, b, r in sums], axis=1) for k in (0, 1)]
        before, after = (f32(s.astype(np.float64).sum(axis=1)) for s in row_sums)
    out = np.empty((view.rows, view.cols), np.dtype(dtype))
    for a, b, (o,) in run("merge", before, after):
        out[a:b] = o[: b - a]
    return out.reshape(shape)


def task_vector_merge(base_X: jax.Array, xs_NxX: jax.Array, key: jax.Array, *, budget: int = DEFAULT_CHUNK_BYTES,
                      **kw) -> np.ndarray:
    """`task_vector_chunks` of tensors in memory: consensus None (a weighted sum), "sum" or "count" (TIES
    sign election, ops' "total"/"frequency"); sparsifier None, "magnitude", "random", "magnitude_outliers"
    or "della_magprune"."""
    base = np.asarray(base_X)
    return task_vector_chunks(array_reader([base, *xs_NxX]), len(xs_NxX), base.shape, base.dtype, key,
                              budget=budget, **kw)


def bucket(n: int) -> int:
    """The next power of two of n: padded row counts, so that few shapes are compiled."""
    return 1 << max(0, (n - 1).bit_length())


@jax.jit
def _linear_chunk(xs_NxRxC, w_N, normalize):
    out = (xs_NxRxC.astype(jnp.float32) * w_N.reshape(-1, 1, 1)).sum(axis=0)
    return jnp.where(normalize, out / w_N.sum(), out).astype(xs_NxRxC.dtype)


def linear_chunks(read: Read, n: int, shape: tuple[int, ...], dtype, *, weights: tuple[float, ...],
                  normalize: bool = True, budget: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """Σ w_i·x_i over the n inputs (divided by Σ w_i if `normalize`), in fp32, in the inputs' dtype."""
    view = RowChunks.of(shape, budget)
    out = np.empty((view.rows, view.cols), np.dtype(dtype))
    for a, b in view.spans():
        o = _linear_chunk(_chunk(read, range(n), view, a, b), np.asarray(weights, np.float32), np.asarray(normalize))
        out[a:b] = np.asarray(o)[: b - a]
    return out.reshape(shape)


def linear(xs_NxX: jax.Array, *, weights: tuple[float, ...], normalize: bool = True,
           budget: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    x0 = np.asarray(xs_NxX[0])
    return linear_chunks(array_reader(list(xs_NxX)), len(xs_NxX), x0.shape, x0.dtype, weights=weights,
                         normalize=normalize, budget=budget)


@jax.jit
def _slerp_sums(v0_RxC, v1_RxC):
    a, b = v0_RxC.astype(jnp.float32), v1_RxC.astype(jnp.float32)
    return jnp.stack([(a * a).sum(axis=1), (b * b).sum(axis=1), (a * b).sum(axis=1)])


@jax.jit
def _slerp_chunk(v0_RxC, v1_RxC, coef_a, coef_b):
    return (coef_a * v0_RxC.astype(jnp.float32) + coef_b * v1_RxC.astype(jnp.float32)).astype(v0_RxC.dtype)


def slerp_coefficients(sq_a: float, sq_b: float, ab: float, t: float, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[float, float]:
    """mergekit's slerp of two whole tensors (one vector each) from their squared norms and dot product:
    the coefficients of v0 and v1 (linear where |cos| > 0.9995)."""
    norm_a, norm_b = math.sqrt(sq_a), math.sqrt(sq_b)
    norm_a, norm_b = (norm_a if norm_a > eps else 1.0), (norm_b if norm_b > eps else 1.0)
    dot = min(1.0, max(-1.0, ab / (norm_a * norm_b)))
    if abs(dot) > dot_threshold:
        return 1 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_chunks(read: Read, shape: tuple[int, ...], dtype, *, t: float,
                 budget: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """mergekit's slerp of inputs 0 (the base) and 1: norms and dot product summed over the row chunks (row
    sums in fp32, their total in fp64), then coef_a·v0 + coef_b·v1 chunk by chunk."""
    view = RowChunks.of(shape, budget)
    sums = np.zeros(3, np.float64)
    for a, b in view.spans():
        s = np.asarray(_slerp_sums(*_chunk(read, (0, 1), view, a, b)))
        sums += s.astype(np.float64).sum(axis=1)
    coef = [np.float32(c) for c in slerp_coefficients(*sums, t=t)]
    out = np.empty((view.rows, view.cols), np.dtype(dtype))
    for a, b in view.spans():
        out[a:b] = np.asarray(_slerp_chunk(*_chunk(read, (0, 1), view, a, b), *coef))[: b - a]
    return out.reshape(shape)


def slerp(v0_X: jax.Array, v1_X: jax.Array, *, t: float, budget: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    v0 = np.asarray(v0_X)
    return slerp_chunks(array_reader([v0, v1_X]), v0.shape, v0.dtype, t=t, budget=budget)


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
