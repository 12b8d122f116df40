"""Every family of the table beyond Llama's own, against transformers and PEFT: logits, greedy generation,
HF folders both ways, PEFT folders both ways (LoRA/DoRA, IA3, prefix, prompt) and default targets.

One shared tiny model per family (`hf_tiny.FAMILY_CASES`, with the family's features on: windows shorter than
the sequences, heads whose width is not hidden / heads, tied heads); a new family joins by adding a case.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_pretrained, from_transformers, save_hf_folder
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.methods.prefix import PrefixConfig
from jaxpeft.methods.prompt import PromptConfig
from jaxpeft.models.causal_lm import default_positions
from jaxpeft.models.families import FAMILIES, default_targets
from jaxpeft.models.generate import generate
from tests import tolerances
from tests.hf_tiny import FAMILY_CASES, FAMILY_VARIANTS, VOCAB, hf_greedy_left_padded, hf_logits, tiny_hf_config, tiny_hf_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

# MoE families (mixtral, qwen3_moe) have their own file, tests/test_moe.py: this battery's all-linear DoRA cases
# cannot be made by PEFT 0.21.2 there (its all-linear adds the router as a target parameter, which refuses DoRA),
# PEFT's IA3 defaults name the per-expert w2 Linear that transformers 5.24 no longer has, and bitsandbytes
# quantizes only the attention linears (fused experts and the router are no nn.Linear).
NAMES = sorted(n for n in FAMILY_CASES if n not in ("mixtral", "qwen3_moe"))
LLAMA_LIKE = {"llama", "mistral", "qwen2"}  # tested by test_llama_parity.py and the rest of the suite
# One input shape for every forward of a family's tests (op-by-op executables are cached by shape): past every
# tiny window (5, 7) and Phi-3's original context (20).
IDS = np.random.default_rng(0).integers(3, VOCAB, (3, 23))


def test_every_family_of_the_table_has_a_tiny_case():
    assert set(FAMILIES) - LLAMA_LIKE == set(FAMILY_CASES)  # MoE ones included (tests/test_moe.py runs them)


def _logits(model, params, ids=IDS, mask=None):
    kw = {} if mask is None else {"attention_mask_BxS": jnp.asarray(mask)}
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), **kw))


def _padded_batch(length: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = IDS if length == IDS.shape[1] else rng.integers(3, VOCAB, (3, length))
    mask = np.ones((3, length), np.int64)
    mask[0, : length // 3] = 0  # left padded
    mask[1, length - length // 4:] = 0  # right padded
    return ids, mask


def _check_parity(hf, model, params, length: int):
    """Rows left padded, right padded and full (one row without padding when `length` is 1)."""
    ids, mask = _padded_batch(length, seed=length)
    if length == 1:
        mask[:] = 1
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    ours = _logits(model, params, ids, mask)
    theirs = hf_logits(hf, ids, mask, positions)
    real = mask.astype(bool)  # padded query rows are undefined in both libraries
    chex.assert_trees_all_close(ours[real], theirs[real], **tolerances.LOGITS_FP32)


# Lengths: past every tiny window several times over (and past Phi-3's original context); one token and 9 (about
# two windows) run as slow, each a new shape to compile (~5-10 s a family on 2 shared cores).
LENGTHS = [23] + [pytest.param(n, marks=pytest.mark.slow(reason="another length: a new shape to compile"))
                  for n in (1, 9)]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_with_padding(family_base, name, length):
    _check_parity(*family_base(name), length)


@pytest.mark.parametrize("variant", sorted(FAMILY_VARIANTS))
def test_other_variants_match_transformers(variant):
    hf = tiny_hf_model(tiny_hf_config(**FAMILY_VARIANTS[variant]), seed=2)
    _check_parity(hf, *from_transformers(hf), 23)


@pytest.mark.slow(reason="one more forward per switch and family; the parity above is the contract")
@pytest.mark.parametrize("name", NAMES)
def test_the_windows_and_caps_matter(family_base, name):
    """On a sequence longer than the window, dropping the window (every layer full), or a soft cap, changes the
    logits: the parity above checks the windowed layers and the caps."""
    hf, model, params = family_base(name)
    windows = model.config.layer_windows()
    assert any(windows), f"{name}'s tiny case should have windowed layers"
    if model.config.layer_types:  # a family of per-layer kinds: both kinds, so the alternation matters
        assert not all(windows), f"{name}'s tiny case should mix windowed and full layers"
    ids = IDS
    changes = {"window": dict(layer_types=(), sliding_window=None)}
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(model.config, cap, None) is not None:
            changes[cap] = {cap: None}
    ours = _logits(model, params, ids)
    for what, change in changes.items():
        other = model.clone(config=dataclasses.replace(model.config, **change))
        assert np.abs(_logits(other, params, ids) - ours).max() > 1e-3, what


# Greedy generation costs 15-25 s of CPU a family (a prefill and a decode step compiled per family): the default
# run generates with Qwen3 (q/k norms) and Gemma 2 (soft-capping, sliding windows, the widest departure from
# Llama); Phi-3 and Gemma 3, whose logits are matched with padding above, generate in the slow run.
GREEDY_NAMES = [n if n in ("qwen3", "gemma2") else pytest.param(n, marks=pytest.mark.slow(reason="see GREEDY_NAMES"))
                for n in NAMES]


@pytest.mark.parametrize("name", GREEDY_NAMES)
def test_greedy_generation_matches_transformers_batched_with_left_padding(family_base, name):
    hf, model, params = family_base(name)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (4, 13)]  # 13 > every tiny window
    theirs = hf_greedy_left_padded(hf, prompts, 24)
    assert generate(model, params, prompts, max_new_tokens=24) == theirs
    recompute = model.config.generation_recompute_length()
    if recompute is not None and model.config.rope_type == "longrope":
        width = max(map(len, prompts))
        assert width < recompute + 1 < width + 24, "the generation should cross the LongRoPE switch"


@pytest.mark.parametrize("name", NAMES)
def test_hf_folders_both_ways(family_base, name, tmp_path):
    import transformers

    hf, model, params = family_base(name)
    hf.save_pretrained(tmp_path / "theirs")
    loaded_model, loaded, _ = from_pretrained(str(tmp_path / "theirs"), load_tokenizer=False)
    assert loaded_model.config == model.config
    chex.assert_trees_all_equal(loaded, params)
    out = save_hf_folder(tmp_path / "ours", params, model.config)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(again) is type(hf)
    chex.assert_trees_all_close(hf_logits(again, IDS), _logits(model, params), **tolerances.LOGITS_FP32)


def test_the_text_part_of_a_gemma3_checkpoint_loads_and_the_vision_tower_is_skipped(family_base, tmp_path, caplog):
    """A tiny Gemma3ForConditionalGeneration (its language model the shared gemma3_text case): from_pretrained
    gives its text-only logits (which transformers computes without the final soft cap)."""
    import transformers

    hf_text, _, _ = family_base("gemma3_text")
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=hf_text.config.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=60, boi_token_index=58,
                                       eoi_token_index=59)
    torch.manual_seed(0)
    mm = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for pname, p in mm.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    mm.save_pretrained(tmp_path / "mm")
    with caplog.at_level(logging.INFO):
        model, params, _ = from_pretrained(str(tmp_path / "mm"), load_tokenizer=False)
    assert model.config.model_type == "gemma3_text" and model.config.final_logit_softcapping is None
    assert any("vision tower" in r.getMessage() for r in caplog.records)
    ids = np.where(IDS >= 58, IDS - 10, IDS)  # no image tokens (58-60)
    with torch.no_grad():
        theirs = mm(input_ids=torch.tensor(ids)).logits.numpy()
    chex.assert_trees_all_close(_logits(model, params, ids), theirs, **tolerances.LOGITS_FP32)


def test_an_unsupported_field_is_named():
    from jaxpeft.core.errors import UnsupportedModelError
    from jaxpeft.models.families import config_from_hf

    for name in NAMES:
        hf = tiny_hf_config(**FAMILY_CASES[name]).to_dict()
        with pytest.raises(UnsupportedModelError, match="frobnicate"):
            config_from_hf({**hf, "frobnicate": 3})


# --- PEFT folders with the family's module names --------------------------------------------------------------

def _peft_load(hf, folder, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder)).eval()
    notes = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [n for n in notes if "missing" in n.lower() and "key" in n.lower()], notes
    return pm


def _randomised(params, method, cfg, seed):
    """The method's init with every added leaf moved off its identity value, so the output changes."""
    flat = flatten_params(method.init(jax.random.key(seed), params, cfg))
    base = flatten_params(params)
    rng = np.random.default_rng(seed)
    for path, v in flat.items():
        if path not in base and path[-1] != "lora_scale" and jnp.issubdtype(v.dtype, jnp.floating):
            noise = rng.standard_normal(v.shape).astype(np.float32)
            flat[path] = v + 0.3 * noise if path[-1] == "lora_b" else v * (1.0 + 0.2 * noise)
    return unflatten_params(flat)


def _method_cases(name):
    lora, ia3 = default_targets(FAMILY_CASES[name]["model_type"], "lora"), default_targets(
        FAMILY_CASES[name]["model_type"], "ia3")
    return {
        "lora-dora": ("lora", LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules="all-linear")),
        "lora-default": ("lora", LoraConfig(r=2, lora_alpha=4, **lora)),
        "ia3-default": ("ia3", IA3Config(**ia3)),
        "prefix": ("prefix", PrefixConfig(num_virtual_tokens=3)),
        "prompt": ("prompt", PromptConfig(num_virtual_tokens=3)),
    }


def _slow(*values, reason):
    return pytest.param(*values, marks=pytest.mark.slow(reason=reason))


# The default run keeps one adapter each way per family (DoRA on every linear); the other methods run as slow.
_MORE = "another method's folder: ~2-20 s a family on 2 shared cores"
CASES = [(n, "lora-dora") for n in NAMES] + [_slow(n, c, reason=_MORE) for n in NAMES
                                              for c in ("lora-default", "ia3-default", "prefix", "prompt")]


def _ids_for(model, method_name: str) -> np.ndarray:
    """IDS, but within the original context for prompt tuning on LongRoPE: PEFT runs the virtual tokens in one call
    with the real ones (so past the switch they take the long factors too); we compute them on their own, at
    positions 0..P-1 (short factors). See BUILD_NOTES Known limits."""
    if method_name == "prompt" and model.config.rope_type == "longrope":
        return IDS[:, : model.config.original_max_position_embeddings - 4]
    return IDS


@pytest.mark.parametrize("name,case", CASES)
def test_our_peft_folder_loads_in_peft_with_the_same_logits(family_base, name, case, tmp_path, caplog):
    hf, model, params = family_base(name)
    method_name, cfg = _method_cases(name)[case]
    method = get_method(method_name)
    adapted = _randomised(params, method, cfg, seed=len(case))
    ids = _ids_for(model, method_name)
    ours = _logits(model, adapted, ids)
    assert np.abs(ours - _logits(model, params, ids)).max() > 1e-3, "the adapter must move the output"
    method.save(tmp_path / "a", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    pm = _peft_load(hf, tmp_path / "a", caplog)
    virtual = getattr(cfg, "num_virtual_tokens", 0) if method_name == "prompt" else 0
    theirs = hf_logits(pm, ids, np.ones_like(ids))[:, virtual:]
    chex.assert_trees_all_close(theirs, ours, **tolerances.LOGITS_FP32)


PEFT_MADE = {
    "lora-dora": lambda model_type: peft.LoraConfig(task_type="CAUSAL_LM", r=3, lora_alpha=6, use_dora=True,
                                         init_lora_weights=False, target_modules="all-linear"),
    # PEFT's own default targets for the family (ours where PEFT has none: Phi-3)
    "ia3": lambda model_type: peft.IA3Config(task_type="CAUSAL_LM", **(
        {} if model_type in peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
        else {k: list(v) for k, v in default_targets(model_type, "ia3").items()})),
    "prefix": lambda model_type: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prompt": lambda model_type: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


@pytest.mark.parametrize("name,case", [(n, "lora-dora") for n in NAMES] + [
    _slow(n, c, reason=_MORE) for n in NAMES for c in ("ia3", "prefix", "prompt")])
def test_peft_made_adapter_loads_with_the_same_logits(family_base, name, case, tmp_path):
    from jaxpeft.methods import load_adapter

    hf, model, params = family_base(name)
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(hf), PEFT_MADE[case](model.config.model_type))
    with torch.no_grad():  # move IA3 scales and DoRA magnitudes off their identity values
        for pname, p in pm.named_parameters():
            if "ia3_l" in pname or "lora_magnitude_vector" in pname:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    virtual = 3 if case == "prompt" else 0
    ids = _ids_for(model, case)
    expected = hf_logits(pm, ids, np.ones_like(ids))[:, virtual:]
    _, loaded_model, loaded, _ = load_adapter(tmp_path / "peft", model, params)
    chex.assert_trees_all_close(_logits(loaded_model, loaded, ids), expected, **tolerances.LOGITS_FP32)


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_are_peft_own_and_exist_in_the_model(family_base, name):
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as IA3_FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_T,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_T)

    model_type = FAMILY_CASES[name]["model_type"]
    family = FAMILIES[model_type]
    if model_type in LORA_T:
        assert list(family.lora_targets) == LORA_T[model_type]
    if model_type in IA3_T:
        assert (list(family.ia3_targets), list(family.ia3_feedforward)) == (IA3_T[model_type], IA3_FF[model_type])
    _, _, params = family_base(name)
    get_method("lora").init(jax.random.key(0), params, LoraConfig(**default_targets(model_type, "lora")))
    get_method("ia3").init(jax.random.key(0), params, IA3Config(**default_targets(model_type, "ia3")))


@pytest.mark.parametrize("name", NAMES)
def test_a_target_that_matches_no_module_is_named(family_base, name):
    _, _, params = family_base(name)
    with pytest.raises(ConfigError, match="wq_proj"):
        get_method("lora").init(jax.random.key(0), params, LoraConfig(target_modules=("q_proj", "wq_proj")))


# --- bitsandbytes 4-bit folders, QLoRA, sharding ----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(family_base, tmp_path_factory):
    """`(family) -> folder`: the family's shared tiny model saved as an HF folder (fp32), once per module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = tmp_path_factory.mktemp(f"{name}-fp32")
            family_base(name)[0].save_pretrained(built[name])
        return built[name]

    return get


@pytest.mark.parametrize("name", NAMES[-1:] + [_slow(n, reason="4-bit folders of another family: ~5-30 s")
                                          for n in NAMES[:-1]])
def test_bnb_4bit_folders_both_ways(family_base, hf_folder, name, tmp_path):
    """Our NF4 folder loads in transformers + bitsandbytes with the logits of bitsandbytes' own quantization
    (within 1e-3), and transformers' NF4 folder loads here with its exact codes."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from jaxpeft.convert.bnb import load_bnb_folder, save_bnb_folder
    from jaxpeft.quant import quantize_params

    _, model, params = family_base(name)
    n_linears = model.config.num_hidden_layers * len(FAMILIES[model.config.model_type].linears)

    def hf_4bit(folder, **kw):
        hf = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", attn_implementation="eager",
                                                  **kw).eval()
        linears = [m for m in hf.modules() if isinstance(m, bnb.nn.Linear4bit)]
        for m in linears:  # bitsandbytes' reference CPU path (see tests/test_bnb.py)
            m.support_avx512bf16_for_cpu = False
        assert len(linears) == n_linears
        return hf

    with torch._dynamo.config.patch(disable=True):
        theirs = hf_4bit(hf_folder(name), quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
        qparams = quantize_params(params)
        ours = save_bnb_folder(tmp_path / "ours", qparams, model.config)
        np.testing.assert_allclose(hf_logits(hf_4bit(ours), IDS), hf_logits(theirs, IDS), atol=1e-3)
        theirs.save_pretrained(tmp_path / "theirs")
        loaded_model, loaded, _ = load_bnb_folder(tmp_path / "theirs", load_tokenizer=False)
        np.testing.assert_allclose(_logits(loaded_model, loaded), hf_logits(theirs, IDS), **tolerances.LOGITS_FP32)


@pytest.mark.slow(reason="an experiments.qlora run per family (~60 s on 2 cores)")
@pytest.mark.parametrize("name", NAMES)
def test_qlora_run_lowers_the_loss_and_its_merged_export_loads_in_transformers(name, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from tests.cli import run_entry
    from tests.hf_tiny import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "model", layers=2, seed=1, family=name)
    out = tmp_path / "run"
    targets = ",".join(default_targets(FAMILY_CASES[name]["model_type"], "lora")["target_modules"])
    run_entry("experiments.qlora", f"--model={folder}", f"--targets={targets}", "--rank=4", "--steps=12",
              "--batch_size=4",
              "--eval_examples=4", "--lr=3e-2", "--warmup_steps=0", "--save_every=0", f"--out={out}",
              "--save_merged", "--noprogress")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0], losses
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), attn_implementation="eager").eval()
    assert merged.config.model_type == FAMILY_CASES[name]["model_type"]


@pytest.mark.slow(reason="a subprocess with 8 fake devices compiling five layouts (~90 s a family on 2 cores)")
@pytest.mark.parametrize("name", NAMES)
def test_8_fake_devices_give_the_one_device_losses(name):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_sharding import FAKE_DEVICES

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": FAKE_DEVICES, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "tests.family_sharding_cases", name], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    curves = json.loads(proc.stdout)
    one = curves.pop("one_device")
    for layout, curve in curves.items():
        np.testing.assert_allclose(curve["loss"], one["loss"], atol=1e-5, err_msg=layout)


# --- planner presets ----------------------------------------------------------------------------------------------

# The published configs (config.json of each hub model), built by transformers on the meta device.
PUBLISHED = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256),
    "gemma-3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                        num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256),
    "phi-3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_count_is_transformers_own(preset):
    import transformers

    from jaxpeft.plan import PRESETS, PlanConfig, plan_memory

    kw = dict(PUBLISHED[preset])
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    theirs = sum(p.numel() for p in hf.parameters())
    ours = plan_memory(PRESETS[preset], PlanConfig(method="full")).base_params
    assert abs(ours / theirs - 1) < 1e-3, (ours, theirs)
    if PRESETS[preset].model_type in ("mixtral", "qwen3_moe"):  # the experts counted exactly, every stack whole
        assert ours == theirs, (ours, theirs)


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_moe_preset_active_parameters_count_top_k_experts(preset):
    """Active = total less (E - K) experts per sparse layer, from transformers' own expert tensors (meta device)."""
    import transformers

    from jaxpeft.plan import PRESETS, PlanConfig, plan_memory

    kw = dict(PUBLISHED[preset])
    config = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in hf.parameters())
    e, k = PRESETS[preset].num_experts, PRESETS[preset].num_experts_per_tok
    idle = sum(p.numel() // e * (e - k) for n, p in hf.named_parameters() if ".mlp.experts." in n)
    assert idle > 0
    plan = plan_memory(PRESETS[preset], PlanConfig(method="qlora"))
    assert plan.active_params == total - idle
    # QLoRA: the experts at 4 bits (about half a byte a weight), the router kept in bf16.
    experts = next(i for i in plan.weights if i.name.startswith("expert stacks"))
    assert 0.5 * idle / (e - k) * e < experts.nbytes < 0.6 * idle / (e - k) * e


def test_the_lora_entry_points_default_to_the_family_attention_projections(tmp_path):
    """No --targets: the --model folder's family decides (Phi-3's fused qkv_proj); an explicit one wins."""
    from absl import flags

    from experiments import lora

    def targets(*argv: str):
        fv = flags.FlagValues()
        lora.define_flags(fv)
        fv(["lora", *argv])
        return lora.lora_config_from_flags(fv).target_modules

    folders = {}
    for model_type in ("phi3", "llama", "gemma2"):
        folders[model_type] = tmp_path / model_type
        folders[model_type].mkdir()
        (folders[model_type] / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert targets(f"--model={folders['phi3']}") == ("qkv_proj", "o_proj")
    assert targets(f"--model={folders['llama']}") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert targets(f"--model={folders['gemma2']}") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert targets(f"--model={folders['phi3']}", "--targets=o_proj") == ("o_proj",)
    assert targets() == ("q_proj", "k_proj", "v_proj", "o_proj")  # the default model (SmolLM2, Llama)
