"""The specification of the NF4 matmul: dequantize the whole weight, then one plain matmul.

Shape legend: M rows of x, I in features, O out features.

This is also the XLA path (`implementation="xla"`): under jit XLA fuses the dequantization into the
producer of the dense weight and runs the matmul at the dtype's full rate, which for training and
prefill shapes is the baseline any fused kernel has to beat.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxpeft.quant.nf4 import Quantized4bit, _absmax_fp32, dequantize_kernel


def nf4_matmul_reference(x_MxI: jax.Array, q: Quantized4bit, dtype: Any) -> jax.Array:
    """x @ W in `dtype`, W the (I, O) kernel that `q` holds, dequantized in fp32 and cast once to `dtype`."""
    return x_MxI.astype(dtype) @ dequantize_kernel(q, dtype)


def nf4_matmul_t_reference(dy_MxO: jax.Array, q: Quantized4bit, dtype: Any) -> jax.Array:
    """dy @ Wᵀ in `dtype`: the gradient of `nf4_matmul_reference` with respect to x."""
    return dy_MxO.astype(dtype) @ dequantize_kernel(q, dtype).T


def absmax_fp32(q: Quantized4bit) -> jax.Array:
    """The per-block absmax in fp32 [K], undoing double quantization when there is one."""
    return _absmax_fp32(q)  # the one definition of the nested reconstruction (bit-exact with bitsandbytes)


__all__ = ["absmax_fp32", "nf4_matmul_reference", "nf4_matmul_t_reference"]
