"""GGUF files of the Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 architectures: a tiny transformers model of each
family is written as llama.cpp's converter writes it (its tensor names, metadata keys, Gemma's norms stored as
1 + w, Phi-3's LongRoPE factors as tensors, no q/k permutation outside Llama), then read here.

Two oracles, both transformers: its own GGUF reader (`load_gguf_checkpoint`, which names and converts the
tensors with the gguf package's name map and its per-architecture processors, not our family table) must give
the same tensors; and the source model's logits (with padding, past the sliding windows, past Phi-3's
original context) must equal ours from the GGUF file.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.convert.gguf import read_gguf
from jaxpeft.convert.hf import hf_to_params
from jaxpeft.models.families import build_model, config_from_hf, family_of
from tests.hf_tiny import tiny_hf_config, tiny_hf_model

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def tiny_case(family: str):
    """The family's tiny config in the shape a GGUF file can carry: no sliding window on Qwen3 (llama.cpp's
    qwen3 has none), Gemma's query scale = head_dim (llama.cpp's rule), six Gemma 3 layers with a mixed
    pattern (stored per layer)."""
    if family == "qwen3":
        return tiny_hf_config("qwen3", tied=False, bias=False)
    if family == "gemma2":
        c = tiny_hf_config("gemma2", tied=True, sliding_window=5)
    elif family == "gemma3_text":
        c = tiny_hf_config("gemma3_text", tied=True, sliding_window=5)
    else:
        return tiny_hf_config("phi3", sliding_window=7)
    c.query_pre_attn_scalar = c.head_dim
    return c


def write_gguf(path: str, hf_model, arch: str, *, extra=None, drop: tuple[str, ...] = ()) -> None:
    """`hf_model` as llama.cpp's convert_hf_to_gguf.py writes it (F32 tensors, so the values are exact);
    `extra(writer)` adds metadata, `drop` leaves tensors out."""
    c = hf_model.config
    family = family_of(c.model_type)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_architecture()
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters
    if arch == "gemma3":
        full, local = rope["full_attention"], rope["sliding_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        writer.add_rope_freq_base_swa(local["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
    if arch != "phi3":
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(c.sliding_window)
        if c.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(c.final_logit_softcapping)
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
    if arch == "phi3":
        head_dim = c.hidden_size // c.num_attention_heads
        writer.add_rope_dimension_count(int(head_dim * rope["partial_rotary_factor"]))
        writer.add_sliding_window(c.sliding_window)
        original = c.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(original)
        scale = c.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        for kind in ("long", "short"):
            if f"rope_factors_{kind}.weight" not in drop:
                writer.add_tensor(f"rope_factors_{kind}.weight", np.asarray(rope[f"{kind}_factor"], np.float32))
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    if extra is not None:
        extra(writer)
    global_names, layer_names = family.gguf_names()
    gemma = arch.startswith("gemma")
    for g, h in global_names.items():
        if h in state and not (h == "lm_head.weight" and c.tie_word_embeddings):
            w = state[h] + 1 if gemma and g == "output_norm.weight" else state[h]
            writer.add_tensor(g, np.ascontiguousarray(w, np.float32))
    for i in range(c.num_hidden_layers):
        for g, h in layer_names.items():
            w = state[f"{family.layer_prefix(i)}.{h}"]
            writer.add_tensor(f"blk.{i}.{g}", np.ascontiguousarray(w + 1 if gemma and "norm" in g else w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(ARCH))
def case(request, tmp_path_factory):
    family = request.param
    hf = tiny_hf_model(tiny_case(family), seed=3)
    path = str(tmp_path_factory.mktemp(f"gguf_{family}") / "model.gguf")
    write_gguf(path, hf, ARCH[family])
    return family, hf, path


def test_tensors_equal_transformers_gguf_reader(case):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    family, hf, path = case
    config, state = read_gguf(path)
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    theirs = {k: np.asarray(v, np.float32) for k, v in theirs.items() if not k.startswith("rope_factors")}
    assert sorted(state) == sorted(theirs)
    for name, value in state.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    source = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    for name, value in state.items():  # Gemma's norms came back as w, not 1 + w
        np.testing.assert_allclose(value, source[name], rtol=0, atol=1e-6, err_msg=name)


def test_logits_equal_the_source_model(case):
    family, hf, path = case
    config_json, state = read_gguf(path)
    config = config_from_hf(config_json)
    if family == "phi3":
        assert config.rope_type == "longrope" and config.original_max_position_embeddings == 20
        assert config.partial_rotary_factor == 0.5 and config.sliding_window == 7
    if family == "gemma3_text":
        assert config_json["layer_types"] == list(hf.config.layer_types)
    model = build_model(config, dtype=jnp.float32, param_dtype=jnp.float32)
    params = hf_to_params(state, config, np.float32)
    rng = np.random.default_rng(0)
    length = 24 if family == "phi3" else 12  # past the windows (5, 7) and Phi-3's original context (20)
    ids = rng.integers(3, hf.config.vocab_size, (2, length))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                 attention_mask_BxS=jnp.asarray(mask, jnp.int32)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def test_features_this_reader_lacks_are_refused(tmp_path):
    from jaxpeft.core.errors import UnsupportedModelError

    hf = tiny_hf_model(tiny_case("qwen3"), seed=3)
    # A sliding window on Qwen3 (llama.cpp's qwen3 has none): a key this reader would otherwise drop.
    path = str(tmp_path / "windowed.gguf")
    write_gguf(path, hf, "qwen3", extra=lambda w: w.add_sliding_window(4))
    with pytest.raises(UnsupportedModelError, match="qwen3.attention.sliding_window"):
        read_gguf(path)
    # Half of Phi-3's LongRoPE factors.
    hf = tiny_hf_model(tiny_case("phi3"), seed=3)
    path = str(tmp_path / "half.gguf")
    write_gguf(path, hf, "phi3", drop=("rope_factors_short.weight",))
    with pytest.raises(UnsupportedModelError, match="needs both"):
        read_gguf(path)
