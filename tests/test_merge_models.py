"""experiments.merge_models / jaxpeft.merge.kit*: mergekit configurations merged here and by mergekit itself.

Each configuration is merged by mergekit 0.1.5 (`mergekit.merge.run_merge`, what `mergekit-yaml` calls, in
this process so torch is imported once) and by jaxpeft, from the same YAML text, and every tensor, name
and dtype is compared (tolerances.MERGEKIT_*). The tiny Llamas: a base and three fine-tunes with distinct
structured deltas (a rank-2 part of alternating sign plus noise, at scales 0.01, 0.03, 0.07), 4 layers.
mergekit's output of a configuration is made once per module (`merged`). Skipped without mergekit
(`pip install --no-deps mergekit==0.1.5 immutables`).
"""

from __future__ import annotations

import glob
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

    root = tmp_path_factory.mktemp("kit_models")
    cfg = tiny_hf_config(layers=4)
    tiny_hf_model(cfg, seed=0).save_pretrained(root / "base")
    tiny_hf_model(cfg, seed=0).to(torch.bfloat16).save_pretrained(root / "base_bf16")
    for i, scale in enumerate(SCALES):
        m = _perturbed(tiny_hf_model(cfg, seed=0), 100 + i, scale, 1 if i % 2 == 0 else -1)
        m.save_pretrained(root / f"ft{i}")
        if i < 2:
            m.to(torch.bfloat16).save_pretrained(root / f"ft{i}_bf16")
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

    import ml_dtypes  # noqa: F401  (bf16 for safetensors' numpy reader)
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
        if a.dtype.name == "bfloat16":
            ulp = 2.0 ** (np.floor(np.log2(peak)) - 7)
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
