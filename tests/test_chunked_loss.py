"""The head + cross-entropy over chunks of targets (train/chunked_loss.py): the same loss and gradients as all
targets at once, on a Gemma-3-sized 262,144-token vocabulary with final-logit soft-capping, an untied bias-free
head, bf16, the preference log-probs; the same loss as transformers; and a compiled head at 8k targets whose
temporaries are at most a quarter of the unchunked one's."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpeft import from_transformers
from jaxpeft.core.errors import ConfigError
from jaxpeft.preference.logps import row_logps
from jaxpeft.train.chunked_loss import resolve_chunk, target_nll, valid_target_nll
from jaxpeft.train.loop import TrainConfig
from jaxpeft.train.step import head_fn, init_state, make_train_step, token_nll_sum

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BIG_VOCAB = 262_144  # Gemma 3's
EXACT_FP32 = dict(atol=1e-6, rtol=1e-6)  # the brief's bound; only the order of the head-gradient sums differs
# The counted path sums the head's weight gradient chunk by chunk in a loop (another order of fp32 sums over
# rows whose logits reach ~30 here): within 1e-6 of the gradient's largest entry (~10), not of each entry.
COUNTED_FP32 = dict(atol=1e-5, rtol=1e-6)
BF16 = dict(atol=2e-2, rtol=2e-2)  # bf16 logits, rounded once; chunking changes only the order of fp32 sums


@pytest.fixture(scope="module")
def gemma_big_vocab():
    """A 1-layer Gemma 3 text model, hidden 8, tied head, final-logit soft-capping small enough to bite."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=BIG_VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=64, query_pre_attn_scalar=4, sliding_window=16,
        layer_types=["full_attention"], final_logit_softcapping=0.7, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # big enough embeddings that the capped logits are far from linear
        hf.model.embed_tokens.weight.mul_(40.0)
    model, params = from_transformers(hf)
    return hf, model, params


def _batch(vocab: int, b: int = 2, s: int = 29, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, s))
    loss_mask = np.zeros((b, s), np.int32)
    loss_mask[0, 9:] = 1  # 20 targets
    loss_mask[1, 4:25] = 1  # 21 targets: K = 41
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, s), jnp.int32),
            "loss_mask": jnp.asarray(loss_mask)}


def _loss_and_grads(model, params, batch, max_targets, chunks):
    """[(loss, grads) for each loss_chunk in `chunks`], all from one jitted function (one compile)."""
    def loss(p, chunk):
        nll, n = token_nll_sum(model, p, batch, max_targets, loss_chunk=chunk)
        return nll / n
    return jax.jit(lambda p: [jax.value_and_grad(loss)(p, c) for c in chunks])(params)


def test_big_vocab_softcapped_tied_head_same_loss_and_grads(gemma_big_vocab):
    _, model, params = gemma_big_vocab
    batch = _batch(BIG_VOCAB)
    # 45 slots (41 targets + 4 empty ones) in chunks of 16: the last chunk is padded, and so is K.
    (l0, g0), (l1, g1) = _loss_and_grads(model, params, batch, 45, (0, 16))
    assert np.isfinite(float(l0)) and float(l0) > 1.0
    np.testing.assert_allclose(float(l1), float(l0), **EXACT_FP32)
    chex.assert_trees_all_close(g1, g0, **EXACT_FP32)
    # The tied embedding's gradient carries the head's part, so it is not all zero rows.
    assert float(jnp.abs(g1["model"]["embed_tokens"]["embedding"]).sum()) > 0


def test_big_vocab_loss_equals_transformers(gemma_big_vocab):
    hf, model, params = gemma_big_vocab
    batch = _batch(BIG_VOCAB)
    nll, n = jax.jit(lambda p: token_nll_sum(model, p, batch, 45, loss_chunk=16))(params)
    ids = np.asarray(batch["input_ids"]).astype(np.int64)
    labels = np.where(np.asarray(batch["loss_mask"]) > 0, ids, -100)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), labels=torch.tensor(labels)).loss.item()
    np.testing.assert_allclose(float(nll / n), theirs, rtol=1e-5)


def _head_loss_and_grads(models, params, h_KxD, t_K, chunks):
    """The head + loss alone (what chunking changes), gradients for every parameter and the hidden rows: for
    each model, for each loss_chunk, from one jitted function."""
    def loss(p, h, model, chunk):
        nll_K = target_nll(head_fn(model, p), h, t_K, vocab=model.config.vocab_size, loss_chunk=chunk)
        return nll_K.mean()
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    return jax.jit(lambda p, h: [[grad(p, h, m, c) for c in chunks] for m in models])(params, h_KxD)


# slow: the default run's budget; the 262k tied, soft-capped case above is the default run's check.
@pytest.mark.slow
def test_untied_bias_free_head_fp32_and_bf16(tiny_base):
    _, model, params = tiny_base(tied=False, layers=1)
    assert "lm_head" in params and "bias" not in params["lm_head"]
    rng = np.random.default_rng(1)
    h_KxD = jnp.asarray(rng.normal(size=(43, model.config.hidden_size)), jnp.float32)
    t_K = jnp.asarray(rng.integers(0, model.config.vocab_size, 43))
    [(l0, g0), (l1, g1)], [(b0, gb0), (b1, gb1)] = _head_loss_and_grads(
        (model, model.clone(dtype=jnp.bfloat16)), params, h_KxD, t_K, (0, 5))
    np.testing.assert_allclose(float(l1), float(l0), **EXACT_FP32)
    chex.assert_trees_all_close(g1, g0, **EXACT_FP32)
    assert float(jnp.abs(g1[0]["lm_head"]["kernel"]).sum()) > 0
    np.testing.assert_allclose(float(b1), float(b0), **BF16)
    np.testing.assert_allclose(float(b1), float(l0), **BF16)
    chex.assert_trees_all_close(gb1, gb0, **BF16)


# slow: the default run's budget (row_logps calls the same target_nll as the SFT loss checked above).
@pytest.mark.slow
def test_preference_logps_and_orpo_nll_chunked(tiny_base):
    _, model, params = tiny_base(tied=False, layers=1)
    batch = _batch(model.config.vocab_size, b=4, seed=2)
    o0, o1 = jax.jit(lambda p: [row_logps(model, p, batch, 90, with_nll_rows=2, loss_chunk=c) for c in (0, 7)])(
        params)
    assert float(o0["nll"]) > 0 and np.all(np.asarray(o0["logps"][:2]) < 0)
    chex.assert_trees_all_close(o1, o0, **EXACT_FP32)


# slow: two compiles of a whole train step (~13 s on 2 loaded cores); the head's gradients are checked above.
@pytest.mark.slow
def test_train_step_with_chunks_matches_off(tiny_base):
    _, model, params = tiny_base(tied=False, layers=1)
    trainable = {"lm_head": params["lm_head"]}
    frozen = {k: v for k, v in params.items() if k != "lm_head"}
    batch = {k: v[None] for k, v in _batch(model.config.vocab_size, seed=3).items()}
    tx = optax.sgd(0.1)
    out = {}
    for chunk in (0, 6):
        state = init_state(trainable, tx, seed=0)
        step = make_train_step(model, tx, max_targets=41, loss_chunk=chunk)
        state, metrics = step(state, frozen, batch)
        out[chunk] = (float(metrics["loss"]), state["params"])
    np.testing.assert_allclose(out[6][0], out[0][0], **EXACT_FP32)
    chex.assert_trees_all_close(out[6][1], out[0][1], **EXACT_FP32)


@pytest.mark.parametrize("count", [0, 1, 11, 24, 41])
def test_counted_targets_same_loss_and_grads_frozen_and_trained_head(tiny_base, count):
    """`n_valid`: only the chunks holding real targets run (a loop of traced length), with a hand-written VJP:
    per-row gradients taken in the forward for a frozen head (LoRA), a recomputing backward for a trained one.
    Both equal the masked loss over all K slots at once, for no targets, a partial chunk, whole chunks and all."""
    _, model, params = tiny_base(tied=True, layers=1)
    rng = np.random.default_rng(count)
    k = 41
    h_KxD = jnp.asarray(rng.normal(size=(k, model.config.hidden_size)) * 3, jnp.float32)
    t_K = jnp.asarray(rng.integers(0, model.config.vocab_size, k))
    w_K = jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32) * (jnp.arange(k) < count)  # cotangents of real slots

    def loss(p, h, counted):
        if counted:
            nll = valid_target_nll(head_fn(model, p), h, t_K, jnp.int32(count), chunk=8)
        else:
            nll = target_nll(head_fn(model, p), h, t_K, vocab=model.config.vocab_size, loss_chunk=0)
        return jnp.sum(nll * w_K), nll

    def both(counted):
        (l_t, nll), g_trained = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, h, counted)
        (l_f, _), g_frozen = jax.value_and_grad(lambda x: loss(params, x, counted), has_aux=True)(h)
        return l_t, l_f, nll, g_trained, g_frozen

    h = h_KxD
    ref, new = jax.jit(lambda: (both(False), both(True)))()
    np.testing.assert_allclose(float(new[0]), float(ref[0]), **EXACT_FP32)
    np.testing.assert_allclose(float(new[1]), float(ref[1]), **EXACT_FP32)
    np.testing.assert_allclose(np.asarray(new[2])[:count], np.asarray(ref[2])[:count], **EXACT_FP32)
    chunks_run = -(-count // 8) * 8
    assert not np.any(np.asarray(new[2])[chunks_run:])  # slots past the last real chunk are never computed
    chex.assert_trees_all_close(new[3], ref[3], **COUNTED_FP32)
    chex.assert_trees_all_close(new[4], ref[4], **EXACT_FP32)
    if count:
        assert float(jnp.abs(new[3][0]["model"]["embed_tokens"]["embedding"]).sum()) > 0
        assert float(jnp.abs(new[4]).sum()) > 0


def test_head_memory_at_8k_targets_at_most_a_quarter(gemma_big_vocab):
    _, model, params = gemma_big_vocab
    k = 8192
    h_KxD = jax.ShapeDtypeStruct((k, model.config.hidden_size), jnp.float32)
    t_K = jax.ShapeDtypeStruct((k,), jnp.int32)

    def temp_bytes(loss_chunk):
        def loss(p, h, t):  # gradients for the hidden rows (what LoRA needs) and the tied head itself
            return target_nll(head_fn(model, p), h, t, vocab=BIG_VOCAB, loss_chunk=loss_chunk).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, h_KxD, t_K).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    off, auto = temp_bytes(0), temp_bytes(None)
    assert off > k * BIG_VOCAB * 4  # at least the K x V float32 logits, so the comparison measures the head
    assert auto * 4 <= off, (auto, off)


def test_auto_chunk_and_bad_settings():
    assert resolve_chunk(None, 8192, BIG_VOCAB) == 256
    assert resolve_chunk(None, 8192, 49_152) == 1024  # SmolLM2
    assert resolve_chunk(None, 1000, 49_152) == 0  # fits one chunk: the unchunked path, compiled as before
    assert resolve_chunk(0, 8192, BIG_VOCAB) == 0
    assert resolve_chunk(100, 8192, 61) == 100
    with pytest.raises(ConfigError, match="loss_chunk=-1: expected None"):
        TrainConfig(loss_chunk=-1)
