"""`kernels.dense.dense_matmul`: a weight converted next to its dot gives the values (and gradients) of the
plain `x @ W.astype(dtype)` and keeps XLA from holding every
layer's converted copy at once (the compiled step's temporaries, bf16 base on the CPU)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.kernels import dense
from jaxpeft.models import ops
from jaxpeft.models.config import LlamaConfig
from jaxpeft.plan import PlanConfig
from jaxpeft.plan.xla import compiled_memory


def _plain(x, k, dtype):
    return x @ k.astype(dtype)


@pytest.mark.parametrize("weight_dtype,dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                                ("bfloat16", "float32")])
def test_values_and_gradients_equal_the_plain_matmul(weight_dtype, dtype):
    k = jax.random.normal(jax.random.PRNGKey(0), (24, 60), jnp.float32).astype(weight_dtype)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 24), jnp.float32).astype(dtype)
    assert dense.needs_tied_matmul(k.dtype, dtype)
    ours = lambda x, k: dense.dense_matmul(x, k, jnp.dtype(dtype))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(ours(x, k), np.float32), np.asarray(_plain(x, k, dtype), np.float32))
    loss = lambda f: lambda x, k: (f(x, k).astype(jnp.float32) * jnp.arange(60.0)).sum()  # noqa: E731
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(x, k)
    g_plain = jax.grad(loss(lambda x, k: _plain(x, k, dtype)), argnums=(0, 1))(x, k)
    for a, b in zip(g_ours, g_plain):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_tied_conversion_keeps_layer_copies_out_of_the_compiled_step(monkeypatch):
    """3 layers of a bf16 base with LoRA: without the tie every layer's fp32 copy is a temporary at once."""
    if jax.default_backend() != "cpu":
        pytest.skip("the implicit fp32 upcast of bf16 dots is the CPU backend's")
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    plan = PlanConfig(method="lora", batch_size=1, seq_len=16, rank=4, dtype="bfloat16", param_dtype="bfloat16")
    tied = compiled_memory(config, plan).temp
    monkeypatch.setattr(ops, "needs_tied_matmul", lambda *a: False)
    plain = compiled_memory(config, plan).temp
    layer_fp32 = 4 * (4 * 256 * 256 + 3 * 256 * 1024)  # one layer's linears converted to fp32
    assert plain - tied >= 2 * layer_fp32, (plain, tied)
