"""The NF4 matmul's dispatch on raw arrays: the `supports` gate, the choice between XLA and Pallas, the
Pallas calls.

Shape legend: M rows of x (all leading dims flattened), I in features, O out features.

Implementations (tokamax-style, behind the tested `supports` gate):
- "xla": dequantize then matmul; XLA fuses the dequantization. The default on the CPU, and on the GPU
  for M > `PALLAS_MAX_M` (training, prefill), where the matmul is compute-bound and a full-rate GEMM on
  the dense weight is the baseline to beat. The dequantization is the weight format's own
  (`quant/nf4.py`); this module never sees a quantized object, only shapes and the Pallas operands.
- "pallas": `pallas.nf4_matmul_pallas`, dequantizes tiles in registers, never materialising W. The
  default on the GPU for decode-like M (<= `PALLAS_MAX_M`) when `supports` says yes. On the CPU it
  runs only with `interpret=True` (the default there), which is for tests, not speed.

`quant/nf4_matmul.py` puts both behind one custom VJP (`kernels/frozen.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.nf4_matmul import pallas as pallas_impl

IMPLEMENTATIONS = ("xla", "pallas")
# Largest M for which the default on a GPU is the fused kernel (bitsandbytes dispatches the same way:
# fused 4-bit GEMV for decode, dequantize + GEMM otherwise). To be confirmed by bench/nf4_matmul.py on a GPU.
PALLAS_MAX_M = 64
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def supports(shape: tuple[int, ...], dtype: Any, blocksize: int, *, quant_type: str = "nf4") -> tuple[bool, str]:
    """Whether the Pallas kernel takes an NF4 kernel of logical `shape` (I, O) computing in `dtype`.

    Returns (ok, reason); the reason lists every problem at once. Any M is fine (rows are padded).
    """
    problems = []
    if quant_type != "nf4":
        problems.append(f"quant_type {quant_type!r}: the kernel implements 'nf4' only")
    if jnp.dtype(dtype).name not in SUPPORTED_DTYPES:
        problems.append(f"dtype {jnp.dtype(dtype).name}: expected one of {list(SUPPORTED_DTYPES)}")
    if blocksize <= 0 or blocksize & (blocksize - 1):
        problems.append(f"blocksize {blocksize}: expected a power of two")
    if len(shape) != 2:
        problems.append(f"shape {tuple(shape)}: expected a 2-D (in, out) kernel")
    else:
        i, o = shape
        if i % 32:
            problems.append(f"in features {i}: expected a multiple of 32 (the smallest reduction tile)")
        if blocksize > 0 and i % blocksize:
            problems.append(f"in features {i}: expected a multiple of blocksize {blocksize}, so that every "
                            "absmax block lies within one output row")
        if o % 16:
            problems.append(f"out features {o}: expected a multiple of 16 (the smallest output tile)")
    return (not problems, "; ".join(problems) if problems else "supported")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call (hashable): the implementation, its dtype and tiles."""

    dtype_name: str
    implementation: str
    interpret: bool
    forward_tiles: pallas_impl.Tiles | None
    backward_tiles: pallas_impl.Tiles | None


def check_tiles(tiles: pallas_impl.Tiles, i: int, o: int) -> None:
    problems = [f"{name}={v}: expected a power of two >= {low}"
                for name, v, low in (("block_m", tiles.block_m, 16), ("block_n", tiles.block_n, 16),
                                     ("block_k", tiles.block_k, 32)) if v < low or v & (v - 1)]
    if o % tiles.block_n:
        problems.append(f"block_n={tiles.block_n} does not divide the {o} out features")
    if i % tiles.block_k:
        problems.append(f"block_k={tiles.block_k} does not divide the {i} in features")
    if problems:
        raise ConfigError("bad forward tiles for nf4_matmul: " + "; ".join(problems))


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def plan_nf4_matmul(
    m: int,
    shape: tuple[int, int],
    *,
    dtype: Any,
    blocksize: int,
    quant_type: str,
    implementation: str | None = None,
    interpret: bool | None = None,
    tiles: pallas_impl.Tiles | None = None,
) -> Plan:
    """The plan of x (M, I) @ W for a 4-bit kernel of logical `shape` (I, O).

    implementation: None picks the best for the platform ("pallas" on a GPU when `supports` and
    M <= PALLAS_MAX_M, else "xla"); forcing "pallas" on an unsupported weight raises
    NotImplementedError with the reason. interpret: run Pallas in interpret mode (default: off a GPU).
    tiles: forward tile override (benchmarks); default `pallas.forward_tiles`.
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ConfigError(f"implementation {implementation!r}: expected None or one of {list(IMPLEMENTATIONS)}")
    dtype_name = jnp.dtype(dtype).name
    i, o = shape
    ok, reason = supports(shape, dtype_name, blocksize, quant_type=quant_type)
    if implementation is None:
        implementation = "pallas" if ok and on_gpu() and m <= PALLAS_MAX_M else "xla"
    if implementation == "pallas" and not ok:
        raise NotImplementedError(f"the Pallas NF4 matmul does not support this weight: {reason}. "
                                  "Use implementation='xla' (or None) for it.")
    pallas = implementation == "pallas"
    if pallas and tiles is not None:
        check_tiles(tiles, i, o)
    return Plan(
        dtype_name=dtype_name,
        implementation=implementation,
        interpret=(not on_gpu()) if interpret is None else bool(interpret),
        forward_tiles=(tiles or pallas_impl.forward_tiles(m, i, o)) if pallas else None,
        backward_tiles=pallas_impl.backward_tiles(m, i, o) if pallas else None,
    )


def operands(packed: jax.Array, absmax_K: jax.Array, shape: tuple[int, int],
             blocksize: int) -> tuple[jax.Array, jax.Array]:
    """packed uint8 [O, I / 2] and fp32 absmax [O, I / blocksize] of an (I, O) kernel stored in torch [O, I] order."""
    i, o = shape
    return packed.reshape(o, i // 2), absmax_K.reshape(o, i // blocksize)


def pallas_forward(x_MxI: jax.Array, packed: jax.Array, absmax_K: jax.Array, *, shape: tuple[int, int],
                   blocksize: int, table: tuple[float, ...], plan: Plan) -> jax.Array:
    """y = x W [M, O] through the Pallas kernel; `absmax_K` is the fp32 block scales."""
    packed_OxI2, absmax_OxIb = operands(packed, absmax_K, shape, blocksize)
    return pallas_impl.nf4_matmul_pallas(x_MxI, packed_OxI2, absmax_OxIb, table=table, blocksize=blocksize,
                                         tiles=plan.forward_tiles, interpret=plan.interpret)


def pallas_backward(dy_MxO: jax.Array, packed: jax.Array, absmax_K: jax.Array, *, shape: tuple[int, int],
                    blocksize: int, table: tuple[float, ...], plan: Plan) -> jax.Array:
    """dx = dy Wᵀ [M, I] through the Pallas kernel."""
    packed_OxI2, absmax_OxIb = operands(packed, absmax_K, shape, blocksize)
    return pallas_impl.nf4_matmul_t_pallas(dy_MxO.astype(plan.dtype_name), packed_OxI2, absmax_OxIb, table=table,
                                           blocksize=blocksize, tiles=plan.backward_tiles,
                                           interpret=plan.interpret)


def flat_rows(x: jax.Array) -> int:
    """M: the rows of x (..., I) with every leading dim flattened."""
    return math.prod(x.shape[:-1])


__all__ = ["IMPLEMENTATIONS", "PALLAS_MAX_M", "SUPPORTED_DTYPES", "Plan", "check_tiles", "on_gpu", "operands",
           "pallas_backward", "pallas_forward", "plan_nf4_matmul", "supports"]
