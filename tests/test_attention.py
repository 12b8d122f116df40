"""kernels/attention: the blockwise and cuDNN attentions against the dense reference, the structured mask,
the implementation gate, packed rows through a real tiny model, and the compiled memory of a step
(blockwise below dense, remat below none). Issue 16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.kernels.attention import (Case, attention, auto_for_remat, blockwise_attention, choose, dense_attention,
                                       make_mask, supports)
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import build_model
from jaxpeft.models.gemma import GemmaConfig
from jaxpeft.models.remat import checkpoint
from tests.tolerances import ATTENTION_BF16, ATTENTION_FP32

B, S, H, K, E = 2, 37, 6, 2, 8  # S not a multiple of the blocks below; GQA with G = 3
BLOCK = 16


def _reference_mask(key_valid, segments, window, offset, s):
    """The dense mask the models built before issue 16 (causal_lm.causal_mask then), as a literal."""
    t = key_valid.shape[1]
    q_slot = offset + np.arange(s)[:, None]
    k_slot = np.arange(t)[None, :]
    allowed = (k_slot <= q_slot)[None] & (key_valid[:, None, :] > 0)
    if window is not None:
        allowed &= (q_slot - k_slot < window)[None]
    if segments is not None:
        allowed &= segments[:, :, None] == segments[:, None, :]
    return allowed


def _valid(kind: str, t: int = S) -> np.ndarray:
    valid = np.ones((B, t), np.int32)
    if kind == "left":
        valid[0, :9] = 0  # row 0: 9 fully masked query rows (the padding)
        valid[1, :2] = 0
    elif kind == "right":
        valid[0, -11:] = 0
        valid[1, -1:] = 0
    return valid


SEGMENTS = np.repeat(np.array([[0] * 10 + [1] * 15 + [2] * 12, [0] * 20 + [1] * 17]), 1, axis=0).astype(np.int32)

CASES = {
    "gqa-causal": dict(),
    "left-padding": dict(valid="left"),
    "right-padding": dict(valid="right"),
    "segments": dict(segments=True),
    "segments-right-padding": dict(segments=True, valid="right"),
    "sliding-window": dict(window=6),
    "window-left-padding": dict(window=5, valid="left"),
    "softcap": dict(cap=0.7),
    "softcap-window-segments": dict(cap=2.0, window=9, segments=True),
    "scale": dict(scale=0.3),
}


def _operands(dtype, seed=0, t=S, s=S):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, s, H, E)), dtype)
    k = jnp.asarray(rng.normal(size=(B, t, K, E)), dtype)
    v = jnp.asarray(rng.normal(size=(B, t, K, E)), dtype)
    ct = jnp.asarray(rng.normal(size=(B, s, H * E)), dtype)
    return q, k, v, ct


def _mask(case):
    valid = _valid(case.get("valid", "none"))
    segments = jnp.asarray(SEGMENTS) if case.get("segments") else None
    return make_mask(jnp.asarray(valid), segment_ids_BxS=segments, window=case.get("window"))


def _vjp(fn, q, k, v, ct):
    def both(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return [out, *vjp(ct)]
    return jax.jit(both)(q, k, v, ct)  # one compile instead of op-by-op dispatch


DEFAULT_CASES = ("left-padding", "segments-right-padding", "softcap-window-segments")


def _slow_unless_default(names):
    # The other cases repeat the default ones' code paths in other combinations; ~10 s of CPU each here.
    return [n if n in DEFAULT_CASES else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _slow_unless_default(CASES))
def test_blockwise_equals_dense_fp32_forward_and_gradients(name):
    case = CASES[name]
    mask = _mask(case)
    q, k, v, ct = _operands(jnp.float32)
    kw = dict(scale=case.get("scale"), logit_cap=case.get("cap"))
    dense = _vjp(lambda q, k, v: dense_attention(q, k, v, mask.dense(S), jnp.float32, **kw), q, k, v, ct)
    block = _vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, jnp.float32, block_q=BLOCK, block_k=BLOCK, **kw),
                 q, k, v, ct)
    for what, a, b in zip(("out", "dq", "dk", "dv"), dense, block):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **ATTENTION_FP32, err_msg=f"{name}: {what}")


def test_fully_masked_query_rows_match_the_dense_reference_and_matter():
    """Left padding leaves query rows with no key: dense gives them the mean of v over all keys and sends
    their gradient to v only; blockwise must do the same (the test's cotangent is non-zero there)."""
    mask = _mask(dict(valid="left"))
    assert not np.asarray(mask.dense(S))[0, :9].any()
    q, k, v, ct = _operands(jnp.float32, seed=3)
    dense = _vjp(lambda q, k, v: dense_attention(q, k, v, mask.dense(S), jnp.float32), q, k, v, ct)
    block = _vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, jnp.float32, block_q=8, block_k=8), q, k, v, ct)
    mean_v = np.asarray(v[0]).mean(axis=0).reshape(-1)  # (K * E): each head of a group sees its kv head's mean
    np.testing.assert_allclose(np.asarray(dense[0])[0, 3].reshape(K, H // K, E)[:, 0].reshape(-1), mean_v, atol=1e-6)
    for a, b in zip(dense, block):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **ATTENTION_FP32)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in ("gqa-causal", "left-padding",
                                                                                    "segments")]
                         + ["softcap-window-segments"])  # slow ones: as above
def test_blockwise_equals_dense_bf16(name):
    case = CASES[name]
    mask = _mask(case)
    q, k, v, ct = _operands(jnp.bfloat16, seed=1)
    kw = dict(logit_cap=case.get("cap"))
    dense = _vjp(lambda q, k, v: dense_attention(q, k, v, mask.dense(S), jnp.bfloat16, **kw), q, k, v, ct)
    block = _vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, jnp.bfloat16, block_q=BLOCK, block_k=BLOCK, **kw),
                 q, k, v, ct)
    for what, a, b in zip(("out", "dq", "dk", "dv"), dense, block):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), **ATTENTION_BF16,
                                   err_msg=f"{name}: {what}")


def test_query_offset_and_shared_prefix_as_the_cache_path_uses_them():
    """Queries at slots offset.. of a longer key row (a KV cache / virtual tokens), packed segments that all see
    the first `shared_prefix` keys (prefix tuning's virtual tokens)."""
    p, s = 5, 29
    t = p + s
    seg = np.concatenate([np.zeros((B, 13), np.int32), np.ones((B, s - 13), np.int32)], 1)
    kseg = np.concatenate([np.zeros((B, p), np.int32), seg], 1)
    mask = make_mask(jnp.ones((B, t), jnp.int32), offset=jnp.int32(p), segment_ids_BxS=jnp.asarray(seg),
                     key_segment_ids_BxT=jnp.asarray(kseg), shared_prefix=p)
    allowed = np.asarray(mask.dense(s))
    assert allowed[1, 20, :p].all() and not allowed[1, 20, p:p + 13].any()  # sees the prefix, not segment 0
    q, k, v, ct = _operands(jnp.float32, seed=2, t=t, s=s)
    dense = _vjp(lambda q, k, v: dense_attention(q, k, v, mask.dense(s), jnp.float32), q, k, v, ct)
    block = _vjp(lambda q, k, v: blockwise_attention(q, k, v, mask, jnp.float32, block_q=8, block_k=8), q, k, v, ct)
    for a, b in zip(dense, block):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **ATTENTION_FP32)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("valid", ["none", "left", "right"])
def test_the_structured_mask_is_the_dense_mask_the_models_built(valid, window):
    key_valid = _valid(valid)
    for segments in (None, SEGMENTS):
        mask = make_mask(jnp.asarray(key_valid), segment_ids_BxS=None if segments is None else jnp.asarray(segments),
                         window=window)
        np.testing.assert_array_equal(np.asarray(mask.dense(S)), _reference_mask(key_valid, segments, window, 0, S))
    cache = make_mask(jnp.asarray(key_valid), offset=jnp.int32(30), window=window)  # decoding 7 queries at 30..
    np.testing.assert_array_equal(np.asarray(cache.dense(7)), _reference_mask(key_valid, None, window, 30, 7))


def test_the_gate_says_why_and_auto_picks_by_platform_and_length():
    base = dict(heads=8, kv_heads=2, head_dim=64)
    gpu = Case(s=4096, t=4096, dtype="bfloat16", right_padded=True, zero_offset=True, platform="gpu", **base)
    assert supports("cudnn", gpu) == (True, "supported")
    assert choose(gpu) == "cudnn"
    for change, words in [(dict(segments=True), "segment ids"), (dict(logit_cap=50.0), "soft-capping"),
                          (dict(right_padded=False), "left padding"), (dict(dtype="float32"), "dtype float32"),
                          (dict(zero_offset=False), "query offset"), (dict(platform="cpu"), "GPU only")]:
        ok, reason = supports("cudnn", dataclasses.replace(gpu, **change))
        assert not ok and words in reason, (change, reason)
        assert choose(dataclasses.replace(gpu, **change)) == "blockwise"
    cpu = dataclasses.replace(gpu, platform="cpu")
    assert choose(dataclasses.replace(cpu, s=511, t=511)) == "dense"
    assert choose(dataclasses.replace(cpu, s=512, t=512)) == "blockwise"
    assert choose(dataclasses.replace(cpu, s=1, t=8192)) == "dense"  # decoding
    # A rematerialised CPU step keeps dense below 1,024 tokens (the blockwise VJP under remat compiles slowly).
    assert auto_for_remat("auto", 512, True) == "dense" and auto_for_remat("auto", 1024, True) == "auto"
    assert auto_for_remat("auto", 512, False) == "auto" and auto_for_remat("blockwise", 512, True) == "blockwise"
    with pytest.raises(NotImplementedError, match="GPU only"):
        choose(cpu, "cudnn")
    with pytest.raises(Exception, match="expected one of"):
        choose(cpu, "flash")


def test_the_entry_point_runs_what_the_mask_asks():
    mask = _mask(dict(valid="right", window=7))
    q, k, v, _ = _operands(jnp.float32)
    dense = attention(q, k, v, mask.with_options(implementation="dense"), jnp.float32)
    block = attention(q, k, v, mask.with_options(implementation="blockwise", block=8), jnp.float32)
    np.testing.assert_allclose(np.asarray(block), np.asarray(dense), **ATTENTION_FP32)
    with pytest.raises(NotImplementedError, match="cudnn"):
        attention(q, k, v, mask, jnp.float32, implementation="cudnn")


# ---- cuDNN (GPU only)

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gqa-causal", "right-padding", "sliding-window"])
def test_cudnn_equals_dense_bf16(name):
    case = CASES[name]
    mask = _mask(case).with_options(right_padded=True)
    assert supports("cudnn", Case(s=S, t=S, heads=H, kv_heads=K, head_dim=E, dtype="bfloat16", window=mask.window,
                                  right_padded=True, zero_offset=True, platform=jax.default_backend()))[0]
    q, k, v, ct = _operands(jnp.bfloat16, seed=4)
    dense = _vjp(lambda q, k, v: dense_attention(q, k, v, mask.dense(S), jnp.bfloat16), q, k, v, ct)
    fast = _vjp(lambda q, k, v: attention(q, k, v, mask, jnp.bfloat16, implementation="cudnn"), q, k, v, ct)
    valid = np.asarray(mask.key_valid_BxT, bool)  # rows past a row's length are undefined for cuDNN
    for what, a, b in zip(("out", "dq", "dk", "dv"), dense, fast):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(b[valid], a[valid], **ATTENTION_BF16, err_msg=f"{name}: {what}")


# ---- through a real tiny model

LLAMA = LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
GEMMA2 = GemmaConfig(vocab_size=61, hidden_size=40, intermediate_size=52, num_hidden_layers=1, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=12, sliding_window=6,
                     layer_types=("sliding_attention",), query_pre_attn_scalar=10.0,
                     attn_logit_softcapping=0.5, final_logit_softcapping=3.0, max_position_embeddings=256)


def _init(config, seed=0, **kw):
    model = build_model(config, **kw)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)  # scores past the caps, sharp softmax
    return model, params


# llama slow (~15 s of CPU): its blockwise path through a real model is the packed test's too; gemma2 (soft-cap,
# window) stays in the default run.
@pytest.mark.parametrize("config", [pytest.param(LLAMA, marks=pytest.mark.slow), GEMMA2], ids=["llama", "gemma2"])
def test_tiny_model_logits_blockwise_equal_dense(config):
    model, params = _init(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 61, (2, 45)), jnp.int32)
    mask = np.ones((2, 45), np.int32)
    mask[0, :6] = 0  # left padding
    out = {a: jax.jit(model.clone(attention=a, attention_block=8).apply)({"params": params}, ids,
                                                                          attention_mask_BxS=jnp.asarray(mask))
           for a in ("dense", "blockwise")}
    np.testing.assert_allclose(np.asarray(out["blockwise"]), np.asarray(out["dense"]), atol=1e-5, rtol=1e-5)


def _nll(logits_SxV, ids_S):
    logp = jax.nn.log_softmax(logits_SxV[:-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids_S[1:, None], -1))


@pytest.mark.parametrize("implementation", ["dense", "blockwise"])
def test_a_packed_row_gives_each_example_its_own_loss(implementation):
    model, params = _init(LLAMA, seed=1)
    apply = jax.jit(model.clone(attention=implementation, attention_block=8).apply)
    rng = np.random.default_rng(5)
    lengths = (13, 21, 9)
    examples = [rng.integers(3, 61, n).astype(np.int32) for n in lengths]
    ids = np.concatenate(examples)[None]
    segments = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])[None]
    packed = apply({"params": params}, jnp.asarray(ids), positions_BxS=jnp.asarray(positions),
                   segment_ids_BxS=jnp.asarray(segments))[0]
    alone_ids = np.zeros((3, max(lengths)), np.int32)  # each example alone, right padded (causal: no effect)
    alone_mask = np.zeros_like(alone_ids)
    for i, x in enumerate(examples):
        alone_ids[i, :len(x)], alone_mask[i, :len(x)] = x, 1
    alone = apply({"params": params}, jnp.asarray(alone_ids), attention_mask_BxS=jnp.asarray(alone_mask))
    start = 0
    for i, x in enumerate(examples):
        got = _nll(packed[start:start + len(x)], jnp.asarray(x))
        want = _nll(alone[i, :len(x)], jnp.asarray(x))
        np.testing.assert_allclose(float(got), float(want), atol=1e-5, rtol=0)
        start += len(x)
    crossed = apply({"params": params}, jnp.asarray(ids), positions_BxS=jnp.asarray(positions))[0]  # no segments
    assert abs(float(_nll(crossed[13:34], jnp.asarray(examples[1]))) - float(_nll(alone[1, :21],
                                                                                 jnp.asarray(examples[1])))) > 1e-3


def _loss_fn(model, ids, mask):
    def loss(params):
        logits = model.apply({"params": params}, ids, attention_mask_BxS=mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return loss


@pytest.mark.parametrize("config", [LLAMA, pytest.param(GEMMA2, marks=pytest.mark.slow)], ids=["llama", "gemma2"])
def test_remat_gives_the_same_loss_and_gradients(config):  # gemma2 slow: the same run_layer, ~60 s of CPU here
    model, params = _init(config, seed=2)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 61, (2, 19)), jnp.int32)
    mask = jnp.asarray(_valid("left", 19)[:, :19])
    block = model.clone(attention="blockwise", attention_block=8)
    plain = jax.jit(jax.value_and_grad(_loss_fn(block, ids, mask)))(params)
    remat = jax.jit(jax.value_and_grad(_loss_fn(block.clone(remat=True), ids, mask)))(params)
    np.testing.assert_allclose(float(remat[0]), float(plain[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_checkpoint_differentiates_only_what_is_differentiated():
    def fn(p, a):
        x, c = a
        return jnp.tanh(x @ p["w"] + p["b"]) * c, None
    p = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.arange(4.0)}
    x, c = jnp.arange(6.0).reshape(2, 3) / 7, jnp.float32(2.0)
    want = jax.grad(lambda w, x: jnp.sum(fn({"w": w, "b": p["b"]}, (x, c))[0] ** 2), (0, 1))(p["w"], x)
    got = jax.grad(lambda w, x: jnp.sum(checkpoint(fn)({"w": w, "b": p["b"]}, (x, c))[0] ** 2), (0, 1))(p["w"], x)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_remat_offload_is_refused_on_the_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the refusal is the CPU's")
    model, params = _init(LLAMA)
    with pytest.raises(ValueError, match="only a GPU"):
        model.clone(remat="offload").apply({"params": params}, jnp.zeros((1, 4), jnp.int32))


# ---- compiled memory (XLA's analysis of the compiled step; nothing runs)

def _temp_bytes(config, seq, **kw) -> int:
    model = build_model(config, **kw)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32))["params"], jax.random.PRNGKey(0))
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def step(params, ids):
        h = model.apply({"params": params}, ids, return_hidden=True)
        return jnp.mean(h[:, ::64] ** 2)  # a few rows only, so the head adds nothing that scales

    compiled = jax.jit(jax.grad(step)).lower(params, ids).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.slow  # four compiles of a gradient step, ~30 s of CPU; bench/step_memory.py figures in BUILD_NOTES
def test_compiled_step_memory_blockwise_below_dense_and_remat_below_none():
    cfg = dataclasses.replace(LLAMA, num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=4096)
    dense = _temp_bytes(cfg, 1024, attention="dense")
    block = _temp_bytes(cfg, 1024, attention="blockwise", attention_block=256)
    # dense holds the 4 x 1024 x 1024 fp32 scores (16 MB) and their probabilities; blockwise one 256 x 256 tile
    # (measured 69.0 MB against 8.2 MB)
    assert block * 4 < dense, (block, dense)
    deep = dataclasses.replace(cfg, num_hidden_layers=3)
    plain = _temp_bytes(deep, 1024, attention="blockwise", attention_block=256)
    remat = _temp_bytes(deep, 1024, attention="blockwise", attention_block=256, remat=True)
    assert remat * 1.3 < plain, (remat, plain)  # measured 11.2 MB against 18.4 MB
