"""experiments.merge_models / jaxpeft.merge.kit*: mergekit configurations merged here and by mergekit itself.

Each configuration is merged by mergekit 0.1.5 (`mergekit.merge.run_merge`, what `mergekit-yaml` calls, in
this process so torch is imported once) and by jaxpeft, from the same YAML text, and every tensor, name
and dtype is compared (tolerances.MERGEKIT_*). The tiny Llamas: a base and three fine-tunes with distinct
structured deltas (a rank-2 part of alternating sign plus noise, at scales 0.01, 0.03, 0.07), 4 layers.
mergekit's output of a configuration is made once per module (`merged`). Skipped without mergekit (in the
dev extra: `pip install -e ".[dev]"`).
"""

from __future__ import annotations

import glob
import importlib
import json
import textwrap

import numpy as np
import pytest
import yaml

from jaxpeft.core.errors import ConfigError
from jaxpeft.merge.kit_config import METHODS
from jaxpeft.merge.kit_exec import MergeOptions, merge_config_file
from tests import tolerances

torch = pytest.importorskip("torch")
mergekit = pytest.importorskip("mergekit.merge")
SCALES = (0.01, 0.03, 0.07)


def _perturbed(model, seed: int, scale: float, sign: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            d = torch.randn(p.shape, generator=g) * scale
            if p.ndim == 2:
                u, v = torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)
                d += sign * scale * (u @ v)
            p.add_(d)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.hf_tiny import tiny_hf_config, tiny_hf_model

    import transformers

    root = tmp_path_factory.mktemp("kit_models")
    cfg = tiny_hf_config(layers=4)
    tiny_hf_model(cfg, seed=0).save_pretrained(root / "base")
    for i, scale in enumerate(SCALES):
        _perturbed(tiny_hf_model(cfg, seed=0), 100 + i, scale, 1 if i % 2 == 0 else -1).save_pretrained(root / f"ft{i}")
    for name in ("base", "ft0", "ft1"):  # bf16 copies, read back (a model's .to() would change the shared config)
        transformers.AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.bfloat16).save_pretrained(
            root / f"{name}_bf16")
    for name in ("base", "ft0", "ft1", "ft2"):
        assert _load(root / name)["lm_head.weight"].dtype == np.float32
    (root / "ft1" / "tokenizer_config.json").write_text('{"marker": "ft1"}')
    (root / "base" / "tokenizer_config.json").write_text('{"marker": "base"}')
    other = tiny_hf_config(layers=4)
    other.intermediate_size = 54
    tiny_hf_model(other, seed=1).save_pretrained(root / "wide")
    return root


CONFIGS = {
    "linear": """
        merge_method: linear
        models:
          - {model: ft0, parameters: {weight: 0.6}}
          - {model: ft1, parameters: {weight: 0.3}}
          - {model: ft2, parameters: {weight: [0.1, 0.5]}}
        dtype: float32""",
    "linear_bf16": """
        merge_method: linear
        models:
          - {model: ft0_bf16, parameters: {weight: 0.7}}
          - {model: ft1_bf16, parameters: {weight: 0.4}}""",
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.5}}
          - {model: ft1, parameters: {weight: 0.8}}
          - {model: ft2, parameters: {weight: -0.3}}
        parameters: {lambda: 0.9}""",
    "ties": """
        merge_method: ties
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.5, density: 0.5}}
          - {model: ft1, parameters: {weight: 0.3, density: [0.9, 0.2]}}
          - {model: ft2, parameters: {weight: 0.4, density: 0.35}}
        dtype: float32""",
    "slerp_gradient": """
        merge_method: slerp
        base_model: base
        models: [{model: base}, {model: ft2}]
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
            - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
            - value: 0.5""",
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}
          - {model: ft1, parameters: {weight: 0.5, density: 0.4}}""",
    "model_stock": """
        merge_method: model_stock
        base_model: base
        models: [{model: ft0}, {model: ft1}, {model: ft2}]""",
    "passthrough": """
        merge_method: passthrough
        slices:
          - sources: [{model: ft0, layer_range: [0, 3]}]
          - sources: [{model: ft1, layer_range: [1, 4], parameters: {scale: [{filter: o_proj, value: 0.5}]}}]
        dtype: bfloat16""",
}
SLOW_CONFIGS = {
    "slerp_scalar": """
        merge_method: slerp
        base_model: base
        models: [{model: base}, {model: ft1}]
        parameters: {t: 0.3}""",
    "nuslerp": """
        merge_method: nuslerp
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.3}}
          - {model: ft2, parameters: {weight: 0.6}}""",
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.7, density: 0.5, gamma: 0.02}}
          - {model: ft2, parameters: {weight: 0.4, density: 0.8}}""",
    "ties_count_nonorm": """
        merge_method: ties
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.5, density: 0.5}}
          - {model: ft1, parameters: {weight: 0.9, density: 0.3}}
        parameters: {normalize: false, int8_mask: true}""",
    "dare_ties_density1": """
        merge_method: dare_ties
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.5, density: 1.0}}
          - {model: ft1, parameters: {weight: 0.3, density: 1.0}}""",
    "della_density1": """
        merge_method: della
        base_model: base
        models:
          - {model: ft0, parameters: {weight: 0.5, density: 1.0}}
          - {model: ft2, parameters: {weight: 0.3, density: 1.0}}""",
    "task_arithmetic_bf16": """
        merge_method: task_arithmetic
        base_model: base_bf16
        models:
          - {model: ft0_bf16, parameters: {weight: 0.5}}
          - {model: ft1_bf16, parameters: {weight: 0.8}}""",
}


def _config(models, text: str) -> str:
    text = textwrap.dedent(text).strip() + "\n"
    for name in ("base_bf16", "ft0_bf16", "ft1_bf16", "base", "ft0", "ft1", "ft2", "wide"):
        text = text.replace(f"model: {name}}}", f"model: {models / name}}}").replace(
            f"model: {name}\n", f"model: {models / name}\n").replace(f"model: {name},", f"model: {models / name},")
    return text


def _load(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    importlib.import_module("ml_dtypes")  # registers bf16 for the numpy reader
    out = {}
    for f in sorted(glob.glob(f"{folder}/*.safetensors")):
        out.update(load_file(f))
    return out


def _mergekit(text: str, out) -> dict[str, np.ndarray]:
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions as KitOptions

    mergekit.run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
                       options=KitOptions(quiet=True, copy_tokenizer=False, random_seed=0), config_source=text)
    return _load(out)


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """name -> (mergekit's tensors, jaxpeft's tensors, jaxpeft's folder), each configuration merged once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            text = _config(models, {**CONFIGS, **SLOW_CONFIGS}[name])
            root = tmp_path_factory.mktemp(name)
            (root / "merge.yml").write_text(text)
            merge_config_file(root / "merge.yml", root / "ours", MergeOptions(progress=False))
            cache[name] = (_mergekit(text, root / "kit"), _load(root / "ours"), root / "ours")
        return cache[name]
    return get


def _compare(kit: dict, ours: dict, name: str) -> None:
    assert sorted(kit) == sorted(ours)
    for k, a in kit.items():
        b = ours[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        x, y = a.astype(np.float32), b.astype(np.float32)
        peak = float(np.abs(x).max())
        if a.dtype.name == "bfloat16":  # one ulp of the tensor's largest magnitude (bf16: 8 significant bits)
            ulp = 2.0 ** (np.floor(np.log2(max(peak, float(np.abs(y).max())))) - 7)
            assert np.abs(x - y).max() <= tolerances.MERGEKIT_BF16_ULPS * ulp, (name, k)
        else:
            tol = tolerances.MERGEKIT_SLERP if name.startswith("slerp") else tolerances.MERGEKIT_FP32
            assert np.abs(x - y).max() <= tol * peak, (name, k, np.abs(x - y).max() / peak)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tensors_as_mergekit(merged, name):
    kit, ours, _ = merged(name)
    _compare(kit, ours, name)
    base_like = {k: v for k, v in ours.items()}
    assert any(np.abs(v.astype(np.float32)).max() > 0 for v in base_like.values())


@pytest.mark.slow(reason="seven more mergekit runs (~1.5 s each) and their compilations")
@pytest.mark.parametrize("name", list(SLOW_CONFIGS))
def test_same_tensors_as_mergekit_more(merged, name):
    kit, ours, _ = merged(name)
    _compare(kit, ours, name)


def test_folder_layout_and_config(merged, models):
    """The passthrough frankenmerge has 3 + 3 layers in config.json (as mergekit writes), the card and the YAML."""
    kit, ours, folder = merged("passthrough")
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 6
    assert json.loads((folder.parent / "kit" / "config.json").read_text())["num_hidden_layers"] == 6
    assert "model.layers.5.self_attn.o_proj.weight" in ours and "model.layers.6.mlp.up_proj.weight" not in ours
    text = (folder / "mergekit_config.yml").read_text()
    assert yaml.safe_load(text)["merge_method"] == "passthrough" and text in (folder / "README.md").read_text()
    # layer 3 of the output is ft1's layer 1, its o_proj scaled by 0.5 (the filter), the rest as stored
    src = _load(models / "ft1")
    np.testing.assert_array_equal(ours["model.layers.3.mlp.up_proj.weight"],
                                  src["model.layers.1.mlp.up_proj.weight"].astype(ours["model.layers.3.mlp.up_proj.weight"].dtype))
    assert not (folder.parent / "ours.tmp").exists()


def test_tokenizer_source(models, tmp_path):
    text = _config(models, CONFIGS["task_arithmetic"]) + f"tokenizer_source: {models / 'ft1'}\n"
    (tmp_path / "m.yml").write_text(text)
    merge_config_file(tmp_path / "m.yml", tmp_path / "a", MergeOptions(progress=False))
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text()) == {"marker": "ft1"}
    (tmp_path / "m.yml").write_text(_config(models, CONFIGS["task_arithmetic"]))
    merge_config_file(tmp_path / "m.yml", tmp_path / "b", MergeOptions(progress=False))
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) == {"marker": "base"}


def _missing_tensor_model(models, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    folder = tmp_path / "holey"
    folder.mkdir()
    shutil.copy(models / "ft1" / "config.json", folder)
    state = _load(models / "ft1")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    return folder


BAD = {
    "unknown method": ("merge_method: frankenstein\nmodels: [{model: ft0}]\n", "frankenstein"),
    "unknown parameter": ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: ft0, parameters: "
                          "{weight: 1, density: 0.5, temperature: 2}}\n", "'temperature'"),
    "modules": ("merge_method: linear\nmodules: {}\nmodels: [{model: ft0, parameters: {weight: 1}}]\n", "modules"),
    "layer range": ("merge_method: passthrough\nslices:\n  - sources: [{model: ft0, layer_range: [2, 6]}]\n",
                    "goes past its 4 layers"),
    "density": ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: ft0, parameters: {weight: 1, "
                "density: 1.5}}\n", "density 1.5 must be in (0, 1]"),
    "della epsilon": ("merge_method: della\nbase_model: base\nmodels:\n  - {model: ft0, parameters: {weight: 1, "
                      "density: 0.9, epsilon: 0.2}}\n", "+/- epsilon 0.2"),
    "shapes": ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {model: wide, parameters: "
               "{weight: 1}}\n", "model.layers.0.mlp.up_proj.weight has shape [54, 40]"),
    "missing weight": ("merge_method: task_arithmetic\nbase_model: base\nmodels: [{model: ft0}]\n",
                       "parameter weight is required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_refused_before_writing(models, tmp_path, case):
    text, expected = BAD[case]
    (tmp_path / "m.yml").write_text(_config(models, text))
    with pytest.raises(ConfigError, match=None) as e:
        merge_config_file(tmp_path / "m.yml", tmp_path / "out", MergeOptions(progress=False))
    assert expected in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "m.yml"]


def test_missing_tensor_and_existing_out(models, tmp_path):
    holey = _missing_tensor_model(models, tmp_path)
    text = f"merge_method: task_arithmetic\nbase_model: {models / 'base'}\nmodels:\n" \
           f"  - {{model: {holey}, parameters: {{weight: 1}}}}\n"
    (tmp_path / "m.yml").write_text(text)
    with pytest.raises(ConfigError, match=f"model {holey}: tensor model.layers.2.mlp.up_proj.weight is missing"):
        merge_config_file(tmp_path / "m.yml", tmp_path / "out", MergeOptions(progress=False))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        merge_config_file(tmp_path / "m.yml", tmp_path / "out", MergeOptions(progress=False))


def test_every_method_is_registered():
    assert sorted(METHODS) == sorted(["linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_linear",
                                      "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                                      "model_stock", "passthrough"])


def test_model_plus_lora_source(models, tmp_path):
    """`base+adapter`: the PEFT LoRA is applied before merging; passthrough of it equals peft's merge_and_unload."""
    import transformers

    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(models / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2})
    lora = peft.get_peft_model(model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn_like(p))
    lora.save_pretrained(tmp_path / "adapter")
    expected = {k: v.numpy() for k, v in lora.merge_and_unload().state_dict().items()}
    (tmp_path / "m.yml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {models / 'base'}+"
                                    f"{tmp_path / 'adapter'}\n")
    merge_config_file(tmp_path / "m.yml", tmp_path / "out", MergeOptions(progress=False))
    ours = _load(tmp_path / "out")
    base = _load(models / "base")
    for k, v in ours.items():
        np.testing.assert_allclose(v, expected[k], atol=1e-6, rtol=0)
    assert not np.allclose(ours["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.slow(reason="a subprocess that imports jax (~10 s on this machine)")
def test_cli(models, tmp_path):
    from tests.cli import run_module

    (tmp_path / "m.yml").write_text(_config(models, CONFIGS["task_arithmetic"]))
    out = run_module("experiments.merge_models", f"--config={tmp_path / 'm.yml'}", f"--out={tmp_path / 'o'}",
                     "--noprogress").stdout
    assert "merged 39 tensors" in out
    assert (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("name", [
    "ties", pytest.param("slerp_gradient", marks=pytest.mark.slow(reason="two more merges, ~4 s")),
    pytest.param("passthrough", marks=pytest.mark.slow(reason="two more merges, ~3 s"))])
def test_tiny_chunks_give_the_same_folder(merged, models, tmp_path, name):
    """A 64-byte budget (one row per chunk, rows read by safetensors' get_slice) writes the same bits as the
    default budget (every tiny tensor in one chunk)."""
    _, ours, _ = merged(name)
    (tmp_path / "merge.yml").write_text(_config(models, CONFIGS[name]))
    merge_config_file(tmp_path / "merge.yml", tmp_path / "out", MergeOptions(progress=False, chunk_bytes=64))
    chunked = _load(tmp_path / "out")
    assert sorted(chunked) == sorted(ours)
    for k, v in ours.items():
        assert chunked[k].dtype == v.dtype
        np.testing.assert_array_equal(chunked[k].view(np.uint8), v.view(np.uint8), err_msg=k)


@pytest.mark.slow(reason="a bf16 ties merge by each tool on fresh random models (~3 s)")
@pytest.mark.parametrize("untied", [False, True])
def test_bf16_ties_differ_only_at_the_cut(tmp_path, untied):
    """Random bf16 models whose deltas tie at the density cut (bench.merge_ties, smaller): every entry of both
    outputs is mergekit's bf16 ties of a keep/drop choice that departs from the forced one only where |delta|
    equals the k-th magnitude; with the cut made unique (`untie`) the outputs are within one bf16 ulp."""
    from bench.big_model import generate
    from bench.merge_models import CONFIG
    from bench.merge_ties import DENSITY, WEIGHT, tie_check, untie

    for seed, name in enumerate(("base", "ft0", "ft1")):
        generate(tmp_path / name, 1, 2.0, seed, tokenizer=False, vocab=190, fast=True, hidden=96, intermediate=160,
                 heads=4, kv_heads=2)
    if untied:
        assert untie(tmp_path, DENSITY)
    text = CONFIG.format(d=tmp_path)
    (tmp_path / "ties.yml").write_text(text)
    merge_config_file(tmp_path / "ties.yml", tmp_path / "ours", MergeOptions(progress=False))
    kit, ours = _mergekit(text, tmp_path / "kit"), _load(tmp_path / "ours")
    base, fts = _load(tmp_path / "base"), [_load(tmp_path / "ft0"), _load(tmp_path / "ft1")]
    assert sorted(kit) == sorted(ours) == sorted(base)
    checks = {k: tie_check(base[k], [f[k] for f in fts], {"mergekit": kit[k], "jaxpeft": ours[k]}, [WEIGHT] * 2,
                           DENSITY) for k in base}
    for k, c in checks.items():
        assert c["differ_untied"] == 0 and c["unexplained"] == {"mergekit": 0, "jaxpeft": 0}, (k, c)
        if untied:
            assert c["max_ulps"] <= tolerances.MERGEKIT_BF16_ULPS, (k, c)
    name = "model.layers.0.mlp.up_proj.weight"
    assert min(checks[name]["tied"]) > 1  # the check is not vacuous: several entries share the k-th magnitude
    if not untied:  # and it sees a difference that is not a tie-break: one untied entry moved by one ulp
        from bench.merge_ties import _bf16, kth_magnitude

        d = [_bf16(f[name].astype(np.float32) - base[name].astype(np.float32)) for f in fts]
        free = np.logical_or.reduce([np.abs(x) == kth_magnitude(x, DENSITY) for x in d])
        i = np.flatnonzero(~free.reshape(-1))[0]
        bad = ours[name].copy()
        bad.reshape(-1).view(np.uint16)[i] += 1  # the next bf16 value
        c = tie_check(base[name], [f[name] for f in fts], {"mergekit": kit[name], "jaxpeft": bad}, [WEIGHT] * 2,
                      DENSITY)
        assert c["unexplained"]["jaxpeft"] == 1 and c["differ_untied"] >= 1, c
