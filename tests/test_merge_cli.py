"""experiments.merge / jaxpeft.merge.folders: PEFT folders in (jaxpeft's and peft's), a PEFT folder that peft
loads and a merged HF model that transformers loads out; bad input refused with clear errors; the demo's task.
The refused --density=1.5 is the subprocess smoke test of `python -m experiments.merge` (the demo's, slow, of
experiments.merge_demo); the other runs are in this process (`run_entry`)."""

from __future__ import annotations

import datetime
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
from jaxpeft.methods.lora import save_peft_adapter
from jaxpeft.core.errors import CheckpointError, ConfigError
from jaxpeft.core.tree import dotted, flatten_params, unflatten_params
from jaxpeft.merge.folders import MergeConfig, merge_folders, read_lora_folder, write_lora_folder
from jaxpeft.methods.lora import Lora, LoraConfig
from jaxpeft.data.tasks import get_task, time_split_of
from tests.cli import run_entry, run_module as _run
from tests import tolerances
from tests.hf_tiny import hf_logits

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
TOL = dict(atol=1e-5, rtol=0.0)


def _deltas(tree) -> dict[str, np.ndarray]:
    flat = flatten_params(tree)
    return {dotted(p[:-1]): np.asarray(flat[p[:-1] + ("lora_scale",)] * flat[p] @ flat[p[:-1] + ("lora_b",)])
            for p in flat if p[-1] == "lora_a"}


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _peft_model(base_dir, adapter_dir, caplog):
    with caplog.at_level(logging.WARNING):
        pm = peft.PeftModel.from_pretrained(_hf(base_dir), str(adapter_dir)).eval()
    assert "missing adapter keys" not in caplog.text.lower()
    return pm


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """A tiny base folder; adapter "ours" (jaxpeft LoRA, r4) and "theirs" (peft's save_pretrained, r4)."""
    root = tmp_path_factory.mktemp("merge")
    base_dir = tiny_model_dir
    model, params, _ = jaxpeft.from_pretrained(base_dir, load_tokenizer=False)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    ours = Lora().init(jax.random.key(1), params, cfg)
    flat = flatten_params(ours)
    for i, p in enumerate(sorted(p for p in flat if p[-1] == "lora_b")):
        flat[p] = 0.3 * jax.random.normal(jax.random.key(50 + i), flat[p].shape)
    save_peft_adapter(root / "ours", unflatten_params(flat), cfg, base_model_name_or_path=base_dir)
    torch.manual_seed(0)
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    pm.save_pretrained(str(root / "theirs"))
    return root, base_dir, model, params


def test_cli_writes_an_adapter_peft_loads_and_a_merged_model_with_its_logits(setup, caplog):
    root, base_dir, _, _ = setup
    out = root / "cli_ties"
    proc = run_entry("experiments.merge", f"--adapters={root / 'ours'},{root / 'theirs'}", "--weights=0.7,0.5",
                     "--combination=ties", "--density=0.6", f"--out={out}", "--save_merged")
    summary = json.loads(proc.stdout)
    assert summary["merged"] == str(out / "merged") and summary["combination"] == "ties"
    assert summary["semantics"] == "exact" and summary["distance_to_weighted_sum"] > 0  # TIES trims: not the sum
    record = json.loads((out / "merge_config.json").read_text())
    assert record["density"] == 0.6 and record["weights"] == [0.7, 0.5] and record["base_model"] == base_dir
    ids = np.random.default_rng(0).integers(3, 200, (2, 12))
    with_adapter = hf_logits(_peft_model(base_dir, out / "adapter", caplog), ids)
    merged = hf_logits(_hf(out / "merged"), ids)
    np.testing.assert_allclose(merged, with_adapter, **tolerances.LOGITS_FP32)
    assert np.abs(merged - hf_logits(_hf(base_dir), ids)).max() > 1e-3  # the merge changed the model
    assert (out / "merged" / "tokenizer_config.json").exists()
    # A bad density is one clear line on stderr, exit 2, and nothing is written.
    bad = _run("experiments.merge", f"--adapters={root / 'ours'},{root / 'theirs'}", "--combination=ties",
               "--density=1.5", f"--out={root / 'bad'}", check=False)
    assert bad.returncode == 2 and "density=1.5" in bad.stderr and "Traceback" not in bad.stderr
    assert not (root / "bad").exists()


def test_exact_linear_is_the_weighted_sum_and_peft_semantics_is_not(setup, caplog):
    root, base_dir, _, _ = setup
    ins = [read_lora_folder(root / n) for n in ("ours", "theirs")]
    w = (0.7, -0.4)
    want = {k: w[0] * v + w[1] * _deltas(ins[1].adapter)[k] for k, v in _deltas(ins[0].adapter).items()}
    exact = merge_folders([root / "ours", root / "theirs"], MergeConfig(combination_type="linear", weights=w),
                          root / "linear_exact")
    assert exact["distance_to_weighted_sum"] < 1e-5 and set(exact["ranks"].values()) == {8}
    pm = _peft_model(base_dir, root / "linear_exact" / "adapter", caplog)  # the real library reads the folder
    for key, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            np.testing.assert_allclose(mod.get_delta_weight("default").detach().numpy().T, want[key], **TOL)
    peft_sem = merge_folders([root / "ours", root / "theirs"],
                             MergeConfig(combination_type="linear", weights=w, semantics="peft"), root / "linear_peft")
    assert peft_sem["distance_to_weighted_sum"] > 0.05  # PEFT's cross terms A_1·B_2 (peft#3004)
    cat = merge_folders([root / "ours", root / "theirs"], MergeConfig(combination_type="cat", weights=w),
                        root / "cat")
    assert cat["distance_to_weighted_sum"] < 1e-5


def test_bad_input_is_refused_with_clear_errors(setup):
    root, base_dir, _, params = setup
    pair = [root / "ours", root / "theirs"]
    with pytest.raises(ConfigError, match="2 adapters but 3 weights"):
        merge_folders(pair, MergeConfig(combination_type="ties", weights=(1.0, 1.0, 1.0)), root / "e1")
    for density in (0.0, 1.5):
        with pytest.raises(ConfigError, match=rf"density={density}: must be in \(0, 1\]"):
            MergeConfig(combination_type="dare_ties", density=density)
    with pytest.raises(ConfigError, match=r"(?s)density=0.5 means nothing for 'linear'.*svd_rank=3 means nothing"):
        MergeConfig(combination_type="linear", semantics="peft", density=0.5, svd_rank=3)
    # Another base model by name (e.g. the base vs the instruct model: same shapes, other weights).
    other = root / "other_base"
    shutil.copytree(root / "ours", other, dirs_exist_ok=True)
    raw = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": "org/other-model"}))
    with pytest.raises(ConfigError, match=r"(?s)different base models.*org/other-model.*--allow_base_mismatch"):
        merge_folders([root / "ours", other], MergeConfig(combination_type="linear"), root / "e2")
    merge_folders([root / "ours", other], MergeConfig(combination_type="linear"), root / "e2",
                  allow_base_mismatch=True)
    # Other target modules; other base shapes.
    cfg_k = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj"))
    save_peft_adapter(root / "qk", Lora().init(jax.random.key(2), params, cfg_k), cfg_k,
                      base_model_name_or_path=base_dir)
    with pytest.raises(ConfigError, match=r"(?s)adapt different modules.*k_proj"):
        merge_folders([root / "ours", root / "qk"], MergeConfig(combination_type="linear"), root / "e3")
    wide = read_lora_folder(root / "ours").adapter
    flat = {p: (jnp.zeros((24, v.shape[1])) if p[-1] == "lora_a" else v) for p, v in flatten_params(wide).items()}
    write_lora_folder(root / "wide", unflatten_params(flat), LoraConfig(r=4, lora_alpha=8, target_modules=()),
                      base_model_name_or_path=base_dir)
    with pytest.raises(ConfigError, match=r"different base shapes"):
        merge_folders([root / "ours", root / "wide"], MergeConfig(combination_type="linear"), root / "e4")
    # The output folder: a non-empty one is refused and left alone.
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"(?s)not empty.*--overwrite"):
        merge_folders(pair, MergeConfig(combination_type="linear"), root / "full")
    assert sorted(p.name for p in (root / "full").iterdir()) == ["keep.txt"]
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        merge_folders([root / "ours", root / "nowhere"], MergeConfig(combination_type="linear"), root / "e5")
    for p in (root / "e1", root / "e3", root / "e4", root / "e5"):
        assert not p.exists()  # failed merges leave nothing behind


def test_times_task_is_deterministic_disjoint_and_correct():
    task = get_task("times")
    train, again = task.make_split("train", 300, 1), task.make_split("train", 300, 1)
    assert train == again and task.make_split("train", 100, 1) == train[:100]
    held = task.make_split("eval", task.n_eval, 0)
    assert len({r["output"] for r in held}) == len(held) == 150
    train_minutes = {r["output"] for r in task.make_split("train", 2000, 0)}
    assert not train_minutes & {r["output"] for r in held}
    assert all(time_split_of(datetime.time(*map(int, r["output"].split(":")))) == "eval" for r in held)
    for r in train:  # the 24-hour styles say the answer outright; check them against the reference
        if r["input"].endswith(" hours"):
            assert r["input"][:2] + ":" + r["input"][2:4] == r["output"]
    assert len({r["input"] for r in train}) == len(train)
    with pytest.raises(ConfigError):
        task.make_split("eval", 10_000, 0)


@pytest.mark.slow
def test_merge_demo_runs_end_to_end_on_a_tiny_model(setup):
    root, base_dir, _, _ = setup
    out = root / "demo"
    proc = _run("experiments.merge_demo", f"--model={base_dir}", "--steps=2", "--eval_examples=4", "--rank=2",
                f"--out={out}", "--noprogress")
    demo = json.loads((out / "demo.json").read_text())
    assert set(demo["exact_match"]) == {"base", "dates adapter", "times adapter", "ties merge", "linear merge",
                                        "served together (one batch, per-row adapters)"}
    assert "| ties merge |" in proc.stdout
