"""The contract every registered method keeps, run over the registry with per-method capabilities."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.core.tree import flatten_params
from jaxpeft.convert.adapterhub import SUPPORTED_MODEL_TYPES
from jaxpeft.core.errors import CheckpointError, ConfigError, UnsupportedModelError
from jaxpeft.methods import METHODS, get_method
from jaxpeft.methods import load_adapter
from jaxpeft.methods.bottleneck import AdaptersConfig
from jaxpeft.methods.full import FullConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.methods.prefix import PrefixConfig
from jaxpeft.methods.prompt import PromptConfig
from jaxpeft.train import optim
from jaxpeft.train.loop import TrainConfig, Trainer
from tests import tolerances
from tests.hf_tiny import FAMILY_CASES, VOCAB

pytest.importorskip("torch")

# Each registered method with the configs the battery runs (every registered method must appear).
CONFIGS = {
    "lora": [LoraConfig(r=3, lora_alpha=6),
             LoraConfig(r=2, lora_alpha=5, use_rslora=True, use_dora=True, target_modules="all-linear"),
             LoraConfig(r=4, target_modules=("gate_proj", "down_proj"), rank_pattern={"down_proj": 2},
                        alpha_pattern={"gate_proj": 3.0}, layers_to_transform=(0, 2),
                        modules_to_save=("lm_head",))],
    "full": [FullConfig()],
    "adapters": [AdaptersConfig(reduction_factor=8),
                 AdaptersConfig(adapter_type="pfeiffer", reduction_factor=4, activation="gelu_new", scaling=0.5,
                                leave_out=(1,), original_ln_before=False)],
    "ia3": [IA3Config(),
            IA3Config(target_modules="all-linear", feedforward_modules=r".*\.(o_proj|down_proj)")],
    "prefix": [PrefixConfig(num_virtual_tokens=3),
               PrefixConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=7)],
    "prompt": [PromptConfig(num_virtual_tokens=3),
               PromptConfig(num_virtual_tokens=5, init="vocab"),
               PromptConfig(num_virtual_tokens=4, init="text", init_ids=(7, 11, 13))],
}
# Prompt tuning's vocab and text inits train the same tree as its random init (prompt 0): each costs ~25 s of
# CPU across the battery, and each init is checked against PEFT in test_prefix_prompt; they run as slow.
SLOW_CASES = {("prompt", 1), ("prompt", 2)}
CASES = [pytest.param(name, i, marks=pytest.mark.slow(reason="another prompt init: see SLOW_CASES"))
         if (name, i) in SLOW_CASES else (name, i) for name in sorted(CONFIGS) for i in range(len(CONFIGS[name]))]


def config_for(model_config, name: str, i: int):
    """CONFIGS[name][i] in the family's own module names: Phi-3's fused gate_up_proj for gate_proj, each family's
    default targets for LoRA's and IA3's defaults, and no saved lm_head where the head is tied (there is none)."""
    from jaxpeft.models.families import FAMILIES, default_targets

    cfg = CONFIGS[name][i]
    if model_config.model_type == "llama":
        return cfg
    if getattr(model_config, "num_experts", 0) and isinstance(cfg, LoraConfig):
        return _moe_lora(model_config, cfg)
    names = {p.short for p in FAMILIES[model_config.model_type].linears}
    rename = lambda t: t if t in names else t.replace("gate_proj", "gate_up_proj")  # noqa: E731
    if isinstance(cfg, LoraConfig):
        targets = cfg.target_modules
        if targets == LoraConfig().target_modules:  # LoraConfig's defaults: the family's own
            targets = default_targets(model_config.model_type, "lora")["target_modules"]
        if not isinstance(targets, str):
            targets = tuple(dict.fromkeys(rename(t) for t in targets))
        saved = () if model_config.tie_word_embeddings else cfg.modules_to_save
        patterns = {rename(k): v for k, v in cfg.alpha_pattern.items()}
        return dataclasses.replace(cfg, target_modules=targets, modules_to_save=saved, alpha_pattern=patterns)
    if isinstance(cfg, IA3Config) and cfg == IA3Config():
        return IA3Config(**default_targets(model_config.model_type, "ia3"))
    return cfg


MOE_MLP = {"gate_proj": "mlp.experts.gate_up_proj", "up_proj": "mlp.experts.gate_up_proj",
           "down_proj": "mlp.experts.down_proj"}


def _moe_lora(model_config, cfg: LoraConfig) -> LoraConfig:
    """A LoRA case on an MoE family: MLP targets become the expert stacks (PEFT's target_parameters, sparse layers;
    on every layer, since the combination with layers_to_transform is refused: see
    test_layers_to_transform_with_target_parameters_is_refused) and DoRA on every linear names the linears, since
    DoRA on the router is refused (see test_dora_on_an_moe_router_is_refused_with_the_reason)."""

    dense_mlp = any(not model_config.is_sparse_layer(i) for i in range(model_config.num_hidden_layers))
    saved = () if model_config.tie_word_embeddings else cfg.modules_to_save
    if cfg.use_dora and cfg.target_modules == "all-linear":
        targets = ("q_proj", "k_proj", "v_proj", "o_proj") + (("gate_proj", "up_proj", "down_proj") if dense_mlp
                                                                 else ())
        return dataclasses.replace(cfg, target_modules=targets, modules_to_save=saved)
    if isinstance(cfg.target_modules, str) or not set(cfg.target_modules) & set(MOE_MLP):
        return dataclasses.replace(cfg, modules_to_save=saved)
    stacks = tuple(dict.fromkeys(MOE_MLP[t] for t in cfg.target_modules if t in MOE_MLP))
    short = lambda t: MOE_MLP[t].rsplit(".", 1)[1] if t in MOE_MLP else t  # noqa: E731
    return dataclasses.replace(cfg, target_modules=tuple(t for t in cfg.target_modules if t not in MOE_MLP),
                               target_parameters=stacks, modules_to_save=saved, layers_to_transform=None,
                               rank_pattern={short(k): v for k, v in cfg.rank_pattern.items()},
                               alpha_pattern={short(k): v for k, v in cfg.alpha_pattern.items()})


def test_every_registered_method_is_in_the_battery():
    assert set(METHODS) == set(CONFIGS)


# The battery runs on every family of the table: Llama in the default run, each other family's shared tiny
# model (hf_tiny.FAMILY_CASES) as slow, since the battery costs ~200 s a family on 2 CPU cores.
FAMILY_PARAMS = ["llama"] + [pytest.param(name, marks=pytest.mark.slow(reason="the battery on another family: ~200 s"))
                             for name in sorted(FAMILY_CASES)]


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def base(request, tiny_base, family_base):
    if request.param == "llama":
        return tiny_base(seed=5)[1:]
    return family_base(request.param)[1:]


IDS = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (2, 9)))


def _logits(model, params):
    return np.asarray(model.apply({"params": params}, IDS))


_TRAINED: dict = {}


def _trained(base, name, i, steps=3):
    """(method, config, adapted-at-init, trained) for a case; trained once per (family, case) and shared."""
    key = (base[0].config.model_type, name, i)
    if key not in _TRAINED:
        _TRAINED[key] = _train(base, name, i, steps)
    return _TRAINED[key]


def _train(base, name, i, steps):
    model, params = base
    method, cfg = get_method(name), config_for(model.config, name, i)
    adapted = method.init(jax.random.PRNGKey(i), params, cfg)
    trainer = Trainer(model, adapted, method.labels(adapted, cfg),
                      optim_cfg=optim.OptimConfig(lr=3e-2, total_steps=steps, warmup_steps=0),
                      train_cfg=TrainConfig(steps=steps, batch_size=2), max_targets=16)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        ids = rng.integers(3, VOCAB, (2, 9)).astype(np.int32)
        trainer.train_step({"input_ids": ids, "loss_mask": np.ones_like(ids), "attention_mask": np.ones_like(ids)})
    return method, cfg, adapted, trainer.params()


@pytest.mark.parametrize("name,i", CASES)
def test_identity_at_init(base, name, i):
    model, params = base
    method, cfg = get_method(name), config_for(model.config, name, i)
    if not method.identity_at_init:
        pytest.skip(f"{name} cannot equal the base at init")
    adapted = method.init(jax.random.PRNGKey(0), params, cfg)
    chex.assert_trees_all_close(_logits(model, adapted), _logits(model, params), **tolerances.EXACT)


@pytest.mark.parametrize("name,i", CASES)
def test_training_changes_only_trainable_leaves_and_split_combine_round_trips(base, name, i):
    method, cfg, adapted, trained = _trained(base, name, i)
    labels = flatten_params(method.labels(trained, cfg))
    before, after = flatten_params(adapted), flatten_params(trained)
    changed = {p for p in after if not np.array_equal(before[p], after[p])}
    assert changed, "a few optimizer steps change the adapter"
    assert all(labels[p] == "trainable" for p in changed)
    adapter, rest = method.split(trained, cfg)
    assert not set(flatten_params(adapter)) & set(flatten_params(rest))
    chex.assert_trees_all_equal(method.combine(adapter, rest), trained)


@pytest.mark.parametrize("name,i", CASES)
def test_disabled_equals_base(base, name, i):
    """Dropping the added leaves gives the base model back (trained copies of base weights, as with
    modules_to_save or full fine-tuning, replace the base: disabling those means using the base tree)."""
    model, params = base
    method, cfg, _, trained = _trained(base, name, i)
    _, rest = method.split(trained, cfg)
    disabled = {p: v for p, v in flatten_params(params).items()}
    disabled.update({p: v for p, v in flatten_params(rest).items()})
    from jaxpeft.core.tree import unflatten_params

    assert not np.allclose(_logits(model, trained), _logits(model, params), atol=1e-6)
    chex.assert_trees_all_close(_logits(model, unflatten_params(disabled)), _logits(model, params),
                                **tolerances.EXACT)


@pytest.mark.parametrize("name,i", CASES)
def test_merge_equals_unmerged_and_unmerge_restores_base(base, name, i):
    model, params = base
    method, cfg, _, trained = _trained(base, name, i)
    if not method.mergeable:
        pytest.skip(f"{name} does not merge")
    merged = method.merge(trained, cfg)
    assert not any(p[-1].startswith("lora_") for p in flatten_params(merged))
    chex.assert_trees_all_close(_logits(model, merged), _logits(model, trained), **tolerances.LOGITS_FP32)
    adapter, _ = method.split(trained, cfg)
    if getattr(cfg, "use_dora", False):
        with pytest.raises(Exception, match="DoRA"):
            method.unmerge(merged, adapter, cfg)
        return
    restored = method.unmerge(merged, adapter, cfg)
    base_part = {p: v for p, v in flatten_params(restored).items() if p in flatten_params(params)}
    saved = [m for m in getattr(cfg, "modules_to_save", ())]
    expect = {p: v for p, v in flatten_params(params).items() if not (saved and p[0] in saved)}
    chex.assert_trees_all_close({"/".join(p): base_part[p] for p in expect},
                                {"/".join(p): v for p, v in expect.items()}, atol=1e-6)


@pytest.mark.parametrize("name,i", CASES)
def test_adapter_only_save_and_load(base, name, i, tmp_path):
    model, params = base
    method, cfg, _, trained = _trained(base, name, i)
    if name == "adapters" and model.config.model_type not in SUPPORTED_MODEL_TYPES:  # no AdapterHub folder here
        with pytest.raises(UnsupportedModelError, match=model.config.model_type):
            method.save(tmp_path / "a", trained, cfg, model_config=model.config, base_model_name_or_path="tiny")
        return
    method.save(tmp_path / "a", trained, cfg, model_config=model.config, base_model_name_or_path="tiny")
    if method.artifact_name == "adapter":  # any adapter folder is recognised and read by the generic loader
        found, _, loaded, _ = load_adapter(tmp_path / "a", model, params)
        assert found is method
    else:
        _, loaded, _ = method.load(tmp_path / "a", model, params)
    chex.assert_trees_all_close(_logits(model, loaded), _logits(model, trained), **tolerances.LOGITS_FP32)


def test_a_folder_that_is_no_adapter_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(tmp_path / "x", None, {})
    (tmp_path / "x" / "adapter_config.json").write_text('{"peft_type": "LOHA"}')
    with pytest.raises(ConfigError, match="LOHA"):
        load_adapter(tmp_path / "x", None, {})


def test_merged_lora_exports_to_transformers_with_the_adapted_logits(base, tmp_path):
    import transformers

    from jaxpeft import save_hf_folder
    from tests.hf_tiny import hf_logits

    model, params = base
    method, cfg, _, trained = _trained(base, "lora", 1)  # DoRA + rsLoRA on every linear layer
    out = save_hf_folder(tmp_path / "merged", method.merge(trained, cfg), model.config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    chex.assert_trees_all_close(hf_logits(hf, np.asarray(IDS)), _logits(model, trained), **tolerances.LOGITS_FP32)


def test_dora_on_an_moe_router_is_refused_with_the_reason(base):
    """PEFT 0.21.2 adapts the MoE router (a bare parameter in transformers 5.24) only as a target parameter, which
    has no DoRA: DoRA on it, by 'all-linear' or by name, is refused; DoRA on the other linears is not."""
    model, params = base
    if not getattr(model.config, "num_experts", 0):
        pytest.skip("no MoE router in this family")
    lora = get_method("lora")
    for targets, hint in [("all-linear", "name the linears instead"), (("q_proj", "gate"), "leave the router")]:
        with pytest.raises(ConfigError, match=f"use_dora on the MoE router.*no DoRA.*{hint}"):
            lora.init(jax.random.PRNGKey(0), params, LoraConfig(r=2, use_dora=True, target_modules=targets))
    adapted = lora.init(jax.random.PRNGKey(0), params, LoraConfig(r=2, use_dora=True, target_modules=("q_proj",)))
    assert any(p[-1] == "lora_magnitude" for p in flatten_params(adapted))


@pytest.mark.parametrize("stacks", [("mlp.experts.gate_up_proj",), ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")])
def test_layers_to_transform_with_target_parameters_is_refused(stacks):
    # PEFT 0.21.2 applies layers_to_transform to target_modules only, so it could not rebuild such an adapter.
    with pytest.raises(ConfigError, match="layers_to_transform with target_parameters: PEFT 0.21.2 applies"):
        LoraConfig(target_parameters=stacks, layers_to_transform=(0, 2))
