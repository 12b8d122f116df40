"""x @ W for a dense weight stored in another dtype than the compute, or computed in fp32 by the backend.

Two cases make XLA convert a weight before its dot: a stored dtype other than the compute dtype (a bf16
base computing in fp32, an fp32 base computing in bf16), and XLA's CPU backend, which computes every bf16
or fp16 dot in fp32 (it inserts the upcasts itself). Either way the conversion depends on the weight
alone, so with the layers unrolled XLA hoists every layer's converted copy to the start of the step and
shares it with the backward: every weight exists once more, converted, for the whole step (measured on 4
layers of Llama-2-7B widths, bf16 base, LoRA: 4.2 GB of temporaries where 0.3 GB are planned; at 32
layers it would be 26 GB). `dense_matmul` converts explicitly, tied to the activation (`frozen.tie_to`),
so each copy lives only around its own dot, in the forward and again in the backward; its custom VJP keeps
the stored weight (never the converted one) as the residual. The values are those of the plain
`x @ W.astype(dtype)`: the weight is rounded to `dtype` first, products are computed in fp32 where the CPU
backend would, and the result is rounded to `dtype`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.kernels.frozen import tie_to

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def needs_tied_matmul(weight_dtype: Any, dtype: Any) -> bool:
    """Whether x @ W in `dtype` with a weight of `weight_dtype` converts the weight (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(weight_dtype) != dtype or (dtype in _HALF and jax.default_backend() == "cpu")


def _accumulate_dtype(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    return jnp.float32 if dtype in _HALF and jax.default_backend() == "cpu" else dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense_matmul(x_MxI: jax.Array, kernel_IxO: jax.Array, dtype: Any) -> jax.Array:
    """x @ kernel.astype(dtype) in `dtype`, the kernel converted next to its use (see the module docstring)."""
    return _forward(x_MxI, kernel_IxO, dtype)


def _converted(kernel: jax.Array, anchor: jax.Array, dtype: Any) -> jax.Array:
    acc = _accumulate_dtype(dtype)
    return tie_to(kernel, anchor).astype(dtype).astype(acc)


def _forward(x, kernel, dtype):
    acc = _accumulate_dtype(dtype)
    y = jnp.matmul(x.astype(dtype).astype(acc), _converted(kernel, x, dtype), preferred_element_type=acc)
    return y.astype(dtype)


def _fwd(x, kernel, dtype):
    return _forward(x, kernel, dtype), (x, kernel)


def _bwd(dtype, residual, dy):
    x, kernel = residual
    acc = _accumulate_dtype(dtype)
    dy_acc = dy.astype(dtype).astype(acc)
    dx = jnp.matmul(dy_acc, _converted(kernel, dy, dtype).T, preferred_element_type=acc).astype(x.dtype)
    x2 = x.astype(dtype).astype(acc).reshape(-1, x.shape[-1])
    dw = jnp.matmul(x2.T, dy_acc.reshape(-1, dy.shape[-1]), preferred_element_type=acc).astype(kernel.dtype)
    return dx, dw


dense_matmul.defvjp(_fwd, _bwd)

__all__ = ["dense_matmul", "needs_tied_matmul"]
