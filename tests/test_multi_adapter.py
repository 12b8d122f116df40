"""Many adapters on one base: held and switched without recompiling, summed like PEFT's list set_adapter,
one adapter per row in a batch (forward and greedy generation), and merge_and_unload."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.methods.lora import save_peft_adapter
from jaxpeft.core import partition
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.merge import merge_and_unload
from jaxpeft.methods.base import Method
from jaxpeft.methods.lora import Lora, LoraConfig
from jaxpeft.models.generate import generate
from jaxpeft.multi import BASE, AdapterRegistry, per_example_logits, stack, stack_adapters, sum_adapters
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits, tiny_hf_config, tiny_hf_model

torch = pytest.importorskip("torch")
LORA = Lora()
CLOSE = dict(atol=1e-5, rtol=0.0)  # the same fp32 maths in another order (concatenated or batched factors)
CONFIGS = {  # a and c have equal shapes (switching between them must not recompile); b differs in rank and targets
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")),
    "c": LoraConfig(r=4, lora_alpha=6, target_modules=("q_proj", "v_proj")),
    "b": LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "k_proj", "o_proj", "down_proj")),
}


def _adapted(params, config, seed):
    """Lora().init with a random, clearly non-zero B, so every adapter changes the logits."""
    tree = LORA.init(jax.random.key(seed), params, config)
    flat = flatten_params(tree)
    for i, p in enumerate(sorted(p for p in flat if p[-1] == "lora_b")):
        flat[p] = 0.5 * jax.random.normal(jax.random.key(1000 * seed + i), flat[p].shape)
    return unflatten_params(flat)


@pytest.fixture(scope="module")
def setup(tiny_base):
    hf_config = tiny_hf_config(layers=2)
    _, model, base = tiny_base(seed=3, layers=2)  # the model of tiny_hf_model(hf_config, seed=3)
    full = {n: _adapted(base, cfg, seed) for seed, (n, cfg) in enumerate(CONFIGS.items(), 1)}
    adapters = {n: LORA.split(full[n], CONFIGS[n])[0] for n in full}
    reg = AdapterRegistry(model, base)
    for n in ("a", "c", "b"):
        reg.add(n, full[n], CONFIGS[n])
    return hf_config, model, base, full, adapters, reg


def _apply(model, params, ids, mask=None):
    return model.apply({"params": params}, jnp.asarray(ids),
                       attention_mask_BxS=None if mask is None else jnp.asarray(mask))


def _ids(seed, shape):
    return np.random.default_rng(seed).integers(3, VOCAB, shape).astype(np.int32)


def test_two_active_adapters_add_their_deltas_as_in_peft(setup, tmp_path):
    hf_config, model, _, full, adapters, reg = setup
    ids = _ids(0, (2, 9))
    reg.set_adapter(["a", "b"])
    got = np.asarray(reg.logits(ids))
    # W + ΔW_a + ΔW_b, merged by hand: merge a, then merge b into the result.
    merged = LORA.merge(partition.combine(LORA.merge(full["a"]), adapters["b"]))
    np.testing.assert_allclose(got, np.asarray(_apply(model, merged, ids)), **CLOSE)
    for one in ("a", "b"):  # each alone is something else, so the sum is not one of them
        assert np.abs(got - np.asarray(_apply(model, full[one], ids))).max() > 1e-2
    # The real library: PEFT's list set_adapter on the same two adapters.
    import peft

    for n in ("a", "b"):
        save_peft_adapter(tmp_path / n, full[n], CONFIGS[n], base_model_name_or_path="tiny")
    pm = peft.PeftModel.from_pretrained(tiny_hf_model(hf_config, seed=3), str(tmp_path / "a"), adapter_name="ta")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="tb")
    pm.base_model.set_adapter(["ta", "tb"])
    np.testing.assert_allclose(got, hf_logits(pm.eval(), ids), **tolerances.LOGITS_FP32)


def test_switching_between_equal_shapes_does_not_recompile(setup):
    _, model, base, full, _, _ = setup
    reg = AdapterRegistry(model, base)
    for n in ("a", "c", "b"):
        reg.add(n, full[n], CONFIGS[n])
    ids = _ids(1, (3, 7))
    outs = {}
    for n in ("a", "c", "a", "c"):
        reg.set_adapter(n)
        outs[n] = np.asarray(reg.logits(ids))
        np.testing.assert_allclose(outs[n], np.asarray(_apply(model, full[n], ids)), **CLOSE)
    assert reg.traces == 1  # four switches, one compilation
    assert np.abs(outs["a"] - outs["c"]).max() > 1e-2
    reg.set_adapter("b")  # other ranks and targets: one more compilation, then cached as well
    reg.logits(ids)
    reg.set_adapter("a")
    reg.logits(ids)
    assert reg.traces == 2
    reg.disable_adapters()
    np.testing.assert_allclose(np.asarray(reg.logits(ids)), np.asarray(_apply(model, base, ids)), **CLOSE)
    assert reg.active == ()


def test_registry_bookkeeping_and_errors(setup):
    _, model, base, full, adapters, _ = setup
    reg = AdapterRegistry(model, base)
    reg.add("a", adapters["a"], CONFIGS["a"])  # adapter leaves alone are accepted as well as full trees
    reg.add("b", full["b"], CONFIGS["b"])
    with pytest.raises(ConfigError, match="already held"):
        reg.add("a", full["a"], CONFIGS["a"])
    with pytest.raises(ConfigError, match=r"no adapter named \['zz'\]"):
        reg.set_adapter(["a", "zz"])
    with pytest.raises(ConfigError, match="reserved"):
        reg.add(BASE, full["a"], CONFIGS["a"])
    with pytest.raises(ConfigError, match="already carry LoRA leaves"):
        AdapterRegistry(model, full["a"])
    reg.set_adapter(["a", "b"])
    reg.delete("a")
    assert reg.names == ("b",) and reg.active == ("b",)
    # An adapter made for another base (other widths) is refused with the modules named.
    wrong = flatten_params(adapters["a"])
    q = ("model", "layers", "1", "self_attn", "q_proj")
    wrong[q + ("lora_a",)] = jnp.zeros((24, 4))
    wrong[("model", "layers", "7", "mlp", "up_proj", "lora_a")] = jnp.zeros((40, 4))
    with pytest.raises(ConfigError, match=r"(?s)layers.1.self_attn.q_proj: lora_a has 24 inputs, the kernel 40"
                                          r".*layers.7.mlp.up_proj: no such linear module"):
        reg.add("wrong", unflatten_params(wrong), CONFIGS["a"])
    # DoRA's magnitude rescales the whole output: DoRA adapters cannot be summed.
    dora_cfg = dataclasses.replace(CONFIGS["c"], use_dora=True)
    reg.add("d", _adapted(base, dora_cfg, 5), dora_cfg)
    reg.set_adapter("d")  # alone it is fine
    with pytest.raises(ConfigError, match="DoRA"):
        reg.set_adapter(["b", "d"])
    assert reg.active == ("d",)  # a refused set_adapter changes nothing


def test_load_a_peft_folder_and_merge_and_unload(setup, tmp_path):
    _, model, base, full, _, _ = setup
    save_peft_adapter(tmp_path / "a", full["a"], CONFIGS["a"], base_model_name_or_path="tiny")
    reg = AdapterRegistry(model, base)
    cfg = reg.load("a", tmp_path / "a")
    reg.add("b", full["b"], CONFIGS["b"])
    assert cfg.r == 4
    ids = _ids(2, (2, 6))
    reg.set_adapter("a")
    want = np.asarray(_apply(model, full["a"], ids))
    np.testing.assert_allclose(np.asarray(reg.logits(ids)), want, **CLOSE)
    merged = reg.merge_and_unload()
    assert not any(p[-1].startswith("lora_") for p in flatten_params(merged))
    np.testing.assert_allclose(np.asarray(_apply(model, merged, ids)), want, **tolerances.LOGITS_FP32)
    reg.set_adapter(["a", "b"])
    np.testing.assert_allclose(np.asarray(_apply(model, reg.merge_and_unload(), ids)),
                               np.asarray(reg.logits(ids)), **tolerances.LOGITS_FP32)
    # The generic entry point goes through the method registry.
    np.testing.assert_allclose(np.asarray(_apply(model, merge_and_unload(full["b"], "lora", CONFIGS["b"]), ids)),
                               np.asarray(_apply(model, full["b"], ids)), **tolerances.LOGITS_FP32)
    with pytest.raises(ConfigError, match="full cannot be merged"):
        merge_and_unload(base, "full")

    class Leaky(Method):  # a method whose merge forgets to drop its leaves
        name, mergeable = "leaky", True

        def merge(self, params, config):
            return dict(params)

        def is_added(self, path, config):
            return path[-1].startswith("lora_")

    with pytest.raises(ConfigError, match="left adapter leaves behind"):
        merge_and_unload(full["a"], Leaky())


def test_stack_and_sum_pad_ranks_and_missing_modules(setup):
    _, _, _, _, adapters, _ = setup
    stacked = flatten_params(stack_adapters([adapters["a"], adapters["b"]]))
    q = ("model", "layers", "0", "self_attn", "q_proj")
    k = ("model", "layers", "0", "self_attn", "k_proj")
    assert stacked[q + ("lora_a",)].shape == (2, 40, 4) and stacked[q + ("lora_b",)].shape == (2, 4, 40)
    np.testing.assert_array_equal(stacked[q + ("lora_a",)][1, :, 2:], 0)  # b's rank 2 padded to 4
    np.testing.assert_array_equal(stacked[k + ("lora_b",)][0], 0)  # a has no k_proj: zeros
    summed = flatten_params(sum_adapters([adapters["a"], adapters["b"]], [0.5, -2.0]))
    fa, fb = flatten_params(adapters["a"]), flatten_params(adapters["b"])
    delta = lambda f, m: np.asarray(f[m + ("lora_scale",)] * f[m + ("lora_a",)] @ f[m + ("lora_b",)])  # noqa: E731
    np.testing.assert_allclose(delta(summed, q), 0.5 * delta(fa, q) - 2.0 * delta(fb, q), **CLOSE)
    np.testing.assert_allclose(delta(summed, k), -2.0 * delta(fb, k), **CLOSE)
    assert summed[q + ("lora_a",)].shape == (40, 6)


def test_per_example_logits_equal_each_adapter_alone(setup):
    _, model, base, full, adapters, _ = setup
    names = ["a", "b", None, "c", "a", BASE]
    ids = _ids(3, (len(names), 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding on some rows
    mask[3, :2] = 0
    stacked = stack({n: adapters[n] for n in ("a", "b", "c")})
    got = np.asarray(per_example_logits(model, base, stacked, names, ids, mask))
    for row, n in enumerate(names):
        params = full.get(n, base)
        want = np.asarray(_apply(model, params, ids[row:row + 1], mask[row:row + 1]))[0]
        np.testing.assert_allclose(got[row], want, **CLOSE, err_msg=f"row {row} ({n})")
    with pytest.raises(ConfigError, match=r"unknown adapters \['zz'\]"):
        stacked.ids(["a", "zz"])
    with pytest.raises(ConfigError, match="6 rows but 2 adapter names"):
        per_example_logits(model, base, stacked, ["a", "b"], ids, mask)
    dora_cfg = dataclasses.replace(CONFIGS["a"], use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        stack({"a": adapters["a"], "d": LORA.split(_adapted(base, dora_cfg, 7), dora_cfg)[0]})


def test_per_example_generation_equals_one_adapter_at_a_time(setup):
    _, model, base, full, _, reg = setup
    rng = np.random.default_rng(4)
    names = ["a", "b", "c", None, "b", "a"]
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (3, 9, 14, 5, 11, 7)]
    kw = dict(max_new_tokens=8, min_prompt_len=16)
    got = reg.per_example_generate(prompts, names, **kw)
    differs = 0
    for prompt, n, row in zip(prompts, names, got):
        alone = generate(model, full[n] if n else base, [prompt], **kw)[0]
        assert row == alone, n
        differs += n is not None and row != generate(model, base, [prompt], **kw)[0]
    assert differs >= 3  # the adapters change what is generated, so equality above is not trivial
    # Stop tokens cut each row on its own.
    stop = got[1][2]
    cut = reg.per_example_generate(prompts, names, stop_ids=[stop], **kw)
    for row, c in zip(got, cut):
        assert c == (row[: row.index(stop) + 1] if stop in row else row)
