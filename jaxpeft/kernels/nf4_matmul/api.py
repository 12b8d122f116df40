"""`nf4_matmul`: x @ W for an NF4 (I, O) kernel, choosing between XLA and the fused Pallas kernel.

Shape legend: M rows of x (all leading dims flattened), I in features, O out features.

Implementations (tokamax-style, behind the tested `supports` gate):
- "xla": `reference.nf4_matmul_reference`, dequantize then matmul; XLA fuses the dequantization. The
  default on the CPU, and on the GPU for M > `PALLAS_MAX_M` (training, prefill), where the matmul is
  compute-bound and a full-rate GEMM on the dense weight is the baseline to beat.
- "pallas": `pallas.nf4_matmul_pallas`, dequantizes tiles in registers, never materialising W. The
  default on the GPU for decode-like M (<= `PALLAS_MAX_M`) when `supports` says yes. On the CPU it
  runs only with `interpret=True` (the default there), which is for tests, not speed.

Both sit behind one `jax.custom_vjp`: the gradient w.r.t. x is dy @ Wᵀ through the same
implementation (dequantized again, so no dense W is kept between forward and backward), and the
frozen quantized weight gets zero cotangents (float0 for its integer leaves), never a gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.nf4_matmul import pallas as pallas_impl
from jaxpeft.kernels.nf4_matmul.reference import absmax_fp32, nf4_matmul_reference, nf4_matmul_t_reference
from jaxpeft.quant.nf4 import NF4_CODE, Quantized4bit, dequantize_kernel

IMPLEMENTATIONS = ("xla", "pallas")
# Largest M for which the default on a GPU is the fused kernel (bitsandbytes dispatches the same way:
# fused 4-bit GEMV for decode, dequantize + GEMM otherwise). To be confirmed by bench/nf4_matmul.py on a GPU.
PALLAS_MAX_M = 64
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_TABLE = tuple(float(v) for v in NF4_CODE)  # exact: every float32 is a Python float


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
class _Plan:
    """Everything static about one call: the nondiff argument of the custom VJP."""

    dtype_name: str
    implementation: str
    interpret: bool
    forward_tiles: pallas_impl.Tiles | None
    backward_tiles: pallas_impl.Tiles | None


def _operands(q: Quantized4bit) -> tuple[jax.Array, jax.Array]:
    """packed uint8 [O, I / 2] and fp32 absmax [O, I / blocksize] (double quantization undone by XLA)."""
    i, o = q.shape
    return q.packed.reshape(o, i // 2), absmax_fp32(q).reshape(o, i // q.blocksize)


def _tied_to(q: Quantized4bit, x: jax.Array) -> Quantized4bit:
    """`q` with a data dependency on `x`: its packed codes plus an exact 0 computed from x.

    Without it XLA sees every layer's dequantization as depending on the weights alone: with the layers
    unrolled it schedules them all at the start of the step and shares the forward's with the
    backward's (CSE), so every dense weight is alive at once (measured on SmolLM2's QLoRA train step:
    +420 MB of temporaries, all its linears in fp32). `optimization_barrier` does not survive the CPU
    pipeline; a data dependency does. The 0 is exact for finite x; a non-finite x gives a non-finite
    output anyway.
    """
    zero = (jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32) * 0.0).astype(q.packed.dtype)
    return dataclasses.replace(q, packed=q.packed + zero)


def _forward(x_MxI: jax.Array, q: Quantized4bit, plan: _Plan) -> jax.Array:
    q = _tied_to(q, x_MxI)
    if plan.implementation == "xla":
        return nf4_matmul_reference(x_MxI, q, plan.dtype_name)
    packed, absmax = _operands(q)
    return pallas_impl.nf4_matmul_pallas(x_MxI, packed, absmax, table=_TABLE, blocksize=q.blocksize,
                                         tiles=plan.forward_tiles, interpret=plan.interpret)


def _backward_x(dy_MxO: jax.Array, q: Quantized4bit, plan: _Plan) -> jax.Array:
    q = _tied_to(q, dy_MxO)
    if plan.implementation == "xla":
        return nf4_matmul_t_reference(dy_MxO, q, plan.dtype_name)
    packed, absmax = _operands(q)
    return pallas_impl.nf4_matmul_t_pallas(dy_MxO.astype(plan.dtype_name), packed, absmax, table=_TABLE,
                                           blocksize=q.blocksize, tiles=plan.backward_tiles,
                                           interpret=plan.interpret)


def _zero_cotangent(leaf: jax.Array) -> Any:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxI: jax.Array, q: Quantized4bit, plan: _Plan) -> jax.Array:
    return _forward(x_MxI, q, plan)


def _matmul_fwd(x_MxI, q, plan):
    return _forward(x_MxI, q, plan), q  # residual: the 4-bit weight only, never the dense one


def _matmul_bwd(plan, q, dy_MxO):
    return _backward_x(dy_MxO, q, plan), jax.tree.map(_zero_cotangent, q)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check(x: jax.Array, q: Any) -> None:
    if not isinstance(q, Quantized4bit) or not q.transposed or q.ndim != 2:
        found = (f"shape {q.shape}, transposed={q.transposed}" if isinstance(q, Quantized4bit)
                 else type(q).__name__)
        raise ConfigError(f"nf4_matmul expects a quantized (I, O) kernel from quantize_kernel; got {found}")
    if x.shape[-1] != q.shape[0]:
        raise ConfigError(f"nf4_matmul: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the kernel "
                          f"expects {q.shape[0]} (kernel shape {q.shape})")


def _check_tiles(tiles: pallas_impl.Tiles, i: int, o: int) -> None:
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


def nf4_matmul(
    x: jax.Array,
    q: Quantized4bit,
    *,
    dtype: Any,
    implementation: str | None = None,
    interpret: bool | None = None,
    tiles: pallas_impl.Tiles | None = None,
) -> jax.Array:
    """x @ W in `dtype`, W the (I, O) kernel held by `q` (from `quantize_kernel`); x is (..., I).

    implementation: None picks the best for the platform ("pallas" on a GPU when `supports` and
    M <= PALLAS_MAX_M, else "xla"); forcing "pallas" on an unsupported weight raises
    NotImplementedError with the reason. interpret: run Pallas in interpret mode (default: off a GPU).
    tiles: forward tile override (benchmarks); default `pallas.forward_tiles`.
    """
    _check(x, q)
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ConfigError(f"implementation {implementation!r}: expected None or one of {list(IMPLEMENTATIONS)}")
    dtype_name = jnp.dtype(dtype).name
    i, o = q.shape
    m = math.prod(x.shape[:-1])
    ok, reason = supports(q.shape, dtype_name, q.blocksize, quant_type=q.quant_type)
    if implementation is None:
        implementation = "pallas" if ok and _on_gpu() and m <= PALLAS_MAX_M else "xla"
    if implementation == "pallas" and not ok:
        raise NotImplementedError(f"the Pallas NF4 matmul does not support this weight: {reason}. "
                                  "Use implementation='xla' (or None) for it.")
    pallas = implementation == "pallas"
    if pallas and tiles is not None:
        _check_tiles(tiles, i, o)
    plan = _Plan(
        dtype_name=dtype_name,
        implementation=implementation,
        interpret=(not _on_gpu()) if interpret is None else bool(interpret),
        forward_tiles=(tiles or pallas_impl.forward_tiles(m, i, o)) if pallas else None,
        backward_tiles=pallas_impl.backward_tiles(m, i, o) if pallas else None,
    )
    y = _matmul(x.reshape(m, i).astype(dtype_name), q, plan)
    return y.reshape(*x.shape[:-1], o)


def qkernel_matmul(x: jax.Array, leaf: Any, dtype: Any) -> jax.Array:
    """`ops.KERNEL_MATMULS["qkernel"]`: NF4 kernels through `nf4_matmul`, anything else densified."""
    if isinstance(leaf, Quantized4bit) and leaf.quant_type == "nf4" and leaf.transposed and leaf.ndim == 2:
        return nf4_matmul(x, leaf, dtype=dtype)
    return x @ dequantize_kernel(leaf, dtype)


def register() -> None:
    """Makes `ops.linear` multiply `qkernel` leaves with `qkernel_matmul` (done on import of this package)."""
    from jaxpeft.models import ops

    ops.KERNEL_MATMULS["qkernel"] = qkernel_matmul


__all__ = ["IMPLEMENTATIONS", "PALLAS_MAX_M", "nf4_matmul", "qkernel_matmul", "register", "supports"]
