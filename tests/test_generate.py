"""Generation against transformers' greedy generate, and the sampling filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.models.generate import SamplingConfig, generate, select_token
from tests.hf_tiny import VOCAB

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pair(tiny_base):
    return tiny_base(seed=4)


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_for_batched_prompts_of_different_lengths(pair):
    hf, model, params = pair
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (3, 9, 14)]
    ours = generate(model, params, prompts, max_new_tokens=12)
    for prompt, row in zip(prompts, ours):
        assert row == _hf_greedy(hf, prompt, 12)


def test_stop_token_cuts_the_row_and_stops_early(pair):
    hf, model, params = pair
    prompt = [5, 6, 7]
    free = generate(model, params, [prompt], max_new_tokens=10)[0]
    stop = free[3]
    cut = generate(model, params, [prompt], max_new_tokens=10, stop_ids=[stop])[0]
    assert cut == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_respects_top_k():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top2 = np.asarray(select_token(logits, keys, SamplingConfig(greedy=False, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    again = np.asarray(select_token(logits, keys, SamplingConfig(greedy=False, top_k=2)))
    np.testing.assert_array_equal(top2, again)
    # Token 0 holds 0.5/0.8 of the mass left after top-k.
    assert abs((top2 == 0).mean() - 0.625) < 0.05


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    picks = np.asarray(select_token(logits, jax.random.key(1), SamplingConfig(greedy=False, top_p=0.7)))
    assert set(picks.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(greedy=False, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(greedy=False, top_p=1.5)
