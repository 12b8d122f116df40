"""The memory planner: exact bytes on a tiny config (by hand and against the real abstract train state),
the plan against XLA's compiled memory analysis of the real train step, and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.models.config import LlamaConfig
from jaxpeft.plan import PRESETS, PlanConfig, nf4_bytes, plan_memory, resolve_model
from jaxpeft.plan.analytic import layer_count_scaled

ROOT = Path(__file__).resolve().parents[1]
# Odd, distinct sizes: V 101, D 24, I 40, 2 layers, 4 heads of 6 (Q = 24), 2 kv heads (C = 12).
TINY = LlamaConfig(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=6)
TINY_BIASED_TIED = LlamaConfig(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=6, attention_bias=True,
                               o_proj_bias=True, tie_word_embeddings=True)


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "experiments.memory", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"experiments.memory {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_nf4_bytes_by_hand():
    # 4096 x 4096: 8,388,608 packed bytes, 262,144 uint8 absmax codes, 1,024 fp32 nested absmax, an fp32 offset.
    assert nf4_bytes(4096 * 4096) == 8_388_608 + 262_144 + 4 * 1_024 + 4
    assert nf4_bytes(4096 * 4096, double_quant=False) == 8_388_608 + 4 * 262_144
    assert nf4_bytes(7, blocksize=64) == 4 + 1 + 4 + 4  # odd count: the last byte is half padding
    assert nf4_bytes(64 * 256 + 1, blocksize=64) == 8193 + 257 + 4 * 2 + 4  # 257 blocks spill a second nested block


def test_nf4_bytes_match_quantized4bit():
    from jaxpeft.quant import quantize_kernel

    for shape, blocksize, dq in [((33, 17), 64, True), ((40, 52), 32, False), ((300, 97), 64, True)]:
        q = jax.eval_shape(lambda w, b=blocksize, d=dq: quantize_kernel(w, blocksize=b, double_quant=d),
                           jax.ShapeDtypeStruct(shape, np.float32))
        assert q.nbytes == nf4_bytes(shape[0] * shape[1], blocksize=blocksize, double_quant=dq), shape


def test_tiny_config_weights_gradients_optimizer_by_hand():
    # Kernels per layer: q 24x24=576, k 24x12=288, v 288, o 576, gate/up/down 24x40=960 each: 4608.
    # Base: embed 101x24=2424 + lm_head 2424 + norms 5x24=120 + 2x4608 = 14184 parameters.
    # LoRA r=3 on q,k,v,o: 3x(24+24) + 3x(24+12) + 3x(24+12) + 3x(24+24) = 504 a layer, 1008 in all.
    lora = plan_memory(TINY, PlanConfig(method="lora", rank=3, batch_size=2, seq_len=8, dtype="float32",
                                        param_dtype="float32"))
    assert (lora.base_params, lora.trainable_params) == (14184, 1008)
    assert lora.weight_bytes == 4 * 14184 + 4 * 1008 + 4 * 8  # fp32 base, fp32 A/B, 8 fp32 lora_scale scalars
    assert lora.gradients == 4 * 1008
    assert lora.optimizer == 2 * 4 * 1008 + 8  # mu and nu in fp32, two int32 step counts
    assert lora.misc == 3 * 4 * 2 * 8 + 8 + 4  # input_ids/attention_mask/loss_mask int32 [1,2,8], rng key, step

    full = plan_memory(TINY, PlanConfig(method="full", batch_size=2, seq_len=8))  # bf16 params
    assert full.trainable_params == 14184
    assert (full.weight_bytes, full.gradients, full.optimizer) == (2 * 14184, 2 * 14184, 4 * 14184 + 8)

    # NF4, blocksize 64, double quant: q/o 576 -> 288+9+4+4 = 305; k/v 288 -> 144+5+4+4 = 157; gate/up/down 960
    # -> 480+15+4+4 = 503; a layer 2433. Embeddings, lm_head and norms (4968 parameters) stay bf16.
    qlora = plan_memory(TINY, PlanConfig(method="qlora", rank=3, batch_size=2, seq_len=8))
    assert qlora.weights[0].nbytes == 2 * 2433
    assert qlora.weights[1].nbytes == 2 * 4968
    assert qlora.weight_bytes == 2 * 2433 + 2 * 4968 + 4 * 1008 + 4 * 8


def test_tiny_config_activations_by_hand():
    # fp32, B=2, S=8 (T=16), LoRA r=3 on q,k,v,o: saved a layer = residual 2x16x24 + q/k/v 16x(3x24+2x12)
    # + exp(scores) 2x4x8x8 + MLP 4x16x40 + normed x 16x24 + attention output 16x24 + x A 4x16x3, times 4 bytes.
    p = plan_memory(TINY, PlanConfig(method="lora", rank=3, batch_size=2, seq_len=8, dtype="float32",
                                     param_dtype="float32"))
    per_layer = 4 * (2 * 16 * 24 + 16 * 96 + 2 * 4 * 64 + 4 * 16 * 40 + 16 * 24 + 16 * 24 + 4 * 16 * 3)
    assert p.saved_per_layer == per_layer and p.activations == 2 * per_layer
    assert p.head == 16 * 101 * 4 + 2 * 16 * 24 * 4  # K = 16 target slots (2 x 7 rounded up to 8)
    remat = plan_memory(TINY, PlanConfig(method="lora", rank=3, batch_size=2, seq_len=8, dtype="float32",
                                         param_dtype="float32", remat=True))
    assert remat.saved_per_layer == 16 * 24 * 4  # only each layer's input
    assert remat.activations == 2 * 16 * 24 * 4 + per_layer  # plus one layer rebuilt in its backward


@pytest.mark.parametrize("config", [TINY, TINY_BIASED_TIED], ids=["plain", "biased-tied"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_static_bytes_equal_the_real_abstract_train_state(config, method):
    """The plan's static bytes are the bytes of the real state, frozen tree and batch (eval_shape, no compile)."""
    from jaxpeft.plan.xla import abstract_train_step

    plan = PlanConfig(method=method, rank=3, batch_size=2, seq_len=8, dtype="float32", param_dtype="float32")
    _, args = abstract_train_step(config, plan)
    leaves = jax.tree_util.tree_leaves(args)
    real = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    assert plan_memory(config, plan).static == real


def test_goals_llama7b_qlora_under_5gb_and_70b_under_48gb_with_remat():
    q7 = plan_memory(PRESETS["llama-7b"], PlanConfig(method="qlora", remat=True))
    q70 = plan_memory(PRESETS["llama-70b"], PlanConfig(method="qlora", remat=True))
    assert q7.peak < 5e9 and q70.peak < 48e9
    full7 = plan_memory(PRESETS["llama-7b"], PlanConfig(method="full"))
    # bf16 weights + bf16 Adam mu and nu (static) + bf16 gradients: the article's 8 bytes a parameter.
    n = full7.base_params
    assert (full7.static, full7.gradients) == (6 * n + 8 + full7.misc, 2 * n)


def test_crosscheck_within_10_percent_of_xla_on_a_7b_width_model():
    """Two layers of Llama-2 7B's widths (2.7 GB of state, fp32 as the CPU computes it), LoRA r=16 on q,k,v,o,
    batch 1 x 512: the plan against XLA's memory analysis of the compiled real train step (a fresh process, so
    that the memory-minimising CPU scheduler flag takes effect)."""
    out = _cli("--model=llama-7b", "--method=lora", "--dtype=float32", "--param_dtype=float32", "--crosscheck",
               "--crosscheck_layers=2").stdout
    rows = {m.group(1): tuple(float(x) for x in m.groups()[1:])
            for m in re.finditer(r"^(arguments|activations|peak)\S*(?: \S+)*?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                                 out, re.M)}
    assert set(rows) == {"arguments", "activations", "peak"}, out
    assert rows["arguments"][1] >= 1.0  # at least 1 GB of state
    assert rows["arguments"][2] == 1.0  # weights, optimizer state and batch: exact
    assert abs(rows["peak"][2] - 1) <= 0.10, out
    assert abs(rows["activations"][2] - 1) <= 0.15, out  # temps alone (XLA's packing adds a few %)
    assert out.rstrip().splitlines()[-1].startswith("peak: ")


@pytest.mark.slow
@pytest.mark.parametrize("model,method,layers,remat", [
    ("llama-7b", "full", 1, False), ("llama-7b", "lora", 2, True), ("llama-7b", "qlora", 2, False),
    ("llama-13b", "lora", 2, False), ("llama-70b", "lora", 1, False), ("llama-70b", "lora", 2, True)])
def test_crosscheck_other_shapes(model, method, layers, remat):
    out = _cli(f"--model={model}", f"--method={method}", "--dtype=float32", "--param_dtype=float32", "--crosscheck",
               f"--crosscheck_layers={layers}", f"--{'' if remat else 'no'}remat").stdout
    ratio = float(re.search(r"^peak\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.M).group(1))
    assert abs(ratio - 1) <= 0.10, out


@pytest.mark.slow
def test_plan_scales_per_layer_like_xla():
    """What one more layer adds: the plan's increment against XLA's, on 7B widths (in this process, so with
    whatever CPU scheduler XLA_FLAGS set; both agree within 10 %)."""
    from jaxpeft.plan.xla import compiled_memory

    plan = PlanConfig(method="lora", dtype="float32", param_dtype="float32")
    one, two = (layer_count_scaled(PRESETS["llama-7b"], n) for n in (1, 2))
    xla_step = compiled_memory(two, plan).total - compiled_memory(one, plan).total
    plan_step = plan_memory(two, plan).peak - plan_memory(one, plan).peak
    assert abs(plan_step / xla_step - 1) <= 0.10


def test_cli_table_has_every_model_and_the_articles_figures():
    out = _cli().stdout
    for model in PRESETS:
        assert re.search(rf"^{model}\s+\|", out, re.M), out
    row7 = re.search(r"^llama-7b\s+\|(.*)$", out, re.M).group(1)
    cells = [c.split() for c in row7.split("|")]
    assert [c[-1] for c in cells] == ["~56", "~16", "~6"]  # article figures beside full, lora, qlora
    assert len(cells) == 3 and all(len(c) == 3 for c in cells)  # no remat, remat, article
    assert "full: bfloat16 weights + bfloat16 gradients + bfloat16 AdamW moments" in out


def test_cli_breakdown_ends_with_the_peak_line(tmp_path):
    out = _cli("--model=llama-7b", "--method=qlora", "--remat").stdout
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(r"peak: \d+\.\d\d GB", last), last
    expected = plan_memory(PRESETS["llama-7b"], PlanConfig(method="qlora", remat=True)).peak
    assert float(last.split()[1]) == pytest.approx(expected / 1e9, abs=0.006)
    assert "NF4" in out and "backward of layer" in out


def test_a_config_json_path_plans_like_the_config_it_holds(tmp_path):
    from tests.hf_tiny import tiny_hf_config

    tiny_hf_config(layers=2).to_json_file(str(tmp_path / "config.json"))
    label, config = resolve_model(str(tmp_path))
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (40, 1, 8) and label == str(tmp_path)
    # --param_dtype/--dtype auto: the folder's config.json dtype; none declared here: float32, as transformers.
    assert not {k for k in json.loads((tmp_path / "config.json").read_text()) if "dtype" in k}
    out = _cli(f"--model={tmp_path / 'config.json'}", "--method=lora", "--rank=4").stdout
    expected = plan_memory(config, PlanConfig(method="lora", rank=4, dtype="float32", param_dtype="float32")).peak
    assert float(out.rstrip().splitlines()[-1].split()[1]) == pytest.approx(expected / 1e9, abs=0.006)
    out = _cli(f"--model={tmp_path}", "--method=lora", "--rank=4", "--param_dtype=bfloat16").stdout
    expected = plan_memory(config, PlanConfig(method="lora", rank=4)).peak  # the compute dtype follows: bf16
    assert float(out.rstrip().splitlines()[-1].split()[1]) == pytest.approx(expected / 1e9, abs=0.006)


def test_bad_model_errors_clearly(tmp_path):
    proc = _cli("--model=llama-8b", "--method=lora", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "llama-8b" in proc.stderr and "llama-7b, llama-13b, llama-70b" in proc.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    with pytest.raises(ConfigError, match="bert"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="lacks"):
        resolve_model(str(tmp_path))
    with pytest.raises(ConfigError, match="rank 64 > min"):
        plan_memory(TINY, PlanConfig(rank=64))
    with pytest.raises(ConfigError, match="method='dora'"):
        PlanConfig(method="dora")


def test_crosscheck_of_a_small_width_two_layer_moe_within_10_percent_of_xla(tmp_path):
    """Mixtral-8x7B's layout at small widths (hidden 512, 8 experts of 1024, top-2, vocab 4096, 2 layers), LoRA, fp32,
    1 x 512: the arguments (expert stacks counted whole) exact, the peak within the dense tests' 10 %."""
    import dataclasses

    config = dataclasses.replace(PRESETS["mixtral-8x7b"], num_hidden_layers=2, hidden_size=512, intermediate_size=1024,
                                 moe_intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                 head_dim=64, vocab_size=4096)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    out = _cli(f"--model={tmp_path}", "--method=lora", "--dtype=float32", "--param_dtype=float32", "--crosscheck",
               "--crosscheck_layers=0").stdout
    rows = {m.group(1): tuple(float(x) for x in m.groups()[1:])
            for m in re.finditer(r"^(arguments|activations|peak)\S*(?: \S+)*?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                                 out, re.M)}
    assert set(rows) == {"arguments", "activations", "peak"}, out
    assert rows["arguments"][2] == 1.0, out
    assert abs(rows["peak"][2] - 1) <= 0.10, out
    assert "active per token" in out, out
