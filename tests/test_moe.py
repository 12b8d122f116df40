"""Mixture of experts (Mixtral, Qwen3-MoE) against transformers 5.24 and PEFT 0.21.2: logits with padding, the
router's load-balancing loss, greedy generation, HF folders both ways, grouped == dense-all-experts, and LoRA on
the experts in PEFT's `target_parameters` form (both ways, merged export).

The tiny models are `hf_tiny.FAMILY_CASES`' (conftest `family_base`): Mixtral 7 experts (width 28) top 3 with a window of 5,
Qwen3-MoE 6 experts top 3 without renormalisation, layer 1 dense, tied head; routers of std 1 so the batch reaches
every expert (checked).
"""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_pretrained, save_hf_folder
from jaxpeft.kernels import moe as moe_kernels
from jaxpeft.models.causal_lm import default_positions
from jaxpeft.models.generate import generate
from jaxpeft.train import router_loss
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_greedy_left_padded, hf_logits

torch = pytest.importorskip("torch")

NAMES = ["mixtral", "qwen3_moe"]
IDS = np.random.default_rng(0).integers(3, VOCAB, (3, 23))  # the same shape as tests/test_families.py's


def _padded():
    mask = np.ones(IDS.shape, np.int64)
    mask[0, :7] = 0  # left padded
    mask[1, 18:] = 0  # right padded
    return IDS, mask


def _hf_forward(hf, ids, mask, **kw):
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    with torch.no_grad():
        return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions), **kw)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_with_padding_and_every_expert_is_used(family_base, name):
    hf, model, params = family_base(name)
    ids, mask = _padded()
    out = _hf_forward(hf, ids, mask, output_router_logits=True)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask_BxS=jnp.asarray(mask)))
    real = mask.astype(bool)
    chex.assert_trees_all_close(ours[real], out.logits.numpy()[real], **tolerances.LOGITS_FP32)
    c = model.config
    assert len(out.router_logits) == len(c.sparse_layers()) >= 2
    for logits in out.router_logits:  # routing that uses every expert on the real tokens of the batch
        chosen = torch.topk(logits, c.num_experts_per_tok, dim=-1).indices.numpy()[real.reshape(-1)]
        assert set(chosen.reshape(-1).tolist()) == set(range(c.num_experts))
    if name == "qwen3_moe":
        assert not c.is_sparse_layer(1) and "experts" not in params["model"]["layers"]["1"]["mlp"]


@pytest.mark.parametrize("name", NAMES)
def test_router_aux_loss_matches_transformers_and_joins_the_train_loss(family_base, name):
    hf, model, params = family_base(name)
    ids, mask = _padded()
    theirs = float(_hf_forward(hf, ids, mask, output_router_logits=True).aux_loss)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    assert not router_loss.enabled(model) and float(router_loss.term(model, params, batch)) == 0.0
    ours = float(router_loss.aux_loss(model, params, batch))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    on = model.clone(config=dataclasses.replace(model.config, output_router_logits=True, router_aux_loss_coef=0.37))
    np.testing.assert_allclose(float(router_loss.term(on, params, batch)), 0.37 * theirs, atol=1e-5, rtol=0)


@pytest.mark.slow(reason="decode loops on both sides, ~25-35 s a family on 2 shared cores")
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(family_base, name):
    hf, model, params = family_base(name)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (4, 13)]  # 13 > the tiny window
    assert generate(model, params, prompts, max_new_tokens=12) == hf_greedy_left_padded(hf, prompts, 12)


@pytest.mark.parametrize("name", NAMES)
def test_hf_folders_both_ways(family_base, name, tmp_path):
    """transformers' save_pretrained writes one tensor per expert (legacy names); both are read and written so."""
    import transformers
    from safetensors import safe_open

    hf, model, params = family_base(name)
    hf.save_pretrained(tmp_path / "theirs")
    loaded_model, loaded, _ = from_pretrained(str(tmp_path / "theirs"), load_tokenizer=False)
    assert loaded_model.config == model.config
    chex.assert_trees_all_equal(loaded, params)
    out = save_hf_folder(tmp_path / "ours", params, model.config)
    with safe_open(str(out / "model.safetensors"), "np") as f, \
            safe_open(str(tmp_path / "theirs" / "model.safetensors"), "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                              experts_implementation="eager").eval()
    chex.assert_trees_all_close(hf_logits(again, IDS), hf_logits(hf, IDS), **tolerances.EXACT)


def _random_routing(n, h, i, e, k, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h)), jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((e, 2 * i, h)) / np.sqrt(h), jnp.float32)
    down = jnp.asarray(rng.standard_normal((e, h, i)) / np.sqrt(i), jnp.float32)
    experts = jnp.asarray(np.argsort(-rng.standard_normal((n, e)), axis=1)[:, :k], jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    return x, gate_up, down, experts, weights


@pytest.mark.parametrize("tile", [4, pytest.param(None, marks=pytest.mark.slow(reason="the default tile: another compile"))])
def test_grouped_equals_dense_all_experts_forward_and_gradients(tile):
    x, gate_up, down, experts, weights = _random_routing(37, 12, 7, 5, 2, seed=3)
    lopsided = experts.at[:30].set(jnp.asarray([0, 1]))  # most tokens on two experts, one expert unused

    def loss(fn, x, gu, d, w, routing):
        return jnp.sum(jnp.sin(fn(x, gu, d, routing, w, jnp.float32)))

    # One compile per side: the routing is an argument.
    dense = jax.jit(jax.value_and_grad(lambda *a: loss(moe_kernels.expert_mlp_dense, *a), argnums=(0, 1, 2, 3)))
    grouped = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda *b: moe_kernels.expert_mlp_grouped(*b, tile=tile), *a), argnums=(0, 1, 2, 3)))
    for routing in (experts, lopsided):
        chex.assert_trees_all_close(grouped(x, gate_up, down, weights, routing),
                                    dense(x, gate_up, down, weights, routing), **tolerances.GRAD_FP32)
    ragged = moe_kernels.expert_mlp_ragged(x, gate_up, down, experts, weights, jnp.float32)  # its maths (any CPU)
    chex.assert_trees_all_close(ragged, moe_kernels.expert_mlp_dense(x, gate_up, down, experts, weights, jnp.float32),
                                **tolerances.GRAD_FP32)


def test_the_gate_keeps_ragged_dot_off_the_cpu():
    ok, reason = moe_kernels.supports("ragged_dot", "cpu")
    assert not ok and "dense dot over every expert" in reason
    assert moe_kernels.supports("ragged_dot", "gpu")[0] and moe_kernels.default_implementation("gpu") == "ragged_dot"
    assert moe_kernels.default_implementation("cpu") == "grouped"
    with pytest.raises(NotImplementedError, match="ragged_dot"):
        moe_kernels.expert_mlp(*_random_routing(5, 4, 3, 3, 2, 0), jnp.float32,
                               implementation="ragged_dot" if jax.default_backend() != "gpu" else "nope")


@pytest.mark.slow(reason="two more model compiles; the kernels' equality above is the contract")
def test_the_model_computing_every_expert_densely_gives_the_same_logits(family_base):
    _, model, params = family_base("mixtral")
    dense = model.clone(config=dataclasses.replace(model.config, moe_implementation="dense"))
    chex.assert_trees_all_close(np.asarray(dense.apply({"params": params}, jnp.asarray(IDS))),
                                np.asarray(model.apply({"params": params}, jnp.asarray(IDS))), **tolerances.GRAD_FP32)


def test_config_errors_name_every_unsupported_field():
    from jaxpeft.core.errors import UnsupportedModelError
    from jaxpeft.models.mixtral import MixtralConfig

    hf = json.loads(json.dumps(dict(model_type="mixtral", vocab_size=11, hidden_size=8, intermediate_size=4,
                                    num_hidden_layers=1, num_attention_heads=2, num_local_experts=4,
                                    num_experts_per_tok=5, router_jitter_noise=0.1, frobnicate=1)))
    with pytest.raises(UnsupportedModelError) as e:
        MixtralConfig.from_hf(hf)
    for what in ("router_jitter_noise", "frobnicate", "num_experts_per_tok=5"):
        assert what in str(e.value)


# ------------------------------------------------------------------------------------------ LoRA on the experts

EXPERT_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")


def _peft_model(hf, folder_or_config):
    import copy

    import peft

    base = copy.deepcopy(hf)
    if isinstance(folder_or_config, peft.LoraConfig):
        return peft.get_peft_model(base, folder_or_config).eval()
    return peft.PeftModel.from_pretrained(base, str(folder_or_config)).eval()


@pytest.mark.slow(reason="3 train steps, PEFT load, merged export: ~100 s on 2 shared cores")
def test_an_expert_adapter_trained_here_loads_in_peft_and_merges_into_a_transformers_folder(family_base, tmp_path,
                                                                                              caplog):
    import transformers

    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train import optim
    from jaxpeft.train.loop import TrainConfig, Trainer

    lora = get_method("lora")
    hf, model, params = family_base("mixtral")
    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=("q_proj", "v_proj"), target_parameters=EXPERT_TARGETS)
    adapted = lora.init(jax.random.PRNGKey(0), params, cfg)
    stack = adapted["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]
    assert stack["lora_a"].shape == (7, 2, 40) and stack["lora_b"].shape == (7, 56, 2)
    trainer = Trainer(model, adapted, lora.labels(adapted, cfg),
                      optim_cfg=optim.OptimConfig(lr=5e-2, total_steps=3, warmup_steps=0),
                      train_cfg=TrainConfig(steps=3, batch_size=3), max_targets=40)
    ids, mask = _padded()
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
             "loss_mask": (mask * (np.arange(23) >= 10)).astype(np.int32)}
    for _ in range(3):
        trainer.train_step(batch)
    trained = trainer.params()
    b = np.asarray(trained["model"]["layers"]["1"]["mlp"]["experts"]["down_proj"]["lora_b"])
    assert np.abs(b).max() > 0 and not np.allclose(b[0], b[1])  # trained, and per expert
    ours = np.asarray(model.apply({"params": trained}, jnp.asarray(ids), attention_mask_BxS=jnp.asarray(mask)))
    folder = tmp_path / "adapter"
    lora.save(folder, trained, cfg, model_config=model.config, base_model_name_or_path="tiny-mixtral")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["target_parameters"] == list(EXPERT_TARGETS) and "gate" not in saved["target_modules"]
    with caplog.at_level("WARNING"):
        pm = _peft_model(hf, folder)
    assert "missing adapter keys" not in caplog.text.lower()
    real = mask.astype(bool)
    theirs = _hf_forward(pm, ids, mask).logits.numpy()
    chex.assert_trees_all_close(ours[real], theirs[real], **tolerances.LOGITS_FP32)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                                attention_mask_BxS=jnp.asarray(mask))))[real].max() > 1e-3

    # merge_and_unload, and the merged folder in transformers: the same logits as the adapted model.
    from jaxpeft.merge.unload import merge_and_unload, save_merged

    merged = merge_and_unload(trained, "lora", cfg)
    chex.assert_trees_all_close(np.asarray(model.apply({"params": merged}, jnp.asarray(ids),
                                                       attention_mask_BxS=jnp.asarray(mask)))[real], ours[real],
                                **tolerances.LOGITS_FP32)
    out = save_merged(tmp_path / "merged", trained, "lora", cfg, model.config, dtype="float32")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                              experts_implementation="eager").eval()
    chex.assert_trees_all_close(_hf_forward(again, ids, mask).logits.numpy()[real], ours[real],
                                **tolerances.LOGITS_FP32)


@pytest.mark.slow(reason="PEFT adapters of both families: ~17 s")
def test_peft_expert_adapter_loads_here_with_the_same_logits(family_base, tmp_path):
    import peft
    import torch

    from jaxpeft.methods.lora import load_peft_adapter

    for name in NAMES:
        hf, model, params = family_base(name)
        cfg = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["k_proj"], target_parameters=list(EXPERT_TARGETS),
                              init_lora_weights=False)
        pm = _peft_model(hf, cfg)
        with torch.no_grad():  # random factors: every expert's delta differs
            g = torch.Generator().manual_seed(5)
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(tmp_path / name))
        loaded_model, loaded, config = load_peft_adapter(tmp_path / name, model, params)
        assert sorted(config.target_parameters) == sorted(EXPERT_TARGETS)
        ids, mask = _padded()
        ours = np.asarray(loaded_model.apply({"params": loaded}, jnp.asarray(ids), attention_mask_BxS=jnp.asarray(mask)))
        theirs = _hf_forward(pm, ids, mask).logits.numpy()
        real = mask.astype(bool)
        chex.assert_trees_all_close(ours[real], theirs[real], **tolerances.LOGITS_FP32)


def test_target_parameters_refuse_dropout_and_dora_and_unknown_names(family_base):
    from jaxpeft.core.errors import ConfigError
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig

    for bad, why in ((dict(lora_dropout=0.1), "no adapter input to drop out"), (dict(use_dora=True), "DoRA")):
        with pytest.raises(ConfigError, match=why):
            LoraConfig(target_parameters=EXPERT_TARGETS, **bad)
    _, _, params = family_base("mixtral")
    with pytest.raises(ConfigError, match="mlp.experts.up_proj"):
        get_method("lora").init(jax.random.PRNGKey(0), params, LoraConfig(target_parameters=("mlp.experts.up_proj",)))


def test_the_lora_entry_point_refuses_target_parameters_with_dropout_or_dora(tmp_path):
    from tests.cli import run_entry

    for bad in ("--dropout=0.1", "--use_dora"):
        proc = run_entry("experiments.lora", "--target_parameters=mlp.experts.gate_up_proj", bad, "--steps=1",
                         f"--out={tmp_path / 'run'}", check=False)
        assert proc.returncode != 0 and "target_parameters" in proc.stderr, proc.stderr[-500:]


@pytest.mark.slow(reason="a whole LoRA run on a tiny Mixtral folder (tokenizer training, two compiles)")
def test_the_lora_entry_point_trains_expert_lora_on_a_mixtral_folder(tmp_path):
    from tests.cli import run_entry
    from tests.hf_tiny import tiny_model_folder

    model = tiny_model_folder(tmp_path / "mixtral", family="mixtral")
    out = tmp_path / "run"
    run_entry("experiments.lora", f"--model={model}", "--rank=2", "--steps=2", "--batch_size=2", "--eval_examples=2",
              "--targets=q_proj,v_proj", "--target_parameters=mlp.experts.gate_up_proj,mlp.experts.down_proj",
              f"--out={out}", "--noprogress")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def test_routers_stay_dense_in_4_bit_as_bitsandbytes_leaves_them(family_base):
    from jaxpeft.quant import quantize_params

    _, _, params = family_base("qwen3_moe")
    q = quantize_params(params)
    layer0, layer1 = q["model"]["layers"]["0"], q["model"]["layers"]["1"]
    assert "kernel" in layer0["mlp"]["gate"] and "qkernel" in layer0["self_attn"]["q_proj"]
    assert "qkernel" in layer1["mlp"]["down_proj"]  # the dense layer's MLP is an ordinary linear


@pytest.mark.slow(reason="an all-linear adapter through PEFT: ~20 s")
def test_an_all_linear_adapter_names_the_router_as_a_target_parameter_and_loads_in_peft(family_base, tmp_path,
                                                                                      caplog):
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig

    lora = get_method("lora")
    hf, model, params = family_base("mixtral")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    adapted = lora.init(jax.random.PRNGKey(1), params, cfg)
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.05 if getattr(p[-1], "key", None) == "lora_b" else v, adapted)
    lora.save(tmp_path / "a", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["mlp.gate.weight"] and "gate" not in saved["target_modules"]
    with caplog.at_level("WARNING"):
        pm = _peft_model(hf, tmp_path / "a")
    assert "missing adapter keys" not in caplog.text.lower()
    ids, mask = _padded()
    real = mask.astype(bool)
    ours = np.asarray(model.apply({"params": adapted}, jnp.asarray(ids), attention_mask_BxS=jnp.asarray(mask)))
    chex.assert_trees_all_close(ours[real], _hf_forward(pm, ids, mask).logits.numpy()[real], **tolerances.LOGITS_FP32)
