"""experiments.full as a user runs it: 3 steps of full fine-tuning on a tiny local model; model/ is an HF
folder that transformers loads with the trained weights; --save_merged is refused before any work.
The refusal of --save_merged is the subprocess smoke test of `python -m experiments.full`; the rest runs
in this process (`run_entry`)."""

from __future__ import annotations

import json

import chex
import numpy as np
import pytest

from tests.cli import run_entry, run_module as _run
from tests import tolerances
from tests.hf_tiny import hf_logits

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("full")
    model = tiny_model_dir
    out = root / "run"
    # lr 1e-3 so 3 steps visibly move the tiny random model (the 5e-5 default suits real models).
    proc = run_entry("experiments.full", f"--model={model}", "--steps=3", "--batch_size=4", "--eval_examples=4",
                     "--save_every=0", "--lr=1e-3", f"--out={out}", "--noprogress")
    return model, out, proc


def test_full_cli_writes_a_transformers_model_with_the_trained_weights(run):
    import orbax.checkpoint as ocp
    import transformers

    import jaxpeft

    model_dir, out, proc = run
    assert "eval_exact_match" in proc.stdout
    for name in ("config.json", "model/config.json", "model/model.safetensors", "model/tokenizer_config.json",
                 "metrics.jsonl", "results.json", "loss.png"):
        assert (out / name).exists(), name
    assert not (out / "adapter").exists() and not (out / "merged").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["method"] == "full" and config["settings"]["method_config"] == {}
    counts = config["parameters"]
    assert counts["trainable"] == counts["base"] == counts["total"] > 0  # every leaf trains

    # The final checkpoint holds the trained params; model/ must carry exactly those.
    step_dir = out / "checkpoints" / "3" / "state"
    trained = ocp.StandardCheckpointer().restore(step_dir.resolve())["params"]
    jmodel, base_params, _ = jaxpeft.from_pretrained(model_dir, load_tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = np.random.default_rng(0).integers(3, hf.config.vocab_size, (2, 9))
    ours = np.asarray(jmodel.apply({"params": trained}, ids))
    chex.assert_trees_all_close(hf_logits(hf, ids), ours, **tolerances.LOGITS_FP32)
    base = np.asarray(jmodel.apply({"params": base_params}, ids))
    assert np.abs(ours - base).max() > 1e-3, "3 steps of full fine-tuning change the model"


def test_full_cli_refuses_save_merged_before_doing_anything(run, tmp_path):
    model_dir, _, _ = run
    proc = _run("experiments.full", f"--model={model_dir}", f"--out={tmp_path / 'x'}", "--save_merged", check=False)
    assert proc.returncode != 0
    assert "--save_merged means nothing for full fine-tuning" in proc.stderr and "model/" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_full_cli_has_no_method_flags(run, tmp_path):
    model_dir, _, _ = run
    proc = run_entry("experiments.full", f"--model={model_dir}", f"--out={tmp_path / 'y'}", "--rank=4", check=False)
    assert proc.returncode != 0 and "rank" in proc.stderr and not (tmp_path / "y").exists()
