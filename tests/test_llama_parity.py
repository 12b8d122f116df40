"""Logit parity of the Flax Llama family against transformers (torch CPU) on tiny random models."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_transformers
from jaxpeft.models.causal_lm import default_positions
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits, tiny_hf_config, tiny_hf_model

pytest.importorskip("torch")

CASES = {
    "llama-gqa-untied": dict(model_type="llama"),
    "llama-tied": dict(model_type="llama", tied=True),
    "llama-bias": dict(model_type="llama", bias=True),
    "llama3-rope": dict(model_type="llama", rope=dict(rope_type="llama3", rope_theta=5000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16)),
    "linear-rope": dict(model_type="llama", rope=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    "qwen2-bias": dict(model_type="qwen2"),
    "mistral-window": dict(model_type="mistral", sliding_window=5),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    hf = tiny_hf_model(tiny_hf_config(**CASES[request.param]))
    model, params = from_transformers(hf)
    return hf, model, params


@pytest.mark.parametrize("seq_len", [1, 7, 23])
def test_logits_match_transformers(pair, seq_len):
    hf, model, params = pair
    ids = np.random.default_rng(seq_len).integers(0, VOCAB, (2, seq_len))
    ours = model.apply({"params": params}, jnp.asarray(ids))
    chex.assert_shape(ours, (2, seq_len, VOCAB))
    chex.assert_trees_all_close(np.asarray(ours), hf_logits(hf, ids), **tolerances.LOGITS_FP32)


def test_logits_match_with_left_and_right_padding(pair):
    hf, model, params = pair
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[0, :4] = 0  # left padded
    mask[1, 8:] = 0  # right padded
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask_BxS=jnp.asarray(mask)))
    theirs = hf_logits(hf, ids, mask, positions)
    real = mask.astype(bool)  # padded query rows are undefined in both libraries
    chex.assert_trees_all_close(ours[real], theirs[real], **tolerances.LOGITS_FP32)


def test_dynamic_rope_beyond_max_positions():
    hf = tiny_hf_model(tiny_hf_config(rope=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)))
    model, params = from_transformers(hf)
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 80))  # max_position_embeddings is 64
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    chex.assert_trees_all_close(ours, hf_logits(hf, ids), **tolerances.LOGITS_FP32)


def test_bf16_compute_runs_close_to_fp32(pair):
    hf, model, params = pair
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9))
    fp32 = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    bf16 = model.clone(dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(ids))
    assert bf16.dtype == jnp.bfloat16
    # bf16 keeps ~3 significant digits; the tiny model's logits are O(1).
    np.testing.assert_allclose(np.asarray(bf16, np.float32), fp32, atol=0.1)


def test_remat_gives_the_same_logits(pair):
    hf, model, params = pair
    ids = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (1, 6)))
    chex.assert_trees_all_close(model.clone(remat=True).apply({"params": params}, ids),
                                model.apply({"params": params}, ids), **tolerances.EXACT)
