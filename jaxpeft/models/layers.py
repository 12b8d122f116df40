"""The building blocks every model family shares: the adapter-aware Linear, RMSNorm and the embedding.

`Linear` holds no maths of its own: it reads whatever leaves its scope holds (a dense or quantized kernel,
a bias, registered adapter leaves) and hands them to `ops.linear`. Leaves are read without `self.param`, so
adapter siblings and quantized kernels pass through (`self.param` would check a stored leaf's shape).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.models import hooks, ops


class Linear(nn.Module):
    """A linear layer whose maths is `ops.linear` over whatever leaves its scope holds."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_initializing():
            self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
            if self.use_bias:
                self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        leaves = self.variables["params"]
        dropout = None  # for the adapters that use it (hooks.LinearAdapter.uses_dropout), when training
        if self.dropout_rate > 0 and not self.deterministic and hooks.wants_dropout(leaves):
            dropout = lambda v: nn.Dropout(self.dropout_rate)(v, deterministic=False)  # noqa: E731
        return ops.linear(x, leaves, dtype=self.dtype, dropout=dropout)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return ops.rms_norm(x, weight, self.eps, self.dtype)


class Embed(nn.Module):
    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.param_dtype
        )

    def __call__(self, ids_BxS: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids_BxS, axis=0).astype(self.dtype)

    def attend(self, h_BxSxD: jax.Array) -> jax.Array:
        return h_BxSxD @ self.embedding.astype(self.dtype).T
