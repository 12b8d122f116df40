"""x @ W for a frozen, compressed weight: one custom VJP that never keeps a dense W between forward and backward.

`frozen_matmul(x, weight, impl)` runs `impl.forward(x, weight)`; its gradient with respect to x is
`impl.backward(dy, weight)` (which dequantizes again), the residual is the compressed `weight` pytree only,
and the weight gets zero cotangents (float0 for its integer leaves), never a gradient. `impl` is static
(a frozen dataclass: the custom VJP's nondiff argument). `tie_to` gives an implementation the data
dependency that keeps XLA from hoisting every layer's dequantization to the start of the step.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class FrozenMatmulImpl(Protocol):
    """The static half of `frozen_matmul`: y = x W and dx = dy Wᵀ from the compressed weight."""

    def forward(self, x_MxI: jax.Array, weight: Any) -> jax.Array: ...

    def backward(self, dy_MxO: jax.Array, weight: Any) -> jax.Array: ...


def tie_to(array: jax.Array, x: jax.Array) -> jax.Array:
    """`array` with a data dependency on `x`: the array plus an exact 0 computed from x.

    Without it XLA sees every layer's dequantization as depending on the weights alone: with the layers
    unrolled it schedules them all at the start of the step and shares the forward's with the
    backward's (CSE), so every dense weight is alive at once (measured on SmolLM2's QLoRA train step:
    +420 MB of temporaries, all its linears in fp32). `optimization_barrier` does not survive the CPU
    pipeline; a data dependency does. The 0 is exact for finite x; a non-finite x gives a non-finite
    output anyway.
    """
    zero = (jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32) * 0.0).astype(array.dtype)
    return array + zero


def _zero_cotangent(leaf: jax.Array) -> Any:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def frozen_matmul(x_MxI: jax.Array, weight: Any, impl: FrozenMatmulImpl) -> jax.Array:
    """impl.forward(x, weight), differentiable in x only (see the module docstring)."""
    return impl.forward(x_MxI, weight)


def _frozen_matmul_fwd(x_MxI, weight, impl):
    return impl.forward(x_MxI, weight), weight  # residual: the compressed weight only, never the dense one


def _frozen_matmul_bwd(impl, weight, dy_MxO):
    return impl.backward(dy_MxO, weight), jax.tree.map(_zero_cotangent, weight)


frozen_matmul.defvjp(_frozen_matmul_fwd, _frozen_matmul_bwd)


__all__ = ["FrozenMatmulImpl", "frozen_matmul", "tie_to"]
