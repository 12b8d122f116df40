"""experiments.merge_models_demo end to end on the tiny random model: two full fine-tunes (2 steps), the three
merges, four extracted LoRAs, and the exact-match table's structure (the figures themselves mean nothing here)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.cli import run_entry

pytest.importorskip("torch")

ROWS = {"base", "dates full fine-tune", "times full fine-tune", "task_arithmetic merge", "ties merge", "slerp merge",
        "dates LoRA, rank 4", "dates LoRA, 0.95 energy", "times LoRA, rank 4", "times LoRA, 0.95 energy"}


@pytest.mark.slow(reason="two tiny full fine-tunes and 20 evaluations: ~55 s on this machine, mostly compilation")
def test_demo_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    proc = run_entry("experiments.merge_models_demo", f"--model={tiny_model_dir}", f"--out={out}", "--steps=2",
                     "--eval_examples=2", "--rank=4", "--save_modules=norm", "--noprogress")
    demo = json.loads((out / "demo.json").read_text())
    assert set(demo["exact_match"]) == ROWS
    assert all(set(row) == {"dates", "times"} and all(0 <= v <= 1 for v in row.values())
               for row in demo["exact_match"].values())
    for row in ROWS:
        assert f"| {row} |" in proc.stdout
    for name in ("task_arithmetic", "ties", "slerp"):
        assert yaml.safe_load((out / f"{name}.yml").read_text())["merge_method"] == name
        assert (out / name / "config.json").exists() and (out / name / "mergekit_config.yml").exists()
    assert yaml.safe_load((out / "slerp.yml").read_text())["base_model"] == str(out / "dates" / "model")
    for t in ("dates", "times"):
        assert (out / t / "model" / "config.json").exists()
        for kind in ("r4", "energy"):
            assert (out / f"lora_{t}_{kind}" / "adapter_config.json").exists()
        assert demo["extractions"][f"lora_{t}_r4"]["ranks"]["max"] == 4
        assert demo["extractions"][f"lora_{t}_energy"]["energy_kept"]["min"] >= 0.95 - 1e-9
        assert demo["extractions"][f"lora_{t}_energy"]["saved"] == ["model.norm"]
