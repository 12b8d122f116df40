"""jaxpeft.merge.kit's random methods against mergekit's sparsifiers (statistics at 1M entries), the density-1
identities of the task-vector family, and selection against a sort."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpeft.merge import kit
from jaxpeft.merge.ops import kth_largest_abs, prune_magnitude

METHODS = {  # name -> (sparsifier, consensus, default normalize, default rescale), as in kit_config.METHODS
    "task_arithmetic": (None, None, False, False), "ties": ("magnitude", "sum", True, False),
    "dare_linear": ("random", None, False, True), "dare_ties": ("random", "sum", False, True),
    "della": ("della_magprune", "sum", True, True), "della_linear": ("della_magprune", None, False, True),
}


def _merge(name, base, xs, weights, density, normalize=None, epsilon=0.15, seed=0):
    sp, cons, norm, resc = METHODS[name]
    n = len(weights)
    return np.asarray(kit.task_vector_merge(
        base, np.stack(xs), jax.random.key(seed), sparsifier=sp, consensus=cons, weights=tuple(weights),
        densities=(density,) * n, epsilons=(epsilon,) * n, normalize=norm if normalize is None else normalize,
        rescale=resc))


@pytest.mark.slow(reason="seven compilations of the task-vector merge, ~13 s on this shared machine")
def test_density_one_identities():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(37, 23)).astype(np.float32)
    xs = [base + s * rng.normal(size=base.shape).astype(np.float32) for s in (0.01, 0.03, 0.05)]
    w = (0.5, 0.3, 0.4)
    ta = _merge("task_arithmetic", base, xs, w, 1.0)
    np.testing.assert_array_equal(_merge("dare_linear", base, xs, w, 1.0), ta)
    np.testing.assert_array_equal(_merge("della_linear", base, xs, w, 1.0), ta)
    np.testing.assert_array_equal(_merge("dare_ties", base, xs, w, 1.0), _merge("ties", base, xs, w, 1.0,
                                                                                 normalize=False))
    np.testing.assert_array_equal(_merge("della", base, xs, w, 1.0), _merge("ties", base, xs, w, 1.0))
    assert not np.allclose(_merge("ties", base, xs, w, 1.0), ta)  # the identities are not all trivial


@pytest.mark.parametrize("name,density", [
    ("dare_linear", 0.3),
    pytest.param("della_linear", 0.4, marks=pytest.mark.slow(reason="two 1M-entry argsorts per side, ~8 s"))])
def test_random_methods_match_mergekit_statistics(name, density):
    """Kept fraction (overall, and in the top and bottom halves by magnitude) and the L1 rescale factor within
    1 % of mergekit's at 1M entries."""
    torch = pytest.importorskip("torch")
    sparsify = pytest.importorskip("mergekit.sparsify")
    rng = np.random.default_rng(1)
    d = rng.normal(size=(1000, 1000)).astype(np.float32)
    torch.manual_seed(0)
    method = sparsify.SparsificationMethod.random if name == "dare_linear" else \
        sparsify.SparsificationMethod.della_magprune
    kw = {} if name == "dare_linear" else {"epsilon": 0.15}
    ref = sparsify.sparsify(torch.tensor(d), density, method, rescale_norm=sparsify.RescaleNorm.l1, **kw).numpy()
    ours = _merge(name, np.zeros_like(d), [d], (1.0,), density)
    big = np.abs(d) >= np.median(np.abs(d))
    for out_ref, out in ((ref, ours),):
        kept_ref, kept = out_ref != 0, out != 0
        for mask in (np.ones_like(big), big, ~big):
            assert abs(kept[mask].mean() / kept_ref[mask].mean() - 1) < 0.01
        factor_ref = np.median(out_ref[kept_ref] / d[kept_ref])
        factor = np.median(out[kept] / d[kept])
        assert abs(factor / factor_ref - 1) < 0.01
        assert abs(np.abs(out).sum() / np.abs(d).sum() - 1) < 1e-4  # L1 preserved


def test_selection_equals_sort():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(71, 29)).astype(np.float32)
    for k in (1, 7, 1000, x.size):
        assert float(kth_largest_abs(x, k)) == np.sort(np.abs(x).ravel())[::-1][k - 1]
    kept = np.asarray(prune_magnitude(x, 0.4))
    assert (kept != 0).sum() == int(0.4 * x.size)
    assert np.abs(kept[kept != 0]).min() > np.abs(x[kept == 0]).max()


def test_breadcrumbs_keeps_the_middle():
    torch = pytest.importorskip("torch")
    sparsify = pytest.importorskip("mergekit.sparsify")
    rng = np.random.default_rng(3)
    d = rng.normal(size=(53, 41)).astype(np.float32)
    ref = sparsify.magnitude_outliers(torch.tensor(d), 0.6, gamma=0.05).numpy()
    ours = np.asarray(kit.task_vector_merge(np.zeros_like(d), d[None], jax.random.key(0),
                                            sparsifier="magnitude_outliers", consensus=None, weights=(1.0,),
                                            densities=(0.6,), gammas=(0.05,), normalize=False, rescale=False))
    np.testing.assert_array_equal(ours, ref)


def test_exactly_k_kept_when_magnitudes_tie():
    """bf16 deltas tie at the cut by the thousand: mergekit keeps exactly max(1, int(density * n)); so do we."""
    rng = np.random.default_rng(4)
    d = rng.integers(-3, 4, size=(64, 48)).astype(np.float32)  # 7 distinct values
    out = np.asarray(kit.task_vector_merge(np.zeros_like(d), d[None], jax.random.key(0), sparsifier="magnitude",
                                           consensus=None, weights=(1.0,), densities=(0.37,), normalize=False,
                                           rescale=False))
    assert (out != 0).sum() == int(0.37 * d.size)
    assert np.abs(out[out != 0]).min() >= np.abs(d[out == 0]).max()


def _budgets_agree(fn):
    """fn(budget) at a budget of one row per chunk (and a ragged last chunk) and at the default (one chunk)."""
    whole = fn(kit.DEFAULT_CHUNK_BYTES)
    for budget in (4 * 23, 3 * 4 * 23):  # 1 row, then 2 rows per chunk (the largest power of two that fits 3)
        np.testing.assert_array_equal(fn(budget), whole)
    return whole


CHUNKED = {"ties": METHODS["ties"], "dare_ties": METHODS["dare_ties"], "della": METHODS["della"],
           "ties_rescaled": ("magnitude", "sum", True, True), "breadcrumbs_ties": ("magnitude_outliers", "sum", True, False)}


@pytest.mark.parametrize("name", [
    "ties", "dare_ties",
    pytest.param("della", marks=pytest.mark.slow(reason="three more compilations with DELLA's argsorts, ~4 s")),
    pytest.param("ties_rescaled", marks=pytest.mark.slow(reason="three more compilations, ~3 s")),
    pytest.param("breadcrumbs_ties", marks=pytest.mark.slow(reason="three more compilations, ~3 s"))])
def test_row_chunks_are_bit_identical(name):
    """The thresholds, the L1 rescale (row sums) and the random masks (a hash of the flat index) do not depend
    on the chunking: 37 one-row chunks, 19 two-row chunks and one chunk give the same bits. Equal bf16
    magnitudes tie at the cut across chunk boundaries (the exact-k tie break carries over chunks)."""
    rng = np.random.default_rng(5)
    base = (rng.integers(-8, 8, size=(37, 23)) * 0.25).astype(np.float32)  # exact deltas: magnitudes tie
    xs = [base + rng.integers(-3, 4, size=base.shape).astype(np.float32) * s for s in (0.0625, 0.125)]
    sp, cons, norm, resc = CHUNKED[name]

    def fn(budget):
        return np.asarray(kit.task_vector_merge(
            base, np.stack(xs), jax.random.key(7), sparsifier=sp, consensus=cons, weights=(0.5, 0.4),
            densities=(0.45, 0.6), gammas=(0.05, 0.02), epsilons=(0.1, 0.1), normalize=norm, rescale=resc,
            budget=budget))
    out = _budgets_agree(fn)
    assert not np.array_equal(out, base)


def test_row_chunks_slerp_and_linear():
    rng = np.random.default_rng(6)
    a, b = (rng.normal(size=(37, 23)).astype(np.float32) for _ in range(2))
    _budgets_agree(lambda budget: kit.slerp(a, b, t=0.3, budget=budget))
    _budgets_agree(lambda budget: kit.linear(np.stack([a, b]), weights=(0.3, 0.9), budget=budget))
