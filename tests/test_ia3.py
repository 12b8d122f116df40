"""IA3: the `linear` op's leaves against a hand computation, PEFT folders both ways against the real
`peft` (logits, merge_and_unload), unmerge, bad input, and a tiny experiments.ia3 run."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.core.errors import CheckpointError, ConfigError
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.models import ops
from tests.cli import run_entry, run_module as _run
from tests import tolerances
from tests.hf_tiny import (
    VOCAB,
    hf_logits,
    tiny_hf_config,
    tiny_hf_model,
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IA3 = get_method("ia3")
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))


@pytest.fixture(scope="module")
def base(tiny_base):
    hf, model, params = tiny_base(seed=3, layers=3, bias=True)  # q/k/v biases: IA3 scales k/v's bias
    return hf, model, params, hf_logits(hf, IDS)


def _logits(model, params) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))


def _randomised(params, cfg: IA3Config, seed: int = 0) -> dict:
    """IA3 params whose vectors are 1 + noise, so the output moves well off the base."""
    flat = flatten_params(IA3.init(jax.random.key(seed), params, cfg))
    rng = np.random.default_rng(seed)
    for path, v in flat.items():
        if path[-1] in ("ia3_in", "ia3_out"):
            flat[path] = jnp.asarray(1.0 + 0.8 * rng.standard_normal(v.shape), jnp.float32)
    return unflatten_params(flat)


def _peft_load(hf, folder, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder)).eval()
    return pm, [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]


# --- the op -----------------------------------------------------------------------------------------


def test_linear_leaves_against_a_hand_computation():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((5, 7)), rng.standard_normal(7)
    l_in, l_out = rng.standard_normal(5), rng.standard_normal(7)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out = ops.linear(f32(x), {"kernel": f32(w), "bias": f32(b), "ia3_out": f32(l_out)})
    np.testing.assert_allclose(out, (x @ w + b) * l_out, rtol=1e-5, atol=1e-5)  # PEFT scales the bias too
    out = ops.linear(f32(x), {"kernel": f32(w), "bias": f32(b), "ia3_in": f32(l_in)})
    np.testing.assert_allclose(out, (x * l_in) @ w + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\['ia3_l'\]"):  # an unknown leaf is still refused
        ops.linear(f32(x), {"kernel": f32(w), "ia3_l": f32(l_out)})


def test_init_adds_ones_beside_the_targeted_kernels(base):
    _, _, params, _ = base
    adapted = IA3.init(jax.random.key(0), params, IA3Config())
    added = {"/".join(p): (v.shape, float(v.min()), float(v.max())) for p, v in flatten_params(adapted).items()
             if p[-1].startswith("ia3")}
    expect = {}
    for i in range(3):
        expect[f"model/layers/{i}/self_attn/k_proj/ia3_out"] = ((8,), 1.0, 1.0)  # one kv head of 8
        expect[f"model/layers/{i}/self_attn/v_proj/ia3_out"] = ((8,), 1.0, 1.0)
        expect[f"model/layers/{i}/mlp/down_proj/ia3_in"] = ((52,), 1.0, 1.0)  # the intermediate width
    assert added == expect
    counts = IA3.param_counts(adapted, IA3Config())
    assert counts["trainable"] == counts["adapter"] == 3 * (8 + 8 + 52)


def test_quantized_base_forward_and_merge(tiny_base):
    from jaxpeft.quant import dequantize_params, quantize_params

    _, model, params = tiny_base(seed=4, layers=2)
    q = quantize_params(params)
    cfg = IA3Config()
    adapted = _randomised(q, cfg, seed=2)
    dense = _randomised(dequantize_params(q, jnp.float32), cfg, seed=2)  # the same vectors on the dense weights
    chex.assert_trees_all_close(_logits(model, adapted), _logits(model, dense), atol=1e-5)
    merged = IA3.merge(adapted, cfg)
    leaves = flatten_params(merged)
    assert not any(p[-1] in ("ia3_in", "ia3_out") for p in leaves)
    # Merged modules are dequantized (fp32); the others keep their 4-bit codes.
    assert leaves[("model", "layers", "1", "mlp", "down_proj", "kernel")].dtype == jnp.float32
    assert ("model", "layers", "1", "mlp", "up_proj", "qkernel") in leaves
    chex.assert_trees_all_close(_logits(model, merged), _logits(model, adapted), atol=1e-5)


# --- PEFT folders -----------------------------------------------------------------------------------

EXPORT_CASES = {
    "default": IA3Config(),
    "all_linear_regex_ff": IA3Config(target_modules="all-linear", feedforward_modules=r".*\.(o_proj|down_proj)"),
    # Layers 0 and 2 only: suffixes would also select layer 1, so the lists name modules in full.
    "layers": IA3Config(target_modules=r"model\.layers\.[02]\.(self_attn\.v_proj|mlp\.up_proj)",
                        feedforward_modules=r".*up_proj"),
    "no_feedforward": IA3Config(target_modules=("q_proj", "k_proj", "gate_proj"), feedforward_modules=()),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_peft_and_merges_like_peft(base, case, tmp_path, caplog):
    hf, model, params, base_logits = base
    cfg = EXPORT_CASES[case]
    adapted = _randomised(params, cfg, seed=len(case))
    ours = _logits(model, adapted)
    # The tiny model's logits are ~0.1, so 1e-3 (10x the parity tolerance) is a clear change.
    assert np.abs(ours - base_logits).max() > 1e-3, "the adapter must change the output for the test to mean anything"

    IA3.save(tmp_path / "a", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny-llama")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and set(raw["feedforward_modules"]) <= set(raw["target_modules"])
    pm, notes = _peft_load(hf, tmp_path / "a", caplog)
    assert not [n for n in notes if "missing" in n.lower() or "unexpected" in n.lower()], notes
    chex.assert_trees_all_close(hf_logits(pm, IDS), ours, **tolerances.LOGITS_FP32)

    # Our loader restores exactly the tree we saved.
    _, loaded, _ = IA3.load(tmp_path / "a", model, params)
    chex.assert_trees_all_equal(loaded, adapted)

    # PEFT's merge_and_unload equals our merge (weights and logits).
    hf_merged = pm.merge_and_unload()
    merged = IA3.merge(adapted, cfg)
    chex.assert_trees_all_close(hf_logits(hf_merged, IDS), _logits(model, merged), **tolerances.LOGITS_FP32)
    from jaxpeft.convert.hf import params_to_hf

    theirs = {k: v.numpy() for k, v in hf_merged.state_dict().items()}
    for name, value in params_to_hf(merged, np.float32).items():
        np.testing.assert_allclose(value, theirs[name], atol=1e-6, err_msg=name)


def test_export_config_and_tensor_layout(base, tmp_path):
    _, model, params, _ = base
    cfg = EXPORT_CASES["layers"]
    IA3.save(tmp_path / "a", _randomised(params, cfg), cfg, model_config=model.config, base_model_name_or_path="t")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["target_modules"] == [f"model.layers.{i}.{m}" for i in (0, 2)
                                     for m in ("mlp.up_proj", "self_attn.v_proj")]
    assert raw["feedforward_modules"] == ["model.layers.0.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert set(raw) <= {f.name for f in dataclasses.fields(peft.IA3Config)}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    assert shapes["base_model.model.model.layers.0.mlp.up_proj.ia3_l"] == (1, 40)  # (1, in)
    assert shapes["base_model.model.model.layers.2.self_attn.v_proj.ia3_l"] == (8, 1)  # (out, 1)
    assert len(shapes) == 4


IMPORT_CASES = {
    "peft_default": {},  # null targets: PEFT's Llama default, k_proj, v_proj, down_proj (feedforward)
    "regex_ff": {"target_modules": ["q_proj", "o_proj", "up_proj"], "feedforward_modules": r".*\.(o_proj|up_proj)"},
    "no_ff": {"target_modules": r".*\.(k_proj|gate_proj)", "feedforward_modules": []},
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_peft_made_adapter_loads_with_the_same_logits(base, case, tmp_path):
    hf, model, params, base_logits = base
    torch.manual_seed(len(case))
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(task_type="CAUSAL_LM", **IMPORT_CASES[case]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.8 * torch.randn_like(p))
    expected = hf_logits(pm.eval(), IDS)
    assert np.abs(expected - base_logits).max() > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    loaded_model, loaded, cfg = IA3.load(tmp_path / "peft", model, params)
    chex.assert_trees_all_close(_logits(loaded_model, loaded), expected, **tolerances.LOGITS_FP32)
    n_ff = sum(p[-1] == "ia3_in" for p in flatten_params(loaded))
    assert n_ff == {"peft_default": 3, "regex_ff": 6, "no_ff": 0}[case]
    # Saving what we loaded gives a folder PEFT reads back to the same logits.
    IA3.save(tmp_path / "again", loaded, cfg, model_config=model.config, base_model_name_or_path="t")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "again")).eval()
    chex.assert_trees_all_close(hf_logits(again, IDS), expected, **tolerances.LOGITS_FP32)


# --- unmerge and bad input ---------------------------------------------------------------------------


def test_unmerge_restores_the_base_and_refuses_zero_scales(base):
    _, _, params, _ = base
    cfg = IA3Config()
    adapted = _randomised(params, cfg, seed=7)
    adapter, _ = IA3.split(adapted, cfg)
    restored = IA3.unmerge(IA3.merge(adapted, cfg), adapter, cfg)
    chex.assert_trees_all_close(restored, params, atol=1e-5, rtol=1e-5)
    flat = flatten_params(adapter)
    path = next(p for p in flat if p[-1] == "ia3_out")
    flat[path] = flat[path].at[3].set(0.0)
    with pytest.raises(ConfigError, match=r"zero scale[\s\S]*self_attn\.[kv]_proj\.ia3_out: 1 zero entries"):
        IA3.unmerge(IA3.merge(adapted, cfg), unflatten_params(flat), cfg)


def test_bad_configs(base):
    _, _, params, _ = base
    with pytest.raises(ConfigError, match="match no linear module"):
        IA3.init(jax.random.key(0), params, IA3Config(target_modules=("qkv_proj",), feedforward_modules=()))
    # PEFT refuses feedforward modules outside the targets; so do we, at config time.
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match=r"\['down_proj'\] are not among target_modules[\s\S]*subset"):
        IA3Config(target_modules=("k_proj", "v_proj"), feedforward_modules=("down_proj",))
    with pytest.raises(ConfigError, match="match none of the targeted modules"):
        IA3.init(jax.random.key(0), params, IA3Config(target_modules=r".*v_proj", feedforward_modules=r".*down"))
    adapted = IA3.init(jax.random.key(0), params, IA3Config())
    with pytest.raises(ConfigError, match="already carry IA3 leaves"):
        IA3.init(jax.random.key(0), adapted, IA3Config())


def test_folder_from_another_architecture_or_method(base, tmp_path):
    _, model, params, _ = base
    other_cfg = tiny_hf_config(layers=4, bias=True)
    other_cfg.intermediate_size = 36  # same module names, another MLP width and one layer more
    other = peft.get_peft_model(tiny_hf_model(other_cfg, seed=5), peft.IA3Config(task_type="CAUSAL_LM"))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError) as err:
        IA3.load(tmp_path / "other", model, params)
    msg = str(err.value)
    assert "different base model" in msg
    assert "model.layers.3.self_attn.k_proj: the model has no such linear module" in msg
    assert all(f"model.layers.{i}.mlp.down_proj: ia3_l shape (1, 36), the model needs (1, 52)" in msg
               for i in range(3))
    lora = peft.get_peft_model(copy.deepcopy(base[0]), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="peft_type is 'LORA', not 'IA3'"):
        IA3.load(tmp_path / "lora", model, params)


def test_save_refuses_leaves_that_disagree_with_the_config(base, tmp_path):
    _, model, params, _ = base
    adapted = IA3.init(jax.random.key(0), params, IA3Config())
    with pytest.raises(ConfigError, match=r"down_proj: carries \['ia3_in'\] but the config makes it ordinary"):
        IA3.save(tmp_path / "a", adapted, IA3Config(feedforward_modules=()), model_config=model.config,
                 base_model_name_or_path="t")
    with pytest.raises(ConfigError, match="carry no IA3 leaves"):
        IA3.save(tmp_path / "b", params, IA3Config(), model_config=model.config, base_model_name_or_path="t")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- the entry point ---------------------------------------------------------------------------------


def test_ia3_cli_adapter_loads_in_peft_and_equals_merged(tmp_path, caplog, tiny_model_dir):
    """The training run in this process (`run_entry`); the refused --feedforward is the subprocess smoke test
    of `python -m experiments.ia3`."""
    import transformers

    model_dir = tiny_model_dir
    out = tmp_path / "run"
    run_entry("experiments.ia3", f"--model={model_dir}", "--steps=3", "--batch_size=4", "--eval_examples=4",
              "--save_every=0", f"--out={out}", "--save_merged", "--noprogress")
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["method"] == "ia3" and settings["lr"] == 1e-2
    assert settings["method_config"]["feedforward_modules"] == ["down_proj"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = np.random.default_rng(2).integers(3, hf.config.vocab_size, (2, 9))
    pm, notes = _peft_load(hf, out / "adapter", caplog)
    assert not [n for n in notes if "missing" in n.lower()], notes
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapted = hf_logits(pm, ids)
    assert np.abs(adapted - hf_logits(hf, ids)).max() > 1e-4, "3 steps at lr 1e-2 move the vectors"
    chex.assert_trees_all_close(hf_logits(merged, ids), adapted, **tolerances.LOGITS_FP32)

    bad = _run("experiments.ia3", f"--model={model_dir}", f"--out={tmp_path / 'bad'}", "--feedforward=up_proj",
               check=False)
    assert bad.returncode == 2 and "subset of target_modules" in bad.stderr and "Traceback" not in bad.stderr
