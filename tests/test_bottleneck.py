"""Bottleneck adapters (Houlsby/Pfeiffer) against golden AdapterHub files made by the `adapters` package.

The fixtures in tests/fixtures/adapterhub/ come from make_fixtures.py there (run with the package's own
virtualenv; its header says how). If the package changes what it computes or writes, rerun that script
and check the diff of the fixtures before updating anything here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from dataclasses import replace as dataclasses_replace
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
from jaxpeft.methods.bottleneck import load_adapterhub, save_adapterhub
from jaxpeft.convert.hf import read_safetensors
from jaxpeft.core.errors import CheckpointError, ConfigError, UnsupportedModelError
from jaxpeft.core.tree import flatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.bottleneck import AdaptersConfig
from tests import tolerances
from tests.cli import run_entry

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "adapterhub"
GOLDEN = ("houlsby", "pfeiffer", "custom", "residual_after_ln", "no_ln_after")
AHVENV_PYTHON = Path(os.environ.get("ADAPTERHUB_PYTHON", "/tmp/ahvenv/bin/python"))
METHOD = get_method("adapters")


@pytest.fixture(scope="module")
def base():
    model, params, _ = jaxpeft.from_pretrained(str(FIXTURES / "base"), load_tokenizer=False)
    return model, params


@pytest.fixture(scope="module")
def golden():
    return read_safetensors(FIXTURES / "logits.safetensors")


def _logits(model, params, ids):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids)))


def _perturbed(params, config, seed=3):
    """Adapter leaves made non-zero (as after training), so the adapted model differs from the base."""
    flat = flatten_params(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(flat)))
    out = {p: (v + 0.3 * jax.random.normal(next(keys), v.shape) if METHOD.is_trainable(p, config) else v)
           for p, v in flat.items()}
    from jaxpeft.core.tree import unflatten_params

    return unflatten_params(out)


def test_the_base_fixture_matches_the_package_without_adapters(base, golden):
    model, params = base
    chex.assert_trees_all_close(_logits(model, params, golden["input_ids"]), golden["base"], **tolerances.LOGITS_FP32)


def test_houlsby_tree_spec_and_counts(base):
    _, params = base
    cfg = AdaptersConfig(reduction_factor=16)
    adapted = METHOD.init(jax.random.PRNGKey(0), params, cfg)
    added = {"/".join(p): tuple(v.shape) for p, v in flatten_params(adapted).items() if METHOD.is_adapter(p, cfg)}
    expected = {}
    for i in (0, 1):
        for loc in ("attention_adapter", "output_adapter"):
            pre = f"model/layers/{i}/{loc}/"
            expected.update({pre + "down/kernel": (64, 4), pre + "down/bias": (4,), pre + "up/kernel": (4, 64),
                             pre + "up/bias": (64,), pre + "scale": (), pre + "input_residual": (),
                             pre + "output_residual": (), pre + "activation/swish": (0,)})
    assert added == expected
    trainable = {p for p in flatten_params(adapted) if METHOD.is_trainable(p, cfg)}
    assert {"/".join(p) for p in trainable} == {k for k in expected if "/down/" in k or "/up/" in k}
    counts = METHOD.param_counts(adapted, cfg)
    assert counts["trainable"] == 2 * 2 * (64 * 4 + 4 + 4 * 64 + 64)
    assert counts["base"] == sum(np.size(v) for v in flatten_params(params).values())


@pytest.mark.parametrize("cfg", [AdaptersConfig(), AdaptersConfig(adapter_type="pfeiffer", reduction_factor=8),
                                 AdaptersConfig(reduction_factor=4, original_ln_before=True, leave_out=(0,))])
def test_identity_at_init_and_the_up_projection_starts_at_zero(base, golden, cfg):
    model, params = base
    adapted = METHOD.init(jax.random.PRNGKey(0), params, cfg)
    chex.assert_trees_all_close(_logits(model, adapted, golden["input_ids"]), _logits(model, params, golden["input_ids"]),
                                **tolerances.EXACT)
    flat = flatten_params(adapted)
    downs = [v for p, v in flat.items() if p[-2:] == ("down", "kernel")]
    assert downs and all(float(jnp.abs(d).max()) > 0 for d in downs)
    assert all(not jnp.any(v) for p, v in flat.items() if p[-2] == "up")
    # The adapter is live: a non-zero up-projection changes the output.
    moved = _logits(model, _perturbed(adapted, cfg), golden["input_ids"])
    assert np.abs(moved - _logits(model, params, golden["input_ids"])).max() > 1e-2


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_adapter_gives_the_package_logits(base, golden, name):
    model, params = base
    m, adapted, cfg = load_adapterhub(FIXTURES / name, model, params)
    assert cfg.name == name
    out = _logits(m, adapted, golden["input_ids"])
    assert np.abs(golden[name] - golden["base"]).max() > 0.1  # the fixture's adapter really acts
    chex.assert_trees_all_close(out, golden[name], **tolerances.LOGITS_FP32)
    expected = {"houlsby": ("houlsby", "swish", 16), "pfeiffer": ("pfeiffer", "relu", 8)}.get(name)
    if expected:
        assert (cfg.adapter_type, cfg.activation, cfg.reduction_factor) == expected


@pytest.mark.parametrize("name", ("houlsby", "pfeiffer", "custom"))
def test_export_of_a_loaded_adapter_reproduces_the_golden_folder(base, name, tmp_path):
    model, params = base
    _, adapted, cfg = load_adapterhub(FIXTURES / name, model, params)
    METHOD.save(tmp_path / name, adapted, cfg, model_config=model.config, base_model_name_or_path="")
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    ours, theirs = (read_safetensors(d / "adapter.safetensors") for d in (tmp_path / name, FIXTURES / name))
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    ours_cfg, theirs_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / name,
                                                                                           FIXTURES / name))
    # Same fields and values; only the init scheme differs (ours is the package's "mam_adapter": zero up).
    assert ours_cfg.keys() == theirs_cfg.keys() and ours_cfg["config"].keys() == theirs_cfg["config"].keys()
    assert ours_cfg["config"].pop("init_weights") == "mam_adapter"
    theirs_cfg["config"].pop("init_weights")
    assert ours_cfg == theirs_cfg
    assert isinstance(ours_cfg["config"]["scaling"], float)  # the package refuses an int scaling
    # A second load of our export gives the same model.
    _, again, cfg2 = METHOD.load(tmp_path / name, model, params)
    assert cfg2 == cfg
    chex.assert_trees_all_equal(again, adapted)


def _package_available() -> bool:
    if not AHVENV_PYTHON.exists():
        return False
    probe = subprocess.run([str(AHVENV_PYTHON), "-c", "import adapters"], capture_output=True, timeout=120)
    return probe.returncode == 0


def _assert_the_package_gives_our_logits(folder, model, adapted, golden, tmp_path, base=None) -> None:
    """The package (in /tmp/ahvenv) loads `folder` onto base/ (or `base`) with no missing or unexpected keys and
    gives our logits on the golden ids, which the adapter moves away from the base's."""
    out = tmp_path / "logits.safetensors"
    cmd = [str(AHVENV_PYTHON), str(FIXTURES / "make_fixtures.py"), f"--load={folder}", f"--out={out}"]
    proc = subprocess.run(cmd + ([f"--base={base}"] if base else []), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        theirs, meta = f.get_tensor("logits"), f.metadata()
    assert meta["name"] == "ours"
    assert json.loads(meta["loading_info"]) == {"missing_keys": [], "unexpected_keys": []}
    ours = _logits(model, adapted, golden["input_ids"])
    assert np.abs(ours - golden["base"]).max() > 0.1
    chex.assert_trees_all_close(theirs, ours, **tolerances.LOGITS_FP32)


@pytest.mark.skipif(not _package_available(), reason="needs the adapters package in /tmp/ahvenv (see "
                    "tests/fixtures/adapterhub/make_fixtures.py); the golden-file tests above are the gate")
def test_the_package_loads_our_export_with_our_logits(base, golden, tmp_path):
    model, params = base
    cfg = AdaptersConfig(reduction_factor=8, activation="gelu_new", scaling=2.0, leave_out=(0,), name="ours")
    adapted = _perturbed(METHOD.init(jax.random.PRNGKey(1), params, cfg), cfg)
    METHOD.save(tmp_path / "ours", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    _assert_the_package_gives_our_logits(tmp_path / "ours", model, adapted, golden, tmp_path)


def test_bad_configs_are_refused_with_the_reason(base):
    model, params = base
    with pytest.raises(ConfigError, match="adapter_type='lora'.*houlsby"):
        AdaptersConfig(adapter_type="lora")
    with pytest.raises(ConfigError, match="activation='swishy'"):
        AdaptersConfig(activation="swishy")
    with pytest.raises(ConfigError, match="reduction_factor=0"):
        AdaptersConfig(reduction_factor=0)
    for rf, got in ((24, "2.66667"), (128, "0.5")):
        with pytest.raises(ConfigError, match=f"bottleneck of 64 / {rf} = {got}.*divides 64"):
            METHOD.init(jax.random.PRNGKey(0), params, AdaptersConfig(reduction_factor=rf))
        with pytest.raises(ConfigError, match="not a whole number"):
            METHOD.prepare(AdaptersConfig(reduction_factor=rf), model_config=model.config)
    with pytest.raises(ConfigError, match=r"layers \[5\] do not exist"):
        METHOD.prepare(AdaptersConfig(leave_out=(0, 5)), model_config=model.config)
    adapted = METHOD.init(jax.random.PRNGKey(0), params, AdaptersConfig())
    with pytest.raises(ConfigError, match="already carry bottleneck adapters"):
        METHOD.init(jax.random.PRNGKey(0), adapted, AdaptersConfig())
    with pytest.raises(ConfigError, match="activation 'swish', the config says 'relu'"):
        save_adapterhub("/nonexistent/never", adapted, AdaptersConfig(activation="relu"), model_config=model.config,
                        base_model_name_or_path="")
    with pytest.raises(ConfigError, match="cannot be merged"):
        METHOD.merge(adapted, AdaptersConfig())


def _hf_base(hidden: int, layers: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=88,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    return jaxpeft.from_transformers(transformers.LlamaForCausalLM(config).eval())


def test_an_adapter_for_another_architecture_is_refused_listing_every_mismatch():
    pytest.importorskip("torch")
    model, params = _hf_base(hidden=48, layers=2)
    with pytest.raises(CheckpointError) as e:
        load_adapterhub(FIXTURES / "houlsby", model, params)
    msg = str(e.value)
    assert "hidden_size 64, the model's is 48" in msg and "shape (4, 64), needs (3, 48)" in msg
    assert "base model it was trained for" in msg
    model, params = _hf_base(hidden=64, layers=3)
    with pytest.raises(CheckpointError, match="layer 2 attention_adapter: the config puts an adapter there"):
        load_adapterhub(FIXTURES / "houlsby", model, params)
    model, params = _hf_base(hidden=64, layers=1)
    with pytest.raises(CheckpointError, match="layer 1 attention_adapter: the model has layers 0..0 only"):
        load_adapterhub(FIXTURES / "houlsby", model, params)


def _copy(name: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / name, dest)
    return dest


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["config"].update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(raw))


def test_unsupported_package_options_are_listed_in_one_error(base, tmp_path):
    model, params = base
    folder = _copy("houlsby", tmp_path / "a")
    _edit_config(folder, ln_after=True, use_gating=True, scaling="learned", reduction_factor={"default": 16},
                 residual_before_ln="post_add", non_linearity="softsign")
    with pytest.raises(ConfigError) as e:
        load_adapterhub(folder, model, params)
    for part in ("ln_after=True", "use_gating=True", "scaling='learned'", "per-layer reduction factors",
                 "post_add", "non_linearity='softsign'"):
        assert part in str(e.value)
    _edit_config(folder, architecture="lora")
    with pytest.raises(ConfigError, match="'lora' adapter"):
        load_adapterhub(folder, model, params)


def test_tensors_that_disagree_with_the_config_are_refused(base, tmp_path):
    model, params = base
    folder = _copy("pfeiffer", tmp_path / "p")
    _edit_config(folder, mh_adapter=True)  # the file has no attention adapters
    with pytest.raises(CheckpointError, match="layer 0 attention_adapter: the config puts an adapter there"):
        load_adapterhub(folder, model, params)
    folder = _copy("pfeiffer", tmp_path / "q")
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["name"] = "other"
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="adapter name 'pfeiffer', but adapter_config.json names it 'other'"):
        load_adapterhub(folder, model, params)


def test_a_pickle_is_read_only_on_request(base, golden, tmp_path):
    torch = pytest.importorskip("torch")
    model, params = base
    folder = _copy("pfeiffer", tmp_path / "p")
    tensors = read_safetensors(folder / "adapter.safetensors")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, folder / "pytorch_adapter.bin")
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        load_adapterhub(folder, model, params)
    m, adapted, _ = load_adapterhub(folder, model, params, allow_pickle=True)
    chex.assert_trees_all_close(_logits(m, adapted, golden["input_ids"]), golden["pfeiffer"], **tolerances.LOGITS_FP32)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapterhub(FIXTURES, model, params)


def test_dropout_acts_only_while_training(base, golden):
    model, params = base
    cfg = AdaptersConfig(dropout=0.5)
    adapted = _perturbed(METHOD.init(jax.random.PRNGKey(0), params, cfg), cfg)
    ids = jnp.asarray(golden["input_ids"])
    train = model.clone(deterministic=False, **METHOD.model_kwargs(cfg))
    a, b = (np.asarray(train.apply({"params": adapted}, ids, rngs={"dropout": jax.random.PRNGKey(k)})) for k in (0, 1))
    assert np.abs(a - b).max() > 1e-3
    m, _, _ = load_adapterhub(FIXTURES / "houlsby", model, params)
    assert m.dropout_rate == 0.0 and m.deterministic


def test_adapters_cli_writes_an_adapterhub_folder(tmp_path, tiny_model_dir):
    """The training run and the foreign flag in this process (`run_entry`); the refused --save_merged is the
    subprocess smoke test of `python -m experiments.adapters`."""
    pytest.importorskip("torch")
    model_dir = tiny_model_dir
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "experiments.adapters", f"--model={model_dir}", "--adapter_type=pfeiffer",
            "--reduction_factor=8", "--activation=gelu", "--steps=3", "--batch_size=4", "--eval_examples=4",
            "--save_every=3", f"--out={out}", "--noprogress", "--adapter_name=dates"]
    proc = run_entry(*args[2:], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval_exact_match" in proc.stdout
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    raw = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert raw["name"] == "dates" and raw["model_name"] == model_dir and raw["hidden_size"] == 40
    assert raw["config"]["non_linearity"] == "gelu" and raw["config"]["reduction_factor"] == 8
    assert raw["config"]["mh_adapter"] is False and raw["config"]["original_ln_before"] is True
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["method"] == "adapters" and settings["lr"] == 1e-3
    model, params, _ = jaxpeft.from_pretrained(model_dir, load_tokenizer=False)
    _, adapted, _ = METHOD.load(out / "adapter", model, params)
    ups = [v for p, v in flatten_params(adapted).items() if p[-2:] == ("up", "kernel")]
    assert len(ups) == 2 and all(jnp.any(u) for u in ups)  # trained away from the zero init
    # A flag of another method and --save_merged are refused before any training.
    bad = run_entry(args[2], f"--model={model_dir}", "--rank=4", f"--out={tmp_path / 'x'}", check=False)
    assert bad.returncode != 0 and "rank" in bad.stderr
    bad = subprocess.run(args[:3] + [f"--model={model_dir}", f"--out={tmp_path / 'y'}",
                                     "--save_merged"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "cannot be merged" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("family", ("gemma2", "gemma3_text", "phi3", "qwen3_moe"))
def test_adapterhub_folders_of_unchecked_families_are_refused_both_ways(base, family, tmp_path):
    # jaxpeft's AdapterHub folders: llama/mistral (the package's own classes) and qwen2/qwen3 (plugin families,
    # checked below); Gemma (the package's adapter sits before the post-norm) and Phi-3 / MoE types (which the
    # package does not adapt) are refused, each with its reason.
    model, params = base
    _, adapted, cfg = load_adapterhub(FIXTURES / "houlsby", model, params)
    other = SimpleNamespace(config=SimpleNamespace(model_type=family))
    with pytest.raises(UnsupportedModelError, match=rf"read an AdapterHub folder for a '{family}' model.*"
                       r"\['llama', 'mistral', 'qwen2', 'qwen3'\] only") as e:
        load_adapterhub(FIXTURES / "houlsby", other, params)
    assert ("before Gemma's post-norm" if family.startswith("gemma") else "no bottleneck support") in str(e.value)
    with pytest.raises(UnsupportedModelError, match=rf"write an AdapterHub folder for a '{family}' model"):
        save_adapterhub(tmp_path / "out", adapted, cfg, model_config=other.config, base_model_name_or_path="")
    assert not (tmp_path / "out").exists()
    save_adapterhub(tmp_path / "mistral", adapted, cfg, model_config=SimpleNamespace(model_type="mistral"),
                    base_model_name_or_path="")
    assert json.loads((tmp_path / "mistral" / "adapter_config.json").read_text())["model_type"] == "mistral"
    assert not (tmp_path / "mistral" / "adapter_interface.json").exists()


@pytest.mark.parametrize("family", ("qwen2", "qwen3"))
def test_plugin_family_folders_give_the_package_logits_and_round_trip(family, tmp_path):
    # Fixtures: make_fixtures.py --families (the package's plugin interface on tiny random Qwen2 / Qwen3 bases).
    root = FIXTURES / "families" / family
    golden = read_safetensors(root / "logits.safetensors")
    model, params, _ = jaxpeft.from_pretrained(str(root / "base"), load_tokenizer=False)
    chex.assert_trees_all_close(_logits(model, params, golden["input_ids"]), golden["base"], **tolerances.LOGITS_FP32)
    for name in ("houlsby", "pfeiffer"):
        m, adapted, cfg = load_adapterhub(root / name, model, params)
        assert np.abs(golden[name] - golden["base"]).max() > 0.1
        chex.assert_trees_all_close(_logits(m, adapted, golden["input_ids"]), golden[name], **tolerances.LOGITS_FP32)
        save_adapterhub(tmp_path / name, adapted, cfg, model_config=model.config, base_model_name_or_path="")
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert files == sorted(p.name for p in (root / name).iterdir()) == [
            "adapter.safetensors", "adapter_config.json", "adapter_interface.json"]
        ours, theirs = (read_safetensors(d / "adapter.safetensors") for d in (tmp_path / name, root / name))
        assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
        ours_cfg, theirs_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / name,
                                                                                               root / name))
        assert ours_cfg["config"].pop("init_weights") == "mam_adapter"
        theirs_cfg["config"].pop("init_weights")
        assert ours_cfg == theirs_cfg
        assert ((tmp_path / name / "adapter_interface.json").read_text()
                == (root / name / "adapter_interface.json").read_text())
    with pytest.raises(ConfigError, match="original_ln_after=False on a .*plugin interface"):
        save_adapterhub(tmp_path / "x", adapted, dataclasses_replace(cfg, original_ln_after=False),
                        model_config=model.config, base_model_name_or_path="")


@pytest.mark.skipif(not _package_available(), reason="needs the adapters package in /tmp/ahvenv (see "
                    "tests/fixtures/adapterhub/make_fixtures.py); the golden-file tests above are the gate")
def test_the_package_loads_our_qwen3_export_with_our_logits(tmp_path):
    root = FIXTURES / "families" / "qwen3"
    golden = read_safetensors(root / "logits.safetensors")
    model, params, _ = jaxpeft.from_pretrained(str(root / "base"), load_tokenizer=False)
    cfg = AdaptersConfig(reduction_factor=8, activation="gelu_new", scaling=2.0, leave_out=(0,), name="ours")
    adapted = _perturbed(METHOD.init(jax.random.PRNGKey(1), params, cfg), cfg)
    save_adapterhub(tmp_path / "ours", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    _assert_the_package_gives_our_logits(tmp_path / "ours", model, adapted, golden, tmp_path, base=root / "base")
