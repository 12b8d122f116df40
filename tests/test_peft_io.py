"""PEFT adapter folders: parity against the real `peft` in both directions, round trips, and errors."""

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

from jaxpeft.methods.lora import load_peft_adapter, save_peft_adapter
from jaxpeft.core.errors import CheckpointError, ConfigError
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits, tiny_hf_config, tiny_hf_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
LORA = get_method("lora")
# Keys every PEFT version since 0.9 (DoRA) understands; newer keys break older PeftConfig loaders.
OLD_PEFT_KEYS = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias",
                 "fan_in_fan_out", "inference_mode", "init_lora_weights", "target_modules", "layers_to_transform",
                 "rank_pattern", "alpha_pattern", "modules_to_save", "base_model_name_or_path", "revision"}

EXPORT_CASES = {
    "plain": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")),
    "rslora": LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=("q_proj", "k_proj", "o_proj")),
    "dora": LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=("q_proj", "v_proj", "down_proj")),
    "patterns": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "up_proj"),
                           rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                           alpha_pattern={"up_proj": 3.0}),
    "modules_to_save": LoraConfig(r=4, lora_alpha=8, modules_to_save=("lm_head",)),
    "layers": LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "gate_proj"), layers_to_transform=(0, 2)),
    "all_linear": LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.1),
    "regex": LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.[02]\.(self_attn\.k_proj|mlp\.down_proj)"),
}
IMPORT_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "dora": dict(r=3, lora_alpha=6, use_dora=True, target_modules=["k_proj", "o_proj"]),
    "rslora": dict(r=4, lora_alpha=4, use_rslora=True, target_modules="all-linear", lora_dropout=0.05),
    "modules_to_save": dict(r=2, lora_alpha=8, target_modules=r".*\.(q_proj|up_proj)", modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def base(tiny_base):
    hf, model, params = tiny_base(seed=3, layers=3)  # untied, so lm_head can be a module to save
    return hf, model, params, hf_logits(hf, IDS)


def _logits(model, params) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))


def _adapted(params, cfg: LoraConfig, seed: int = 0) -> dict:
    """LoRA params whose B (and DoRA magnitude, saved modules) are random, so the output moves off the base."""
    flat = flatten_params(LORA.init(jax.random.key(seed), params, cfg))
    rng = np.random.default_rng(seed)
    for path, v in flat.items():
        noise = rng.standard_normal(v.shape).astype(np.float32)
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(0.3 * noise)
        elif path[-1] == "lora_magnitude" or (LORA.is_adapter(path, cfg) and not LORA.is_added(path, cfg)):
            flat[path] = v * (1.0 + 0.1 * noise)
    return unflatten_params(flat)


def _peft_load(hf, folder, caplog):
    """PeftModel.from_pretrained on a copy of `hf`; returns the model and every warning/log line it emitted."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder)).eval()
    return pm, [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_loads_in_peft_with_the_same_logits(base, case, tmp_path, caplog):
    hf, model, params, base_logits = base
    cfg = EXPORT_CASES[case]
    adapted = _adapted(params, cfg, seed=len(case))
    ours = _logits(model, adapted)
    assert np.abs(ours - base_logits).max() > 1e-2, "the adapter must change the output for the test to mean anything"

    out = save_peft_adapter(tmp_path / "adapter", adapted, cfg, base_model_name_or_path="tiny-llama")
    pm, notes = _peft_load(hf, out, caplog)
    assert not [n for n in notes if "missing adapter keys" in n], notes
    chex.assert_trees_all_close(hf_logits(pm, IDS), ours, **tolerances.LOGITS_FP32)

    # Round trip: our loader restores exactly the tree we saved.
    loaded_model, loaded, loaded_cfg = load_peft_adapter(out, model, params)
    chex.assert_trees_all_equal(loaded, adapted)
    assert loaded_model.dropout_rate == cfg.lora_dropout
    assert (loaded_cfg.use_dora, loaded_cfg.use_rslora, loaded_cfg.modules_to_save) == (
        cfg.use_dora, cfg.use_rslora, cfg.modules_to_save)


def test_config_json_is_sorted_explicit_and_old_peft_compatible(base, tmp_path):
    _, _, params, _ = base
    cfg = EXPORT_CASES["regex"]
    out = save_peft_adapter(tmp_path / "a", _adapted(params, cfg), cfg, base_model_name_or_path="tiny-llama")
    text = (out / "adapter_config.json").read_text()
    raw = json.loads(text)
    assert list(raw) == sorted(raw) and set(raw) == OLD_PEFT_KEYS
    assert set(raw) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    # Layers 0 and 2 only: suffixes would also select layer 1, so the list names the modules in full.
    assert raw["target_modules"] == [f"model.layers.{i}.{m}" for i in (0, 2)
                                     for m in ("mlp.down_proj", "self_attn.k_proj")]
    assert (raw["peft_type"], raw["r"], raw["lora_alpha"], raw["modules_to_save"]) == ("LORA", 4, 8, None)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight").shape == (4, 40)
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight").shape == (8, 4)


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_peft_made_adapter_loads_with_the_same_logits(base, case, tmp_path):
    hf, model, params, base_logits = base
    torch.manual_seed(len(case))
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                                **IMPORT_CASES[case]))
    with torch.no_grad():  # init_lora_weights=False makes B random; also move DoRA magnitudes and saved heads
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    expected = hf_logits(pm.eval(), IDS)
    assert np.abs(expected - base_logits).max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")

    loaded_model, loaded, cfg = load_peft_adapter(tmp_path / "peft", model, params)
    chex.assert_trees_all_close(_logits(loaded_model, loaded), expected, **tolerances.LOGITS_FP32)
    assert loaded_model.dropout_rate == IMPORT_CASES[case].get("lora_dropout", 0.0)
    assert cfg.use_dora == IMPORT_CASES[case].get("use_dora", False)
    assert cfg.modules_to_save == tuple(IMPORT_CASES[case].get("modules_to_save", ()))


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """A valid DoRA adapter folder of ours, to damage in the error tests."""
    _, _, params, _ = base
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=("q_proj", "v_proj"))
    return save_peft_adapter(tmp_path_factory.mktemp("saved") / "a", _adapted(params, cfg), cfg,
                             base_model_name_or_path="tiny-llama")


def _copy_with(src, dst, config_changes=None, tensors=None):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    raw = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**raw, **(config_changes or {})}))
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(state) if tensors else state, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_folder_and_files(base, saved, tmp_path):
    _, model, params, _ = base
    with pytest.raises(CheckpointError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere", model, params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path / "empty", model, params)
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        load_peft_adapter(tmp_path / "cfg_only", model, params)


def test_pickle_needs_allow_pickle(base, saved, tmp_path):
    from safetensors.torch import load_file

    _, model, params, _ = base
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    torch.save(load_file(str(saved / "adapter_model.safetensors")), folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_peft_adapter(folder, model, params)
    _, from_bin, _ = load_peft_adapter(folder, model, params, allow_pickle=True)
    chex.assert_trees_all_equal(from_bin, load_peft_adapter(saved, model, params)[1])


def test_other_peft_types_are_refused(base, saved, tmp_path):
    _, model, params, _ = base
    folder = _copy_with(saved, tmp_path / "ia3", {"peft_type": "IA3"})
    with pytest.raises(ConfigError, match=r"'IA3'.*\['LORA'\]"):
        load_peft_adapter(folder, model, params)


def test_null_target_modules_are_read_from_the_tensors(base, saved, tmp_path):
    _, model, params, _ = base
    folder = _copy_with(saved, tmp_path / "null", {"target_modules": None})
    _, loaded, cfg = load_peft_adapter(folder, model, params)
    assert cfg.target_modules == ("q_proj", "v_proj")
    chex.assert_trees_all_equal(loaded, load_peft_adapter(saved, model, params)[1])


def test_unsupported_options_are_listed_together(base, saved, tmp_path):
    _, model, params, _ = base
    folder = _copy_with(saved, tmp_path / "opts", {"bias": "all", "fan_in_fan_out": True, "use_qalora": True,
                                                    "lora_bias": True, "init_lora_weights": "pissa"})
    with pytest.raises(ConfigError) as err:
        load_peft_adapter(folder, model, params)
    for name in ("bias='all'", "fan_in_fan_out=True", "use_qalora=True", "lora_bias=True", "pissa"):
        assert name in str(err.value)


def test_keys_for_modules_the_model_lacks_are_listed(base, saved, tmp_path):
    _, model, params, _ = base
    folder = _copy_with(saved, tmp_path / "keys", tensors=lambda s: {
        k.replace("layers.0.", "layers.7.").replace("layers.1.self_attn.v_proj", "layers.1.self_attn.x_proj"): v
        for k, v in s.items()})
    with pytest.raises(CheckpointError) as err:
        load_peft_adapter(folder, model, params)
    msg = str(err.value)
    assert "model.layers.7.self_attn.q_proj: the model has no such module" in msg
    assert "model.layers.7.self_attn.v_proj" in msg and "model.layers.1.self_attn.x_proj" in msg
    assert "different base model" in msg


def test_adapter_for_a_different_base_model(base, tmp_path):
    _, model, params, _ = base
    other_cfg = tiny_hf_config(layers=3)
    other_cfg.hidden_size = 48  # same module names, another width
    other = peft.get_peft_model(tiny_hf_model(other_cfg, seed=5), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError) as err:
        load_peft_adapter(tmp_path / "other", model, params)
    msg = str(err.value)
    assert "trained for a different base model" in msg
    assert all(f"model.layers.{i}.self_attn.q_proj: lora_A in-dim 48" in msg for i in range(3))


def test_config_and_tensors_that_disagree(base, saved, tmp_path):
    _, model, params, _ = base
    folder = _copy_with(saved, tmp_path / "rank", {"r": 6, "use_dora": False})
    with pytest.raises(CheckpointError) as err:
        load_peft_adapter(folder, model, params)
    assert "rank 4 but the config's r/rank_pattern gives 6" in str(err.value)
    assert "use_dora=False but lora_magnitude_vector is present" in str(err.value)
    with pytest.raises(ConfigError, match="already carry LoRA leaves"):
        load_peft_adapter(saved, model, load_peft_adapter(saved, model, params)[1])


def test_save_errors_and_atomic_write(base, tmp_path, monkeypatch):
    _, _, params, _ = base
    cfg = LoraConfig(r=4, lora_alpha=8)
    with pytest.raises(ConfigError, match="no LoRA leaves"):
        save_peft_adapter(tmp_path / "none", params, cfg, base_model_name_or_path="x")
    with pytest.raises(ConfigError, match="rank 4 but the config gives 2"):
        save_peft_adapter(tmp_path / "rank", _adapted(params, cfg), LoraConfig(r=2, lora_alpha=8),
                          base_model_name_or_path="x")
    with pytest.raises(ConfigError, match="modules_to_save 'score'"):
        save_peft_adapter(tmp_path / "mts", _adapted(params, cfg), dataclasses.replace(cfg, modules_to_save=("score",)),
                          base_model_name_or_path="x")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_peft_adapter(tmp_path / "broken", _adapted(params, cfg), cfg, base_model_name_or_path="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a failed save must leave nothing behind"
    monkeypatch.undo()
    out = save_peft_adapter(tmp_path / "ok", _adapted(params, cfg), cfg, base_model_name_or_path="x")
    with pytest.raises(FileExistsError):
        save_peft_adapter(out, _adapted(params, cfg), cfg, base_model_name_or_path="x")
