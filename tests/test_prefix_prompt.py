"""Prefix tuning and prompt tuning: parity with the real `peft` both ways, KV-cache generation, packing, errors,
and the two entry points."""

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

from jaxpeft import from_transformers
from jaxpeft.core.errors import CheckpointError, ConfigError
from jaxpeft.core.tree import flatten_params
from jaxpeft.methods import get_method
from jaxpeft.methods.prefix import PrefixConfig
from jaxpeft.methods.prompt import PromptConfig
from jaxpeft.models.generate import generate
from tests.cli import run_entry, run_module as _run
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits, tiny_hf_config, tiny_hf_model, tiny_tokenizer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 9))
PREFIX, PROMPT = get_method("prefix"), get_method("prompt")


def _pair(kv_heads: int = 1, seed: int = 3):
    """A tiny HF Llama (5 query heads of 8: GQA with 1 kv head, or MHA with 5) and its jaxpeft twin."""
    config = tiny_hf_config()
    config.num_key_value_heads = kv_heads
    hf = tiny_hf_model(config, seed=seed)
    return (hf, *from_transformers(hf))


_PAIRS: dict = {}


@pytest.fixture
def pair():
    def get(kv_heads: int = 1):
        if kv_heads not in _PAIRS:
            _PAIRS[kv_heads] = _pair(kv_heads)
        return _PAIRS[kv_heads]
    return get


def _logits(model, params, ids=IDS):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids)))


def _peft_load(hf, folder, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder)).eval()
    notes = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [n for n in notes if "missing" in n.lower() and "key" in n.lower()], notes
    return pm


def _peft_logits(pm, ids, num_virtual_tokens: int, prompt: bool) -> np.ndarray:
    """PEFT's logits on the real tokens (its prompt-tuning logits include the virtual positions first)."""
    out = hf_logits(pm, ids, np.ones_like(ids))
    return out[:, num_virtual_tokens:] if prompt else out


# --- prefix tuning ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads,projection", [(1, False), (5, False), (1, True)])
def test_prefix_export_loads_in_peft_with_the_same_logits(pair, kv_heads, projection, tmp_path, caplog):
    hf, model, params = pair(kv_heads)
    cfg = PrefixConfig(num_virtual_tokens=4, prefix_projection=projection,
                       encoder_hidden_size=11 if projection else None)
    adapted = PREFIX.init(jax.random.key(1), params, cfg)
    ours = _logits(model, adapted)
    assert np.abs(ours - hf_logits(hf, IDS)).max() > 1e-2, "not identity at init: the prefixes move the output"

    PREFIX.save(tmp_path / "a", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (raw["peft_type"], raw["prefix_projection"], raw["token_dim"], raw["num_attention_heads"]) == (
        "PREFIX_TUNING", False, kv_heads * 8, kv_heads)
    assert list(raw) == sorted(raw) and set(raw) <= {f.name for f in dataclasses.fields(peft.PrefixTuningConfig)}
    pm = _peft_load(hf, tmp_path / "a", caplog)
    chex.assert_trees_all_close(_peft_logits(pm, IDS, 4, prompt=False), ours, **tolerances.LOGITS_FP32)

    _, loaded, loaded_cfg = PREFIX.load(tmp_path / "a", model, params)
    assert loaded_cfg == PrefixConfig(num_virtual_tokens=4)  # the projected prefixes, no MLP
    chex.assert_trees_all_close(_logits(model, loaded), ours, **tolerances.LOGITS_FP32)
    if not projection:
        chex.assert_trees_all_equal(loaded, adapted)


@pytest.mark.parametrize("projection", [False, True])
def test_peft_made_prefix_loads_with_the_same_logits(pair, projection, tmp_path):
    hf, model, params = pair(1)
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=13)).eval()
    expected = _peft_logits(pm, IDS, 5, prompt=False)
    pm.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["prefix_projection"] == projection

    _, loaded, cfg = PREFIX.load(tmp_path / "p", model, params)
    assert cfg.num_virtual_tokens == 5
    assert np.abs(expected - hf_logits(hf, IDS)).max() > 1e-2
    chex.assert_trees_all_close(_logits(model, loaded), expected, **tolerances.LOGITS_FP32)


def test_prefix_facts_rotation_and_positions_matter(pair):
    """The parity above pins PEFT's semantics: prefixes unrotated, real positions from P. Either alternative
    (prefix keys rotated at positions 0..P-1, or real positions from 0) moves the logits far past the
    tolerance, so the parity tests would catch it."""
    from jaxpeft.core.tree import unflatten_params
    from jaxpeft.models import ops
    from jaxpeft.models.llama import rope_inv_freq

    _, model, params = pair(5)
    p, c = 6, model.config
    adapted = PREFIX.init(jax.random.key(4), params, PrefixConfig(num_virtual_tokens=p))
    reference = _logits(model, adapted)
    positions = jnp.arange(p)[None]
    cos, sin = ops.rope_cos_sin(positions, rope_inv_freq(c, positions), jnp.float32)
    flat = flatten_params(adapted)
    for path, v in flat.items():
        if path[-1] == "prefix_key":
            k = v.reshape(1, p, c.num_key_value_heads, c.head_dim)
            flat[path] = ops.apply_rope(k, cos, sin).reshape(p, -1)
    assert np.abs(_logits(model, unflatten_params(flat)) - reference).max() > 1e-2
    from_zero = np.asarray(model.apply({"params": adapted}, jnp.asarray(IDS),
                                       positions_BxS=jnp.broadcast_to(jnp.arange(IDS.shape[1]) - p, IDS.shape)))
    assert np.abs(from_zero - reference).max() > 1e-2


# --- prompt tuning ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["random", "vocab", "text"])
def test_prompt_export_loads_in_peft_with_the_same_logits(pair, init, tmp_path, caplog):
    hf, model, params = pair(1)
    cfg = PromptConfig(num_virtual_tokens=5, init=init, init_ids=(4, 9) if init == "text" else None,
                       init_text="to iso" if init == "text" else None)
    adapted = PROMPT.init(jax.random.key(2), params, cfg)
    ours = _logits(model, adapted)
    assert ours.shape == (*IDS.shape, VOCAB)  # outputs for the real tokens only
    assert np.abs(ours - hf_logits(hf, IDS)).max() > 1e-2

    PROMPT.save(tmp_path / "a", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["prompt_tuning_init"] == {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[init]
    assert list(raw) == sorted(raw) and set(raw) <= {f.name for f in dataclasses.fields(peft.PromptTuningConfig)}
    pm = _peft_load(hf, tmp_path / "a", caplog)
    chex.assert_trees_all_close(_peft_logits(pm, IDS, 5, prompt=True), ours, **tolerances.LOGITS_FP32)

    _, loaded, loaded_cfg = PROMPT.load(tmp_path / "a", model, params)
    chex.assert_trees_all_equal(loaded, adapted)
    assert (loaded_cfg.num_virtual_tokens, loaded_cfg.init) == (5, init)


def test_text_init_embeds_the_text_as_peft_does_and_peft_made_prompts_load(tiny_folder, tmp_path):
    """PEFT's TEXT init (tokenize, repeat, cut to P) gives the same embeddings as prepare + init here; the
    folder PEFT writes loads with the same logits."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_folder)
    model, params = from_transformers(hf)
    text = "ISO date"
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=tiny_folder)).eval()
    cfg = PROMPT.prepare(PromptConfig(num_virtual_tokens=7, init="text", init_text=text), model_config=model.config,
                         tokenizer=tok)
    assert 1 < len(cfg.init_ids) < 7  # repeated to fill the prompt
    ours = PROMPT.init(jax.random.key(0), params, cfg)["prompt"]["embeddings"]
    theirs = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(ours), theirs)

    with torch.no_grad():  # move off the init so the comparison covers trained values
        weight = pm.prompt_encoder["default"].embedding.weight
        weight.add_(0.5 * torch.randn_like(weight))
    expected = _peft_logits(pm, IDS, 7, prompt=True)
    pm.save_pretrained(tmp_path / "p")
    _, loaded, loaded_cfg = PROMPT.load(tmp_path / "p", model, params)
    assert (loaded_cfg.init, loaded_cfg.init_text) == ("text", text)
    chex.assert_trees_all_close(_logits(model, loaded), expected, **tolerances.LOGITS_FP32)


# --- generation, packing ---------------------------------------------------------------------------------------

def _peft_greedy(pm, prompt, n, num_virtual_tokens, is_prompt):
    """Greedy decoding by PEFT's forward, one full pass per token. (PEFT 0.21.2's `generate` is no oracle with
    transformers 5.24: the cache argument is now `cache`, so the prefix is never injected and prompt tuning
    prepends its virtual tokens again at every step.)"""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_peft_logits(pm, np.asarray([ids]), num_virtual_tokens, is_prompt)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_cached_generation_equals_peft_greedy_without_a_cache(pair, name, tmp_path, caplog):
    """Batched, left-padded KV-cache generation gives, row by row, PEFT's greedy tokens without a cache.
    (The prefix comes through the projection MLP here: where it comes from does not touch the cache path.)"""
    hf, model, params = pair(1)
    method = PROMPT if name == "prompt" else PREFIX
    cfg = PromptConfig(num_virtual_tokens=3, init="vocab") if name == "prompt" else PrefixConfig(
        num_virtual_tokens=3, prefix_projection=True)
    adapted = method.init(jax.random.key(5), params, cfg)
    method.save(tmp_path / "a", adapted, cfg, model_config=model.config, base_model_name_or_path="tiny")
    pm = _peft_load(hf, tmp_path / "a", caplog)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (2, 6, 11)]  # left padded to one width
    ours = generate(model, adapted, prompts, max_new_tokens=6)
    for prompt, row in zip(prompts, ours, strict=True):
        assert row == _peft_greedy(pm, prompt, 6, 3, name == "prompt")


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_packed_segments_each_see_the_virtual_tokens(pair, name):
    _, model, params = pair(1)
    method = PROMPT if name == "prompt" else PREFIX
    cfg = PromptConfig(num_virtual_tokens=3) if name == "prompt" else PrefixConfig(num_virtual_tokens=3)
    adapted = method.init(jax.random.key(6), params, cfg)
    a, b = IDS[0, :4], IDS[1, :5]
    packed = np.concatenate([a, b])[None]
    hidden = model.apply({"params": adapted}, jnp.asarray(packed), segment_ids_BxS=jnp.asarray([[1] * 4 + [2] * 5]),
                         positions_BxS=jnp.asarray([list(range(4)) + list(range(5))]), return_hidden=True)
    alone = [model.apply({"params": adapted}, jnp.asarray(x[None]), return_hidden=True)[0] for x in (a, b)]
    chex.assert_trees_all_close(np.asarray(hidden[0]), np.concatenate(alone), atol=1e-5, rtol=0)


# --- errors ----------------------------------------------------------------------------------------------------

def test_bad_configs_are_refused_with_clear_errors(pair):
    _, model, _ = pair(1)
    for make in (lambda: PrefixConfig(num_virtual_tokens=0), lambda: PromptConfig(num_virtual_tokens=-2)):
        with pytest.raises(ConfigError, match="at least 1 virtual token"):
            make()
    with pytest.raises(ConfigError, match="prefix_projection"):
        PrefixConfig(encoder_hidden_size=8)
    with pytest.raises(ConfigError, match="init_text"):
        PromptConfig(init="text")
    for method, cfg in ((PREFIX, PrefixConfig(num_virtual_tokens=64)), (PROMPT, PromptConfig(num_virtual_tokens=70))):
        with pytest.raises(ConfigError, match="max_position_embeddings=64"):
            method.prepare(cfg, model_config=model.config)
    tok = tiny_tokenizer(["one two three four five six seven eight"] * 4, vocab_size=VOCAB)
    long_text = "one two three four five six seven eight"
    n = len(tok(long_text)["input_ids"])
    with pytest.raises(ConfigError, match=f"{n} tokens, longer than the 3 virtual tokens"):
        PROMPT.prepare(PromptConfig(num_virtual_tokens=3, init="text", init_text=long_text),
                       model_config=model.config, tokenizer=tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        PROMPT.prepare(PromptConfig(init="text", init_text="hi"), model_config=model.config)


def test_adapters_from_another_architecture_are_refused(pair, tmp_path):
    _, model, params = pair(1)
    PREFIX.save(tmp_path / "prefix", PREFIX.init(jax.random.key(0), params, PrefixConfig(num_virtual_tokens=2)),
                PrefixConfig(num_virtual_tokens=2), model_config=model.config, base_model_name_or_path="tiny")
    PROMPT.save(tmp_path / "prompt", PROMPT.init(jax.random.key(0), params, PromptConfig(num_virtual_tokens=2)),
                PromptConfig(num_virtual_tokens=2), model_config=model.config, base_model_name_or_path="tiny")
    other_cfg = tiny_hf_config(layers=2)
    other_cfg.hidden_size = 24
    other_model, other_params = from_transformers(tiny_hf_model(other_cfg))
    with pytest.raises(CheckpointError, match=r"different base model(.|\n)*num_layers: the adapter has 3, the model 2"):
        PREFIX.load(tmp_path / "prefix", other_model, other_params)
    with pytest.raises(CheckpointError, match=r"token_dim \(hidden size\): the adapter has 40, the model 24"):
        PROMPT.load(tmp_path / "prompt", other_model, other_params)
    _, mha_model, mha_params = pair(5)  # same layers and hidden, 5 kv heads instead of 1
    with pytest.raises(CheckpointError, match=r"kv heads\): the adapter has 1, the model 5"):
        PREFIX.load(tmp_path / "prefix", mha_model, mha_params)
    with pytest.raises(ConfigError, match="'PREFIX_TUNING' adapter, not 'PROMPT_TUNING'"):
        PROMPT.load(tmp_path / "prefix", model, params)
    with pytest.raises(ConfigError, match="already carry virtual-token leaves"):
        PREFIX.load(tmp_path / "prefix", model, PROMPT.init(jax.random.key(0), params, PromptConfig()))


def test_a_cache_without_the_virtual_slots_is_refused(pair):
    _, model, params = pair(1)
    from jaxpeft.models.causal_lm import init_cache

    adapted = PREFIX.init(jax.random.key(0), params, PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="new_cache"):
        model.apply({"params": adapted}, jnp.asarray(IDS), cache=init_cache(model.config, 2, 16))
    cache = model.apply({"params": adapted}, 2, 16, method="new_cache")
    assert cache["mask"].shape == (2, 18) and int(cache["index"]) == 2
    assert set(flatten_params(PREFIX.split(adapted, PrefixConfig(num_virtual_tokens=2))[0])) == {
        ("model", "layers", str(i), "self_attn", leaf) for i in range(3) for leaf in ("prefix_key", "prefix_value")}


# --- entry points: the training runs in this process (`run_entry`); the refusals are the subprocess smoke tests
# of `python -m experiments.prefix` and `python -m experiments.prompt`. ------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tiny_model_dir):
    return tiny_model_dir


@pytest.mark.parametrize("entry,flags,peft_type", [
    ("experiments.prefix", ["--num_virtual_tokens=3", "--prefix_projection", "--encoder_hidden_size=6"],
     "PREFIX_TUNING"),
    ("experiments.prompt", ["--num_virtual_tokens=6", "--prompt_init=text", "--prompt_init_text=ISO date"],
     "PROMPT_TUNING"),
])
def test_entry_point_trains_and_writes_a_peft_folder(tiny_folder, tmp_path, entry, flags, peft_type):
    out = tmp_path / "run"
    proc = run_entry(entry, f"--model={tiny_folder}", *flags, "--steps=3", "--batch_size=4", "--eval_examples=4",
                     f"--out={out}", "--noprogress")
    assert "eval_exact_match" in proc.stdout
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == peft_type and adapter["base_model_name_or_path"] == tiny_folder
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["steps"] == 3 and settings["method"] == entry.split(".")[1]


def test_entry_points_refuse_flags_that_mean_nothing(tiny_folder, tmp_path):
    proc = _run("experiments.prefix", f"--model={tiny_folder}", "--encoder_hidden_size=8", f"--out={tmp_path}/a",
                check=False)
    assert proc.returncode != 0 and "--prefix_projection" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("experiments.prompt", f"--model={tiny_folder}", "--rank=4", f"--out={tmp_path}/b", check=False)
    assert proc.returncode != 0 and "rank" in proc.stderr
