"""LoRA config and targeting rules, and their errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.core.targets import match_targets
from jaxpeft.core.tree import dotted, flatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.train import optim
from jaxpeft.train.loop import TrainConfig, Trainer
from tests.hf_tiny import VOCAB

pytest.importorskip("torch")
LORA = get_method("lora")


@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base(seed=7)[1:]


def _adapted_modules(params):
    return sorted(dotted(p[:-1]) for p in flatten_params(params) if p[-1] == "lora_a")


def test_target_rules_follow_peft(base):
    _, params = base
    names = lambda t, **kw: [dotted(p) for p in match_targets(params, t, **kw)]  # noqa: E731
    assert names(("q_proj",)) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert len(names("all-linear")) == 3 * 7  # the output head is not "all-linear"
    assert names(r"model\.layers\.1\..*_proj", layers_to_transform=None) == [
        f"model.layers.1.{m}" for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                        "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert names(("v_proj",), layers_to_transform=[0, 2]) == ["model.layers.0.self_attn.v_proj",
                                                              "model.layers.2.self_attn.v_proj"]
    assert names(("lm_head",)) == ["lm_head"]


def test_rank_and_alpha_patterns_and_rslora(base):
    _, params = base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "down_proj"), rank_pattern={"down_proj": 2},
                     alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3.0}, use_rslora=True)
    flat = flatten_params(LORA.init(jax.random.PRNGKey(0), params, cfg))
    assert flat[("model", "layers", "1", "mlp", "down_proj", "lora_a")].shape == (52, 2)
    assert flat[("model", "layers", "1", "self_attn", "q_proj", "lora_b")].shape == (4, 40)
    assert float(flat[("model", "layers", "0", "self_attn", "q_proj", "lora_scale")]) == pytest.approx(3.0 / 2)
    assert float(flat[("model", "layers", "1", "self_attn", "q_proj", "lora_scale")]) == pytest.approx(8.0 / 2)
    assert float(flat[("model", "layers", "1", "mlp", "down_proj", "lora_scale")]) == pytest.approx(8 / 2 ** 0.5)


def test_init_matches_peft_distributions(base):
    _, params = base
    flat = flatten_params(LORA.init(jax.random.PRNGKey(0), params, LoraConfig(r=8, target_modules="all-linear")))
    a = np.concatenate([np.ravel(v) for p, v in flat.items() if p[-1] == "lora_a" and p[-2] == "up_proj"])
    assert np.abs(a).max() <= 1 / np.sqrt(40) and np.abs(a).max() > 0.9 / np.sqrt(40)  # kaiming-uniform bound
    assert all(not np.any(v) for p, v in flat.items() if p[-1] == "lora_b")


def test_targets_that_match_nothing_list_what_exists(base):
    _, params = base
    with pytest.raises(ConfigError) as err:
        LORA.init(jax.random.PRNGKey(0), params, LoraConfig(target_modules=("query", "value")))
    for suffix in ("q_proj", "v_proj", "gate_proj", "lm_head"):
        assert suffix in str(err.value)
    with pytest.raises(ConfigError, match="does not compile"):
        LORA.init(jax.random.PRNGKey(0), params, LoraConfig(target_modules="model.(layers"))


def test_bad_ranks_are_refused(base):
    _, params = base
    with pytest.raises(ConfigError, match="at least 1"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match=r"k_proj: rank 9 > min\(40, 8\)"):
        LORA.init(jax.random.PRNGKey(0), params, LoraConfig(r=9, target_modules=("k_proj", "q_proj")))


def test_adding_lora_twice_is_refused(base):
    _, params = base
    once = LORA.init(jax.random.PRNGKey(0), params, LoraConfig())
    with pytest.raises(ConfigError, match="already carry LoRA"):
        LORA.init(jax.random.PRNGKey(0), once, LoraConfig())


def _losses(base, option, steps=12):
    import jax.numpy as jnp

    model, params = base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1 if option == "dropout" else 0)
    adapted = LORA.init(jax.random.PRNGKey(0), params, cfg)
    run_model = model.clone(dtype=jnp.bfloat16) if option == "bf16" else model.clone(remat=option == "remat")
    trainer = Trainer(run_model, adapted, LORA.labels(adapted, cfg),
                      optim_cfg=optim.OptimConfig(lr=1e-2, total_steps=12, warmup_steps=0),
                      train_cfg=TrainConfig(steps=12, batch_size=4), max_targets=24,
                      train_model=run_model.clone(deterministic=False, **LORA.model_kwargs(cfg)))
    ids = np.random.default_rng(0).integers(3, VOCAB, (4, 10)).astype(np.int32)
    batch = {"input_ids": ids, "loss_mask": np.pad(np.ones((4, 5), np.int32), ((0, 0), (5, 0))),
             "attention_mask": np.ones_like(ids)}
    losses = [trainer.train_step(batch)["loss"] for _ in range(steps)]
    # The adapter weights stay fp32 whatever the compute dtype.
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(trainer.state["params"]))
    return np.asarray(losses)


@pytest.fixture(scope="module")
def fp32_losses(base):
    """The reference curve the option tests compare with, trained once for the module."""
    return _losses(base, "fp32")


def test_remat_trains_exactly_like_no_remat(base, fp32_losses):
    np.testing.assert_allclose(_losses(base, "remat"), fp32_losses, rtol=1e-6)


@pytest.mark.parametrize("option", ["bf16", "dropout"])
def test_training_options_follow_the_fp32_curve(base, fp32_losses, option):
    reference, losses = fp32_losses, _losses(base, option)
    assert losses[-1] < losses[0] - 0.3
    # bf16 keeps ~3 significant digits; dropout perturbs each step: both stay near the fp32 curve.
    np.testing.assert_allclose(losses, reference, rtol=0.05)
