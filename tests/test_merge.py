"""Combining LoRA adapters: parity with peft's add_weighted_adapter, exactness, TIES/DARE math, errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_transformers
from jaxpeft.methods.lora import load_peft_adapter, save_peft_adapter
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import dotted, flatten_params, unflatten_params
from jaxpeft.merge import (COMBINATION_TYPES, combine_adapters, magnitude_prune, merge_full_models, prune_random,
                           ties)
from tests.hf_tiny import tiny_hf_config, tiny_hf_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]  # q_proj (40, 40), v_proj (40, 8): the SVD rank cap min(I, O) bites on v_proj
TOL = dict(atol=1e-5, rtol=0.0)  # fp32 SVD/matmul against torch on deltas of size ~0.5


def _deltas(tree) -> dict[str, np.ndarray]:
    """{module: s·A·B (I, O)} of a tree carrying LoRA leaves."""
    flat = flatten_params(tree)
    return {dotted(p[:-1]): np.asarray(flat[p[:-1] + ("lora_scale",)] * flat[p] @ flat[p[:-1] + ("lora_b",)])
            for p in flat if p[-1] == "lora_a"}


def _peft_deltas(pm, name: str) -> dict[str, np.ndarray]:
    out = {}
    for key, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[key] = mod.get_delta_weight(name).detach().numpy().T
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A PEFT model with random adapters ta (r4, alpha 8), tb (r4, rsLoRA alpha 6), tc (r3); the same in jaxpeft."""
    hf = tiny_hf_model(tiny_hf_config(layers=2), seed=1)
    model, params = from_transformers(hf)
    torch.manual_seed(0)
    kw = dict(target_modules=TARGETS, init_lora_weights=False)  # random non-zero A and B
    # PEFT names "a" ... would be substrings of the "lora_" prefix (PEFT warns): name them "ta" ...
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, **kw), adapter_name="ta")
    pm.add_adapter("tb", peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, **kw))
    pm.add_adapter("tc", peft.LoraConfig(r=3, lora_alpha=5, **kw))
    folder = tmp_path_factory.mktemp("adapters")
    pm.save_pretrained(folder)  # adapters other than "default" go to <folder>/<name>/
    trees = {n: load_peft_adapter(folder / f"t{n}", model, params)[1] for n in "abc"}
    return pm, model, params, trees


PARITY = [  # (combination_type, adapters, weights, extra kwargs)
    ("linear", "ab", [0.7, -0.4], {}),
    ("cat", "ac", [0.5, 0.5], {}),
    ("svd", "ab", [0.6, 0.3], {}),
    ("svd", "ac", [0.6, -0.3], {"svd_rank": 6}),
    ("svd", "ac", [0.6, 0.3], {"svd_rank": 8}),  # above Σ R = 7: a zero singular direction, as in PEFT
    ("ties", "ab", [0.7, 0.4], {"density": 0.6}),
    ("ties", "ab", [0.7, -0.4], {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", [0.7, 0.4], {"density": 0.5}),
    ("ties_svd", "ab", [0.7, 0.4], {"density": 0.5}),
    ("magnitude_prune_svd", "ac", [0.7, 0.4], {"density": 0.5, "svd_rank": 4}),
    ("dare_linear", "ab", [0.7, 0.4], {"density": 1.0}),  # density 1 keeps all: DARE = linear, deterministic
    ("dare_ties_svd", "ab", [0.7, 0.4], {"density": 1.0}),
    ("svd", "a", [0.6], {}),  # one adapter: PEFT falls back to linear
]


# Combinations of parts the default run checks alone (ties + svd, magnitude prune + svd, svd at a second rank,
# ties by sign frequency, which test_ties_and_magnitude_prune_match_peft_merge_utils checks against PEFT's
# merge utils): ~15-40 s of CPU each through PEFT's add_weighted_adapter, so slow.
SLOW_PARITY = {3, 6, 8, 9}


@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.slow(reason="a combination: see SLOW_PARITY"))
                               if i in SLOW_PARITY else i for i in range(len(PARITY))],
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(PARITY)])
def test_peft_semantics_match_add_weighted_adapter(setup, i):
    pm, _, _, trees = setup
    kind, names, weights, kw = PARITY[i]
    merged_name = f"merged{i}"
    pm.add_weighted_adapter([f"t{n}" for n in names], weights, merged_name, combination_type=kind, **kw)
    ours, cfg = combine_adapters([trees[n] for n in names], weights, combination_type=kind, semantics="peft", **kw)
    want, got = _peft_deltas(pm, merged_name), _deltas(ours)
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], **TOL, err_msg=name)
    assert all(cfg.scale_for(n) == 1.0 for n in got)  # PEFT's merged adapter has lora_alpha = r


def test_peft_linear_has_cross_terms_exact_does_not(setup):
    _, _, _, trees = setup
    ins = [trees["a"], trees["b"]]
    want = {k: 0.5 * _deltas(trees["a"])[k] + 0.5 * _deltas(trees["b"])[k] for k in _deltas(trees["a"])}
    peft_lin = _deltas(combine_adapters(ins, [0.5, 0.5], combination_type="linear", semantics="peft")[0])
    exact_lin = _deltas(combine_adapters(ins, [0.5, 0.5], combination_type="linear")[0])
    for k in want:
        np.testing.assert_allclose(exact_lin[k], want[k], **TOL)
        assert np.abs(peft_lin[k] - want[k]).max() > 0.1 * np.abs(want[k]).max()  # peft#3004


@pytest.mark.parametrize("semantics", ["peft", "exact"])
def test_cat_is_exact(setup, semantics):
    _, _, _, trees = setup
    w = [0.8, -1.3]
    out, cfg = combine_adapters([trees["a"], trees["c"]], w, combination_type="cat", semantics=semantics)
    da, dc, got = _deltas(trees["a"]), _deltas(trees["c"]), _deltas(out)
    for k in da:
        np.testing.assert_allclose(got[k], w[0] * da[k] + w[1] * dc[k], **TOL)
    assert cfg.r == 7 and cfg.rank_pattern == {}


@pytest.mark.parametrize("semantics,svd_rank", [("exact", None), ("exact", 7), ("peft", 7), ("exact", 30)])
def test_svd_at_sufficient_rank_is_exact(setup, semantics, svd_rank):
    _, _, _, trees = setup
    w = [0.6, 0.9]
    out, cfg = combine_adapters([trees["a"], trees["c"]], w, combination_type="svd", semantics=semantics,
                                svd_rank=svd_rank)
    da, dc, got = _deltas(trees["a"]), _deltas(trees["c"]), _deltas(out)
    for k in da:
        np.testing.assert_allclose(got[k], w[0] * da[k] + w[1] * dc[k], **TOL)
    # rank 30 is capped at min(I, O): q_proj (40, 40) gets 30, v_proj (40, 8) gets 8 (a rank_pattern entry)
    assert cfg.r == (svd_rank or 7) and all(v == 8 for v in cfg.rank_pattern.values())


def test_svd_clamp_clips_factors_at_the_quantile(setup):
    """PEFT's svd_clamp: both factors clipped to ± the q-quantile of their signed entries. Not compared with PEFT:
    that quantile depends on each singular pair's arbitrary sign, which torch and XLA choose differently."""
    _, _, _, trees = setup
    kw = dict(combination_type="svd", semantics="peft", svd_rank=3)
    free = flatten_params(combine_adapters([trees["a"], trees["b"]], [0.6, 0.3], **kw)[0])
    clamped = flatten_params(combine_adapters([trees["a"], trees["b"]], [0.6, 0.3], svd_clamp=0.8, **kw)[0])
    for p in (p for p in free if p[-1] == "lora_a"):
        a, b = np.asarray(free[p]), np.asarray(free[p[:-1] + ("lora_b",)])
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.8)
        np.testing.assert_allclose(clamped[p], np.clip(a, -hi, hi), atol=1e-6)
        np.testing.assert_allclose(clamped[p[:-1] + ("lora_b",)], np.clip(b, -hi, hi), atol=1e-6)


def test_saved_combination_loads_in_peft(setup, tmp_path):
    """The returned LoraConfig (with rank_pattern for capped modules) describes the tree: PEFT rebuilds it."""
    pm, _, params, trees = setup
    out, cfg = combine_adapters([trees["a"], trees["b"]], [0.5, 0.5], combination_type="ties", density=0.5,
                                svd_rank=12)
    assert cfg.rank_pattern  # v_proj is capped at 8
    save_peft_adapter(tmp_path / "m", out, cfg, base_model_name_or_path="tiny")
    pm.load_adapter(str(tmp_path / "m"), adapter_name="loaded_ties")
    want, got = _deltas(out), _peft_deltas(pm, "loaded_ties")
    for k in want:
        np.testing.assert_allclose(got[k], want[k], **TOL)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
@pytest.mark.parametrize("semantics", ["peft", "exact"])
def test_dare_combinations_are_seeded(setup, kind, semantics):
    _, _, _, trees = setup
    run = lambda seed: _deltas(combine_adapters([trees["a"], trees["b"]], [0.5, 0.5], combination_type=kind,  # noqa
                                                semantics=semantics, density=0.5, seed=seed)[0])
    one, same, other = run(0), run(0), run(1)
    for k in one:
        assert np.isfinite(one[k]).all()
        np.testing.assert_array_equal(one[k], same[k])
        assert not np.allclose(one[k], other[k])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_density_and_rescales(density):
    x = jax.random.normal(jax.random.key(3), (256, 256)) + 5.0  # no zeros, so kept entries are the non-zeros
    out = np.asarray(prune_random(jax.random.key(7), x, density, rescale=True))
    kept = out != 0
    n = x.size
    assert abs(kept.mean() - density) < 3 * math.sqrt(density * (1 - density) / n)
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / density, rtol=1e-6)


def test_ties_trim_elect_disjoint_mean_by_hand():
    t1, t2 = jnp.array([3.0, -1.0, 0.5, 2.0]), jnp.array([-2.0, 4.0, 1.0, -0.1])
    # density 0.5 keeps 2 of 4: t1 -> [3, 0, 0, 2], t2 -> [-2, 4, 0, 0]; votes [1, 4, 0, 2] all elect +
    np.testing.assert_allclose(ties([t1, t2], [1.0, 1.0], 0.5), [3.0, 4.0, 0.0, 2.0])
    ts = [jnp.array([1.0, 2.0, -1.0]), jnp.array([1.0, -3.0, -1.0]), jnp.array([-5.0, 2.0, 4.0])]
    w = [1.0, 0.5, 2.0]
    # total: Σt = [-3, 1, 2] elects [-, +, +]; weighted t = [1, 2, -1], [.5, -1.5, -.5], [-10, 4, 8]
    np.testing.assert_allclose(ties(ts, w, 1.0, "total"), [-10.0, 3.0, 8.0])
    # frequency: Σsign = [1, 1, -1] elects [+, +, -]
    np.testing.assert_allclose(ties(ts, w, 1.0, "frequency"), [0.75, 3.0, -0.75])


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_and_magnitude_prune_match_peft_merge_utils(method):
    from peft.utils import merge_utils

    rng = np.random.default_rng(0)
    ts = [rng.standard_normal((7, 5)).astype(np.float32) for _ in range(3)]
    w = [0.5, -1.2, 0.8]
    want = merge_utils.ties([torch.tensor(t) for t in ts], torch.tensor(w), 0.4, method).numpy()
    np.testing.assert_allclose(ties([jnp.asarray(t) for t in ts], w, 0.4, method), want, atol=1e-6)
    want = merge_utils.magnitude_prune([torch.tensor(t) for t in ts], torch.tensor(w), 0.4).numpy()
    np.testing.assert_allclose(magnitude_prune(ts, w, 0.4), want, atol=1e-6)


def test_merge_full_models():
    base = {"l": {"kernel": jnp.ones((3, 2)), "step": jnp.array(4)}}
    fts = [{"l": {"kernel": jnp.ones((3, 2)) + d, "step": jnp.array(9)}} for d in (1.0, -3.0)]
    out = merge_full_models(base, fts, [0.5, 0.25])
    np.testing.assert_allclose(out["l"]["kernel"], 1.0 + 0.5 - 0.75)
    assert int(out["l"]["step"]) == 4  # integer leaves come from the base
    out = merge_full_models(base, fts, [1.0, 1.0], "ties", density=1.0)
    np.testing.assert_allclose(out["l"]["kernel"], 1.0 - 3.0)  # total elects -, only the -3 task is kept
    with pytest.raises(ConfigError, match=r"(?s)but 1 weights.*model 1: l\.kernel has shape \(2, 2\)"):
        merge_full_models(base, [fts[0], {"l": {"kernel": jnp.ones((2, 2)), "step": jnp.array(1)}}], [1.0])


def _drop_lora(tree, module: str):
    """The tree without the LoRA leaves of every `module` (e.g. q_proj)."""
    return unflatten_params({p: v for p, v in flatten_params(tree).items()
                             if not (p[-2] == module and p[-1].startswith("lora_"))})


def test_errors_list_every_offender(setup):
    _, _, params, trees = setup
    a, b, c = trees["a"], trees["b"], trees["c"]
    with pytest.raises(ConfigError, match=r"(?s)2 adapters but 3 weights.*density=1\.5.*svd_rank=0"):
        combine_adapters([a, b], [1, 1, 1], combination_type="ties_svd", density=1.5, svd_rank=0)
    with pytest.raises(ConfigError, match="density=0"):
        combine_adapters([a, b], [1, 1], combination_type="dare_linear", density=0.0)
    with pytest.raises(ConfigError, match="density=None"):
        combine_adapters([a, b], [1, 1], combination_type="magnitude_prune")
    with pytest.raises(ConfigError, match=r"'mean' is unknown; use one of \['linear', 'cat', 'svd'"):
        combine_adapters([a, b], [1, 1], combination_type="mean")
    assert len(COMBINATION_TYPES) == 11
    with pytest.raises(ConfigError, match=r"(?s)adapter 1: does not adapt \['model\.layers\.0\.self_attn\.q_proj', "
                                          r"'model\.layers\.1\.self_attn\.q_proj'\]"):
        combine_adapters([a, _drop_lora(b, "q_proj")], [1, 1], combination_type="cat")
    odd = flatten_params(b)
    for layer in ("0", "1"):
        path = ("model", "layers", layer, "self_attn", "v_proj")
        odd[path + ("lora_a",)] = jnp.zeros((41, 4))
        odd[path + ("kernel",)] = jnp.zeros((41, 8))
    with pytest.raises(ConfigError, match=r"(?s)different base shapes.*layers\.0\.self_attn\.v_proj.*"
                                          r"layers\.1\.self_attn\.v_proj"):
        combine_adapters([a, unflatten_params(odd)], [1, 1], combination_type="svd")
    with pytest.raises(ConfigError, match=r"same rank at each module"):
        combine_adapters([a, c], [1, 1], combination_type="linear", semantics="peft")
    with pytest.raises(ConfigError, match="no LoRA leaves"):
        combine_adapters([a, params], [1, 1], combination_type="cat")
    dora = flatten_params(a)
    dora[("model", "layers", "0", "self_attn", "q_proj", "lora_magnitude")] = jnp.ones((40,))
    with pytest.raises(ConfigError, match="DoRA"):
        combine_adapters([unflatten_params(dora), b], [1, 1], combination_type="svd")


def test_adapter_only_trees_combine_like_full_trees(setup):
    from jaxpeft.methods import get_method

    _, _, _, trees = setup
    lora = get_method("lora")
    cfg = dataclasses.replace(lora.config_cls(), target_modules=tuple(TARGETS))
    only = [lora.split(trees[n], cfg)[0] for n in "ab"]
    full_out, _ = combine_adapters([trees["a"], trees["b"]], [0.3, 0.7], combination_type="svd")
    only_out, _ = combine_adapters(only, [0.3, 0.7], combination_type="svd")
    assert {p[-1] for p in flatten_params(only_out)} == {"lora_a", "lora_b", "lora_scale"}
    only_deltas = _deltas(only_out)
    for k, v in _deltas(full_out).items():
        np.testing.assert_array_equal(only_deltas[k], v)
