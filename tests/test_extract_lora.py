"""experiments.extract_lora / jaxpeft.merge.extract: a fine-tune whose differences are low-rank (plus a changed
head and norm) extracts to a PEFT folder that peft.PeftModel loads with the fine-tune's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.merge.extract import ExtractConfig, extract_lora, low_rank
from tests import tolerances

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tests.hf_tiny import tiny_hf_config, tiny_hf_model

    root = tmp_path_factory.mktemp("extract")
    cfg = tiny_hf_config(layers=2)
    tiny_hf_model(cfg, seed=0).save_pretrained(root / "base")
    ft = tiny_hf_model(cfg, seed=0)
    g = torch.Generator().manual_seed(7)
    ranks = {"q_proj": 3, "down_proj": 2, "v_proj": 1}
    with torch.no_grad():
        for n, p in ft.named_parameters():
            mod = n.split(".")[-2]
            if mod in ranks:
                k = ranks[mod]
                p.add_(0.05 * torch.randn(p.shape[0], k, generator=g) @ torch.randn(k, p.shape[1], generator=g))
            elif n in ("lm_head.weight", "model.norm.weight"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(root / "ft")
    return root, ft


def test_energy_rank_pattern_and_peft_logits(pair, tmp_path):
    root, ft = pair
    import transformers

    report = extract_lora(root / "base", root / "ft", tmp_path / "lora",
                          ExtractConfig(energy=0.999, save_modules=("lm_head", "norm")))
    got = {m.split(".")[-1]: v["rank"] for m, v in report["modules"].items()}
    assert got == {"q_proj": 3, "down_proj": 2, "v_proj": 1}
    assert all(v["energy_kept"] > 0.999 for v in report["modules"].values())
    assert set(report["not_carried"]) == {"lm_head.weight", "model.norm.weight"}
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and set(cfg["rank_pattern"].values()) == {1, 2}
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, 61, size=(2, 9)))
    with torch.no_grad():
        ours, want = model(ids).logits.numpy(), ft(ids).logits.numpy()
        plain = transformers.AutoModelForCausalLM.from_pretrained(root / "base")(ids).logits.numpy()
    np.testing.assert_allclose(ours, want, **tolerances.LOGITS_FP32)
    assert np.abs(plain - want).max() > 100 * tolerances.LOGITS_FP32["atol"]  # the fine-tune does differ


def test_fixed_rank_truncates():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(13, 11)).astype(np.float32)
    b, a, kept = low_rank(d, 4, None)
    s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    assert b.shape == (13, 4) and a.shape == (4, 11)
    np.testing.assert_allclose(np.linalg.norm(d - b @ a) ** 2, (s[4:] ** 2).sum(), rtol=1e-4)
    assert abs(kept - (s[:4] ** 2).sum() / (s ** 2).sum()) < 1e-9


def test_bad_input(pair, tmp_path):
    root, _ = pair
    with pytest.raises(ConfigError, match="exactly one of rank"):
        extract_lora(root / "base", root / "ft", tmp_path / "x", ExtractConfig())
    with pytest.raises(ConfigError, match="energy=1.5"):
        extract_lora(root / "base", root / "ft", tmp_path / "x", ExtractConfig(energy=1.5))
    assert not (tmp_path / "x").exists()
