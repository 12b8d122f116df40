"""Trainer: frozen weights stay frozen (in gradients and optimizer state), resume is exact, bad runs stop."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import optax
import pytest

from jaxpeft import from_transformers
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.partition import FROZEN, TRAINABLE, split_trainable
from jaxpeft.core.tree import flatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.train import optim
from jaxpeft.train.loop import NonFiniteLossError, TrainConfig, Trainer
from jaxpeft.convert.hf import load_tokenizer_from
from jaxpeft.train.run import RunConfig, run_finetune
from jaxpeft.train.run_data import prepare_data
from jaxpeft.train.metrics import read_metrics
from tests.hf_tiny import VOCAB, tiny_hf_config, tiny_hf_model, tiny_model_folder

pytest.importorskip("torch")
LORA = get_method("lora")


@pytest.fixture(scope="module")
def base():
    return from_transformers(tiny_hf_model(tiny_hf_config(), seed=2))


def _batch(rows=4, seq=10, seed=0):
    ids = np.random.default_rng(seed).integers(3, VOCAB, (rows, seq)).astype(np.int32)
    mask = np.zeros_like(ids)
    mask[:, seq // 2:] = 1
    return {"input_ids": ids, "loss_mask": mask, "attention_mask": np.ones_like(ids)}


def test_optimizer_state_holds_only_trainable_leaves(base):
    model, params = base
    cfg = LoraConfig(r=3, target_modules=("q_proj", "v_proj"))
    adapted = LORA.init(jax.random.PRNGKey(0), params, cfg)
    trainer = Trainer(model, adapted, LORA.labels(adapted, cfg), optim_cfg=optim.OptimConfig(total_steps=3),
                      train_cfg=TrainConfig(steps=3, batch_size=4), max_targets=24)
    trainable, _ = split_trainable(adapted, LORA.labels(adapted, cfg))
    n_trainable = len(flatten_params(trainable))
    assert n_trainable == 3 * 2 * 2  # 3 layers x (q, v) x (A, B)
    array_leaves = [x for x in jax.tree_util.tree_leaves(trainer.state["opt_state"]) if x.ndim > 0]
    assert len(array_leaves) == 2 * n_trainable  # Adam's mu and nu, nothing for the frozen base
    assert sum(x.size for x in array_leaves) == 2 * sum(x.size for x in jax.tree_util.tree_leaves(trainable))


def test_only_trainable_leaves_change(base):
    model, params = base
    cfg = LoraConfig(r=3, target_modules="all-linear")
    adapted = LORA.init(jax.random.PRNGKey(0), params, cfg)
    labels = LORA.labels(adapted, cfg)
    trainer = Trainer(model, adapted, labels, optim_cfg=optim.OptimConfig(lr=1e-2, total_steps=3, warmup_steps=0),
                      train_cfg=TrainConfig(steps=3, batch_size=4), max_targets=24)
    for _ in range(3):
        trainer.train_step(_batch())
    before, after = flatten_params(adapted), flatten_params(trainer.params())
    flat_labels = flatten_params(labels)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed and all(flat_labels[p] == TRAINABLE for p in changed)
    assert {p for p in before if p[-1] == "lora_b"} <= changed


def test_masked_optimizer_guards_the_full_tree_api(base):
    model, params = base
    cfg = LoraConfig(r=2)
    adapted = LORA.init(jax.random.PRNGKey(1), params, cfg)
    labels = LORA.labels(adapted, cfg)
    tx = optim.checked_masked(optax.adam(0.1), adapted, labels)
    state = tx.init(adapted)
    grads = jax.tree_util.tree_map(np.ones_like, adapted)
    updates, _ = tx.update(grads, state, adapted)
    flat_u, flat_l = flatten_params(updates), flatten_params(labels)
    assert all(not np.any(flat_u[p]) for p in flat_u if flat_l[p] == FROZEN)
    assert all(np.any(flat_u[p]) for p in flat_u if flat_l[p] == TRAINABLE)
    # The frozen branch (set_to_zero) keeps no state.
    frozen_state = state.inner_states[FROZEN].inner_state
    assert not any(getattr(x, "ndim", 0) for x in jax.tree_util.tree_leaves(frozen_state))


def test_unlabelled_leaf_is_an_error(base):
    model, params = base
    labels = LORA.labels(params, LoraConfig())
    del labels["model"]["norm"]
    with pytest.raises(ConfigError, match="model/norm/weight: no label"):
        optim.checked_masked(optax.adam(0.1), params, labels)
    with pytest.raises(ConfigError, match="no label"):
        split_trainable(params, labels)


def test_grad_accumulation_matches_one_big_batch(base):
    model, params = base
    cfg = LoraConfig(r=2, init_lora_weights="gaussian")
    adapted = LORA.init(jax.random.PRNGKey(3), params, cfg)
    labels = LORA.labels(adapted, cfg)
    results = []
    for accum in (1, 2):
        trainer = Trainer(model, adapted, labels, optim_cfg=optim.OptimConfig(lr=1e-2, total_steps=2),
                          train_cfg=TrainConfig(steps=2, batch_size=4, grad_accum=accum), max_targets=40)
        results.append([trainer.train_step(_batch(seed=s)) for s in range(2)])
        results[-1].append(trainer.state["params"])
    for a, b in zip(results[0][:2], results[1][:2]):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    chex.assert_trees_all_close(results[0][2], results[1][2], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def _run(tiny_model, out, **kw):
    cfg = RunConfig(out=str(out), model=tiny_model, steps=kw.pop("steps", 6), batch_size=4, seq_len=64,
                    lr=kw.pop("lr", 5e-3), warmup_steps=1, eval_examples=4, save_every=kw.pop("save_every", 2),
                    progress=False, **kw)
    return run_finetune(cfg, LORA, kw_lora())


def kw_lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


def test_run_folder_and_exact_resume(tiny_model, tmp_path):
    full = _run(tiny_model, tmp_path / "full")
    for name in ("config.json", "metrics.jsonl", "results.json", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (tmp_path / "full" / name).exists(), name
    assert json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == tiny_model
    assert full["after"]["eval_loss"] < full["before"]["eval_loss"]

    class Killed(Exception):
        pass

    def kill_at_5(record):
        if record["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        run_finetune(RunConfig(out=str(tmp_path / "cut"), model=tiny_model, steps=6, batch_size=4, seq_len=64,
                               lr=5e-3, warmup_steps=1, eval_examples=4, save_every=2, progress=False),
                     LORA, kw_lora(), callbacks={"on_log": kill_at_5})
    resumed = _run(tiny_model, tmp_path / "cut", resume=True)
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa
    full_l, cut_l = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [s for s, _ in cut_l] == [1, 2, 3, 4, 5, 6]  # step 5 was logged, then dropped on resume, then redone
    np.testing.assert_allclose([l for _, l in cut_l], [l for _, l in full_l], atol=1e-6, rtol=0)
    assert resumed["after"]["eval_loss"] == pytest.approx(full["after"]["eval_loss"], abs=1e-6)


def test_out_dir_rules(tiny_model, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        _run(tiny_model, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="contradict"):
        _run(tiny_model, out, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="config.json"):
        _run(tiny_model, out, resume=True)


def test_resume_refuses_changed_maths(tiny_model, tmp_path):
    _run(tiny_model, tmp_path / "r", steps=2)
    with pytest.raises(ConfigError, match="lr"):
        _run(tiny_model, tmp_path / "r", steps=4, lr=1e-2, resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        # Adam moves every LoRA weight by ~lr per step: 3e38 is the edge of fp32, so the weights overflow.
        _run(tiny_model, tmp_path / "nan", steps=10, lr=3e38, max_grad_norm=0.0, save_every=1)
    from jaxpeft.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "nan" / "checkpoints")
    assert ckpt.latest_step() is not None, "a checkpoint from before the divergence is kept"
    like = ckpt.manager.item_metadata(ckpt.latest_step())["state"]
    state, _ = ckpt.restore(jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), like))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
    logged = [r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl") if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in logged)


def test_epochs_set_the_steps_and_the_schedule(tiny_model, tmp_path):
    """--epochs: the run takes the batches of that many epochs (counted after packing), and the cosine schedule
    ends with them; an explicit --steps would win (RunConfig.epochs None)."""
    data = tmp_path / "dates.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Write {d} March {1950 + d} as ISO.",
                                        "output": f"{1950 + d}-03-{d:02d}"}) + "\n" for d in range(1, 29)))
    cfg = RunConfig(out=str(tmp_path / "ep"), model=tiny_model, dataset=str(data), epochs=2, batch_size=4, seq_len=64,
                    lr=5e-3, warmup_steps=1, eval_examples=0, save_every=0, progress=False)
    run_finetune(cfg, LORA, kw_lora())
    records = [r for r in read_metrics(tmp_path / "ep" / "metrics.jsonl") if "loss" in r]
    per_epoch = len(prepare_data(cfg, load_tokenizer_from(tiny_model)).batcher.epoch_widths(1))
    assert per_epoch >= 2 and [r["step"] for r in records] == list(range(1, 2 * per_epoch + 1))
    assert records[-1]["lr"] < 0.1 * 5e-3  # the cosine ends with the epochs' steps (over 200 it would barely move)
