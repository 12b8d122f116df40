"""`python -m experiments.dpo` end to end on the tiny model: the run folder, TRL's metric names, resume giving
the same losses, --init_adapter as the frozen reference, and the PEFT adapter loading in peft."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from experiments import dpo

pytestmark = pytest.mark.slow  # reason: three short training runs of the tiny model (about 40 s on this CPU)

# --sft_weight=0: TRL's plain sigmoid loss, whose first step is exactly log 2 (the entry point's default adds
# the chosen answers' NLL).
FLAGS = ["--steps=4", "--batch_size=2", "--seq_len=96", "--eval_examples=4", "--rank=2", "--noprogress",
         "--sft_weight=0", "--save_every=2", "--lr=5e-3", "--warmup_steps=0"]


def _steps(out) -> list[dict]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "full"
    assert dpo.run(["dpo", f"--model={tiny_model_dir}", f"--out={out}", *FLAGS]) == 0
    return out


def test_run_folder_and_trl_metric_names(full_run):
    steps = _steps(full_run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "loss"):
        assert all(name in r for r in steps), name
    # At init the policy is the reference: every reward is 0, the loss log 2 and the (strict) accuracy 0.
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[0]["rewards/margins"] == 0.0
    assert steps[0]["rewards/accuracies"] == 0.0 and steps[-1]["rewards/margins"] != 0.0
    results = json.loads((full_run / "results.json").read_text())
    assert "eval_preference_accuracy" in results["before"] and "eval_exact_match" in results["after"]
    config = json.loads((full_run / "config.json").read_text())
    assert config["settings"]["preference"]["loss"] == "dpo"
    assert (full_run / "adapter" / "adapter_config.json").exists() and (full_run / "loss.png").exists()


def test_resume_gives_the_same_losses(full_run, tmp_path):
    """A run killed after its step-2 checkpoint (the step-4 one removed) resumes to the same losses."""
    out = tmp_path / "resumed"
    shutil.copytree(full_run, out)
    shutil.rmtree(out / "checkpoints" / "4")
    tiny = json.loads((full_run / "config.json").read_text())["settings"]["model"]
    assert dpo.run(["dpo", f"--model={tiny}", f"--out={out}", *FLAGS, "--resume"]) == 0
    ours, theirs = _steps(out), _steps(full_run)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-6


def test_init_adapter_is_the_frozen_reference(full_run, tiny_model_dir, tmp_path):
    out = tmp_path / "from_adapter"
    flags = [f for f in FLAGS if not f.startswith("--steps")] + ["--steps=2"]
    assert dpo.run(["dpo", f"--model={tiny_model_dir}", f"--out={out}", *flags,
                    f"--init_adapter={full_run / 'adapter'}"]) == 0
    first = _steps(out)[0]
    # The policy starts as the loaded adapter and the reference is that adapter frozen: rewards 0 again,
    # while the policy's log-probs are the trained adapter's, not the base's.
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/margins"] == 0.0
    base_first = _steps(full_run)[0]
    assert abs(first["logps/chosen"] - base_first["logps/chosen"]) > 1e-4


def test_resume_refuses_a_changed_preference_setting(full_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "changed"
    shutil.copytree(full_run, out)
    assert dpo.run(["dpo", f"--model={tiny_model_dir}", f"--out={out}", *FLAGS, "--resume", "--beta=0.3"]) == 2
    assert "preference" in capsys.readouterr().err
