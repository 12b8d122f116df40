"""The entry points as a user runs them: experiments.lora on a tiny local model, then experiments.generate.

The training run and the sampled generation run in this process (`run_entry`); the refusal of a non-empty
--out (lora) and the greedy generation with the adapter (generate) are the subprocess smoke tests of the
real `python -m` command lines."""

from __future__ import annotations

import json

import pytest

from tests.cli import run_entry, run_module as _run

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model_dir
    out = root / "run"
    proc = run_entry("experiments.lora", f"--model={model}", "--rank=4", "--steps=3", "--batch_size=4",
                     "--eval_examples=4", "--save_every=2", f"--out={out}", "--save_merged", "--noprogress",
                     "--targets=re:.*self_attn\\.(q|v)_proj")
    return model, out, proc


def test_lora_cli_writes_the_run_folder(trained):
    model, out, proc = trained
    assert "eval_exact_match" in proc.stdout and "before" in proc.stdout
    for name in ("config.json", "adapter/adapter_config.json", "metrics.jsonl", "results.json", "loss.png",
                 "merged/config.json", "merged/model.safetensors", "merged/tokenizer_config.json"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir()) and any((out / "checkpoints").iterdir())
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["steps"] == 3 and settings["method_config"]["r"] == 4
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == model and adapter["r"] == 4
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"before", "after"}


def test_generate_cli_with_the_adapter_prints_only_the_continuation(trained):
    model, out, _ = trained
    proc = _run("experiments.generate", f"--model={model}", f"--adapter={out}/adapter", "--prompt=4 may 1962",
                "--max_new_tokens=5", "--greedy")
    assert proc.stdout.count("\n") == 1  # one line: the continuation, nothing else
    sampled = run_entry("experiments.generate", f"--model={model}", "--prompt=hello", "--max_new_tokens=5",
                        "--temperature=0.8", "--top_k=5", "--seed=3", "--nochat")
    assert sampled.stdout.count("\n") == 1


def test_non_empty_out_is_refused_with_a_clear_message(trained):
    model, out, _ = trained
    before = sorted(p.name for p in out.iterdir())
    proc = _run("experiments.lora", f"--model={model}", f"--out={out}", check=False)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before
