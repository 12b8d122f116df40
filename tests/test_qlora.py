"""QLoRA: LoRA on a 4-bit base trains, merges to a dense HF folder that transformers runs, and has a CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.convert.bnb import Bnb4bitConfig
from jaxpeft.convert.load import QuantizedBaseLoader
from jaxpeft.methods.lora import load_peft_adapter
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.quant import Quantized4bit, quantize_params
from jaxpeft.train import optim
from jaxpeft.train.loop import TrainConfig, Trainer
from tests.cli import run_entry, run_module
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits

torch = pytest.importorskip("torch")
LORA = get_method("lora")
QUANT_FLAGS = ("--quant_type=fp4", "--blocksize=32")  # not the defaults, so the flags are seen to arrive


def _cli(*args, check=True):
    """The subprocess smoke test of `python -m experiments.qlora` (the bad --blocksize)."""
    return run_module("experiments.qlora", *args, check=check, timeout=600)


def test_qlora_training_lowers_the_loss_and_keeps_the_base_quantized(tiny_base):
    _, model, params = tiny_base(seed=3, layers=2)
    qparams = quantize_params(params, blocksize=32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    adapted = LORA.init(jax.random.PRNGKey(0), qparams, cfg)
    trainer = Trainer(model, adapted, LORA.labels(adapted, cfg),
                      optim_cfg=optim.OptimConfig(lr=1e-2, total_steps=8, warmup_steps=0),
                      train_cfg=TrainConfig(steps=8, batch_size=4), max_targets=24)
    ids = np.random.default_rng(0).integers(3, VOCAB, (4, 10)).astype(np.int32)
    mask = np.zeros_like(ids)
    mask[:, 5:] = 1
    batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": np.ones_like(ids)}
    losses = [trainer.train_step(batch)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1, losses
    before, after = flatten_params(adapted), flatten_params(trainer.params())
    quantized = [p for p in before if p[-1] == "qkernel"]
    assert len(quantized) == 2 * 7
    for p in quantized:  # the 4-bit base is frozen: same codes and statistics
        assert isinstance(after[p], Quantized4bit)
        jax.tree.map(np.testing.assert_array_equal, after[p], before[p])
    assert all(after[p].dtype == jnp.float32 for p in after if p[-1] in ("lora_a", "lora_b"))


def test_unsupported_blocksize_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"blocksize 48: bitsandbytes accepts \[32, 64, 128"):
        Bnb4bitConfig(blocksize=48)
    with pytest.raises(ConfigError) as both:  # every problem at once
        Bnb4bitConfig(blocksize=100, quant_type="int4")
    assert "blocksize 100" in str(both.value) and "'int4'" in str(both.value)
    proc = _cli("--blocksize=48", "--out=/nonexistent/never-written", check=False)
    assert proc.returncode == 2 and "blocksize 48" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("qlora")
    model = tiny_model_dir
    out = root / "run"
    proc = run_entry("experiments.qlora", f"--model={model}", "--rank=4", "--steps=3", "--batch_size=4",
                     "--eval_examples=4", "--lr=1e-2", "--warmup_steps=0", "--save_every=0", f"--out={out}",
                     "--save_merged", "--noprogress", *QUANT_FLAGS)
    return model, out, proc


def test_qlora_cli_writes_the_run_folder(trained):
    model, out, proc = trained
    assert "eval_exact_match" in proc.stdout and "before" in proc.stdout
    for name in ("config.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "metrics.jsonl", "results.json", "merged/config.json", "merged/model.safetensors"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["base_loader"] == {
        "quantization": {"quant_type": "fp4", "blocksize": 32, "double_quant": True, "targets": "all-linear"}}
    q = config["quantization"]
    assert (q["source"], q["quant_type"], q["blocksize"], q["quantized_modules"]) == (
        "quantized on load", ["fp4"], [32], 2 * 7)
    assert 0 < q["base_param_bytes"]["quantized"] < q["base_param_bytes"]["float32"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == model
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())


def test_merged_folder_equals_the_qlora_model(trained):
    model_dir, out, _ = trained
    loader = QuantizedBaseLoader(Bnb4bitConfig(quant_type="fp4", blocksize=32))
    model, qparams, _, _ = loader(model_dir, dtype=jnp.float32)
    _, adapted, _ = load_peft_adapter(out / "adapter", model, qparams)
    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (2, 13))
    ours = np.asarray(model.apply({"params": adapted}, jnp.asarray(ids)))
    base = np.asarray(model.apply({"params": qparams}, jnp.asarray(ids)))
    assert np.abs(ours - base).max() > 1e-3  # the adapter was trained: merged/ is not just the base
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(merged, ids), ours, **tolerances.LOGITS_FP32)


def test_quantized_train_step_dequantizes_one_layer_at_a_time():
    """XLA must not hoist (and share between forward and backward) every layer's dequantization: the
    compiled step of a 4-bit base may hold at most about one layer's dense weights more than the
    step of the dense base, whose weights are arguments (compiled memory analysis, no run)."""
    from jaxpeft.core.partition import combine, split_trainable
    from jaxpeft.models.config import LlamaConfig
    from jaxpeft.models.llama import LlamaForCausalLM
    from jaxpeft.train.step import token_nll_sum

    layers, hidden, inter = 6, 256, 768
    cfg = LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": hidden,
                               "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
                               "num_key_value_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-5})
    model = LlamaForCausalLM(cfg)
    ids = jnp.zeros((2, 16), jnp.int32)
    dense = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    dense = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), dense)
    batch = {"input_ids": ids, "loss_mask": jnp.ones_like(ids), "attention_mask": jnp.ones_like(ids)}
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")

    def temp_bytes(params):
        params = LORA.init(jax.random.PRNGKey(1), params, lora_cfg)
        trainable, frozen = split_trainable(params, LORA.labels(params, lora_cfg))
        loss = lambda t, f: token_nll_sum(model, combine(f, t), batch, 16)[0]  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(trainable, frozen).compile().memory_analysis().temp_size_in_bytes

    layer_bytes = 4 * (4 * hidden * hidden + 3 * hidden * inter)
    extra = temp_bytes(quantize_params(dense)) - temp_bytes(dense)
    assert extra < 1.5 * layer_bytes, f"{extra / 1e6:.1f} MB more temporaries (one layer: {layer_bytes / 1e6:.1f} MB)"
