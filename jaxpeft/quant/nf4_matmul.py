"""`nf4_matmul`: x @ W for a 4-bit (I, O) kernel (`nf4.Quantized4bit`), through XLA or the fused Pallas kernel.

Shape legend: M rows of x (all leading dims flattened), I in features, O out features.

The choice between the implementations and the Pallas calls live in `kernels/nf4_matmul` (raw arrays);
the custom VJP in `kernels/frozen.py`: the gradient with respect to x is dy @ Wᵀ through the same
implementation (dequantized again, so no dense W is kept between forward and backward), and the frozen
quantized weight gets zero cotangents, never a gradient. The XLA path is the specification: dequantize
the whole weight in fp32, cast once to the compute dtype, one plain matmul; under jit XLA fuses the
dequantization into the producer of the dense weight.

This module takes the weight by its methods and fields (`shape`, `blocksize`, `quant_type`, `transposed`,
`packed`, `code_values`, `dequantize`, `absmax_fp32`), so `nf4.py` can call it without an import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.frozen import frozen_matmul, tie_to
from jaxpeft.kernels.nf4_matmul import api as kernel_api
from jaxpeft.kernels.nf4_matmul.pallas import Tiles
from jaxpeft.quant.protocol import QuantizedKernel


def nf4_matmul_reference(x_MxI: jax.Array, q: Any, dtype: Any) -> jax.Array:
    """x @ W in `dtype`, W the (I, O) kernel that `q` holds, dequantized in fp32 and cast once to `dtype`."""
    return x_MxI.astype(dtype) @ q.dequantize(dtype)


def nf4_matmul_t_reference(dy_MxO: jax.Array, q: Any, dtype: Any) -> jax.Array:
    """dy @ Wᵀ in `dtype`: the gradient of `nf4_matmul_reference` with respect to x."""
    return dy_MxO.astype(dtype) @ q.dequantize(dtype).T


@dataclasses.dataclass(frozen=True)
class _NF4Impl:
    """`frozen_matmul`'s static half for a 4-bit kernel: each pass ties the codes to its input first."""

    plan: kernel_api.Plan

    def forward(self, x_MxI: jax.Array, q: Any) -> jax.Array:
        q = dataclasses.replace(q, packed=tie_to(q.packed, x_MxI))
        if self.plan.implementation == "xla":
            return nf4_matmul_reference(x_MxI, q, self.plan.dtype_name)
        return kernel_api.pallas_forward(x_MxI, q.packed, q.absmax_fp32(), shape=q.shape, blocksize=q.blocksize,
                                         table=q.code_values, plan=self.plan)

    def backward(self, dy_MxO: jax.Array, q: Any) -> jax.Array:
        q = dataclasses.replace(q, packed=tie_to(q.packed, dy_MxO))
        if self.plan.implementation == "xla":
            return nf4_matmul_t_reference(dy_MxO, q, self.plan.dtype_name)
        return kernel_api.pallas_backward(dy_MxO, q.packed, q.absmax_fp32(), shape=q.shape, blocksize=q.blocksize,
                                          table=q.code_values, plan=self.plan)


def _check(x: jax.Array, q: Any) -> None:
    is_kernel = isinstance(q, QuantizedKernel) and getattr(q, "transposed", False) and len(q.shape) == 2
    if not is_kernel:
        found = (f"shape {q.shape}, transposed={getattr(q, 'transposed', None)}" if isinstance(q, QuantizedKernel)
                 else type(q).__name__)
        raise ConfigError(f"nf4_matmul expects a quantized (I, O) kernel from quantize_kernel; got {found}")
    if x.shape[-1] != q.shape[0]:
        raise ConfigError(f"nf4_matmul: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the kernel "
                          f"expects {q.shape[0]} (kernel shape {q.shape})")


def nf4_matmul(
    x: jax.Array,
    q: Any,
    *,
    dtype: Any,
    implementation: str | None = None,
    interpret: bool | None = None,
    tiles: Tiles | None = None,
) -> jax.Array:
    """x @ W in `dtype`, W the (I, O) kernel held by `q` (from `quantize_kernel`); x is (..., I).

    implementation: None picks the best for the platform ("pallas" on a GPU when `supports` and
    M <= PALLAS_MAX_M, else "xla"); forcing "pallas" on an unsupported weight raises
    NotImplementedError with the reason. interpret: run Pallas in interpret mode (default: off a GPU).
    tiles: forward tile override (benchmarks); default `pallas.forward_tiles`.
    """
    _check(x, q)
    i, o = q.shape
    m = kernel_api.flat_rows(x)
    plan = kernel_api.plan_nf4_matmul(m, (i, o), dtype=dtype, blocksize=q.blocksize, quant_type=q.quant_type,
                                      implementation=implementation, interpret=interpret, tiles=tiles)
    y = frozen_matmul(x.reshape(m, i).astype(plan.dtype_name), q, _NF4Impl(plan))
    return y.reshape(*x.shape[:-1], o)


__all__ = ["nf4_matmul", "nf4_matmul_reference", "nf4_matmul_t_reference"]
