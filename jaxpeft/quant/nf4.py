"""NF4 / FP4 blockwise 4-bit quantization, bit for bit as bitsandbytes computes it on the CPU.

Shape legend: N weights, K blocks (ceil(N / blocksize)), K2 nested blocks (ceil(K / 256)),
I in features, O out features.

Layout. bitsandbytes blocks a weight flattened row-major in TORCH layout [O, I]; a Flax kernel is
[I, O]. `quantize_kernel(kernel_IxO)` transposes first and records `transposed=True`, so the packed
bytes and absmax equal those of `bnb.functional.quantize_4bit(weight_OxI)`; `quantize_4bit(w)` takes
a flat or torch-layout array as it is.

Quantization (bitsandbytes' default `quantize_4bit` kernel, which the CPU backend uses): per block
absmax in fp32; full blocks scaled by MULTIPLYING with `1 / max(absmax, 1e-38)`, the final partial block
DIVIDED by its absmax (stored clamped below at 1e-38); clamp to [-1, 1]; the code is the number of
float32 midpoints (between the sorted code values) strictly below the scaled value, ties to the
lower one. NF4's table is sorted, so that count is the code. FP4's table is in bit-pattern order, so the
count indexes the sorted order, `FP4_SORTED_ORDER`, which bitsandbytes takes from `torch.argsort`: the
two zeros sort +0 (code 0) before -0 (code 8), so a scaled value in (0, 0.0026] gets code 8 (-0.0).
Packing: `byte = (code[2i] << 4) | code[2i + 1]`, an odd length padded with the code of 0.0,
stored uint8 ((N + 1) // 2, 1). Dequantization: `table[code] * absmax` in fp32, then one cast.

Double quantization (`compress_statistics=True`): offset = mean(absmax); absmax - offset quantized in
blocks of 256 with the 8-bit dynamic map (see `dynamic8`); absmax = `map[q] * nested_absmax + offset`.
Our mean may differ from torch's by a few fp32 ulps (different summation order); given the same
offset everything else is bit-exact.

XLA on the CPU flushes subnormals to zero; bitsandbytes does not. Weights whose block absmax is
subnormal therefore quantize differently (to zero codes here); no real weight has such blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxpeft.core.errors import ConfigError, bullet_list
from jaxpeft.core.targets import Targets, match_targets, moe_routers
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.quant import dynamic8
from jaxpeft.quant.nf4_matmul import nf4_matmul
from jaxpeft.quant.protocol import QuantizedKernel

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# get_4bit_type("fp4"): E2M1 values in bit-pattern order, divided by their absmax (12) in float32.
FP4_CODE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
            / np.float32(12.0)).astype(np.float32)
FP4_SORTED_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], np.int32)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb.functional.quantize_4bit's list
ALLOWED_DTYPES = ("float32", "bfloat16", "float16")
NESTED_BLOCKSIZE = 256
_ABSMAX_FLOOR_BITS = int(np.float32(1e-38).view(np.uint32))  # a subnormal: built from bits, XLA flushes it


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["packed", "absmax", "nested_absmax", "offset"],
                   meta_fields=["quant_type", "blocksize", "shape", "dtype_name", "nested_blocksize", "transposed"])
@dataclasses.dataclass(frozen=True)
class Quantized4bit(QuantizedKernel):
    """A 4-bit weight: arrays are pytree children, the format is static metadata (a `QuantizedKernel`).

    packed: uint8 ((N + 1) // 2, 1); absmax: fp32 [K], or uint8 [K] codes when double-quantized, with
    nested_absmax fp32 [K2] and offset fp32 []. `shape` is the logical shape (a kernel's (I, O));
    `transposed` says the bytes hold `shape[::-1]` row-major (torch [O, I] order of an (I, O) kernel).
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype_name: str
    nested_blocksize: int | None = None
    transposed: bool = False

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def logical_size(self) -> int:
        return math.prod(self.shape)

    @property
    def size(self) -> int:
        return self.logical_size

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_blocksize is not None

    @property
    def storage_shape(self) -> tuple[int, ...]:
        """The shape bitsandbytes sees: torch layout [O, I] for a kernel."""
        return tuple(self.shape[::-1]) if self.transposed else tuple(self.shape)

    @property
    def nbytes(self) -> int:
        arrays = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None))

    @property
    def code_values(self) -> tuple[float, ...]:
        """The 16 code values as Python floats (exact: every float32 is one), for kernels that take them static."""
        return tuple(float(v) for v in CODES[self.quant_type])

    def absmax_fp32(self) -> jax.Array:
        """The per-block absmax in fp32 [K], undoing double quantization when there is one."""
        return _absmax_fp32(self)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The dense (I, O) kernel in `dtype` (default: the quantized weight's); see `dequantize_kernel`."""
        return dequantize_kernel(self, dtype)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """x @ W: NF4 kernels through `nf4_matmul` (XLA or Pallas, one custom VJP), anything else densified."""
        if self.quant_type == "nf4" and self.transposed and self.ndim == 2:
            return nf4_matmul(x, self, dtype=dtype)
        return x @ dequantize_kernel(self, dtype)

    def partition_specs(self, mesh_sizes: Mapping[str, int],
                        axis_choices: Sequence[tuple[str, ...]]) -> tuple["Quantized4bit", bool]:
        """A Quantized4bit of PartitionSpecs: the packed codes and absmax split in contiguous runs of whole
        blocks (when the blocks tile the weight exactly); the nested absmax and offset (a few bytes) replicated."""
        k = self.absmax.shape[0]
        chosen = None
        if self.logical_size % self.blocksize == 0:
            for axes in axis_choices:
                axes = tuple(a for a in axes if mesh_sizes.get(a, 1) > 1)
                if axes and k % math.prod(mesh_sizes[a] for a in axes) == 0:
                    chosen = axes[0] if len(axes) == 1 else axes
                    break
        none = lambda x: None if x is None else PartitionSpec()  # noqa: E731
        return dataclasses.replace(self, packed=PartitionSpec(chosen, None), absmax=PartitionSpec(chosen),
                                   nested_absmax=none(self.nested_absmax), offset=none(self.offset)), chosen is not None


def _check(shape: tuple[int, ...], dtype: Any, quant_type: str, blocksize: int, *, kernel: bool) -> None:
    problems = []
    if quant_type not in CODES:
        problems.append(f"quant_type {quant_type!r}: expected one of {sorted(CODES)}")
    if blocksize not in ALLOWED_BLOCKSIZES:
        problems.append(f"blocksize {blocksize!r}: bitsandbytes accepts {list(ALLOWED_BLOCKSIZES)}")
    if jnp.dtype(dtype).name not in ALLOWED_DTYPES:
        problems.append(f"dtype {jnp.dtype(dtype).name}: expected one of {list(ALLOWED_DTYPES)} (cast first)")
    if math.prod(shape) == 0:
        problems.append(f"shape {shape}: an empty weight has nothing to quantize")
    if kernel and len(shape) != 2:
        problems.append(f"shape {shape}: quantize_kernel takes a 2-D Flax kernel (in, out); "
                        "use quantize_4bit for flat or torch-layout weights")
    if problems:
        raise ConfigError("cannot quantize this weight to 4 bits:\n" + bullet_list(problems))


def _scale_blocks(w_N: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """(scaled values in [-1, 1] [N], absmax fp32 [K]) as bitsandbytes' default quantize_4bit kernel."""
    n = w_N.shape[0]
    rem = n % blocksize
    full = n - rem
    parts, absmaxes = [], []
    if full:
        w_KxB = w_N[:full].reshape(-1, blocksize)
        absmax = jnp.max(jnp.abs(w_KxB), axis=1)  # stored unclamped
        inv = 1.0 / jnp.where(absmax == 0, 1.0, absmax)  # torch: 1 / clamp(absmax, 1e-38); same for 0 blocks
        parts.append(jnp.clip(w_KxB * inv[:, None], -1.0, 1.0).reshape(-1))
        absmaxes.append(absmax)
    if rem:
        tail = w_N[full:]
        am = jnp.max(jnp.abs(tail))
        parts.append(jnp.clip(tail / jnp.where(am == 0, 1.0, am), -1.0, 1.0))
        bits = jax.lax.bitcast_convert_type(am, jnp.uint32)  # clamp(am, 1e-38) without subnormal arithmetic
        am = jax.lax.bitcast_convert_type(jnp.maximum(bits, jnp.uint32(_ABSMAX_FLOOR_BITS)), jnp.float32)
        absmaxes.append(am[None])
    return jnp.concatenate(parts), jnp.concatenate(absmaxes)


def _codes(scaled_N: jax.Array, quant_type: str) -> jax.Array:
    """4-bit codes (int32 [N]): the number of float32 midpoints strictly below each value."""
    code = CODES[quant_type]
    order = np.argsort(code, kind="stable") if quant_type == "nf4" else FP4_SORTED_ORDER
    mids = (code[order[:-1]] + code[order[1:]]) / np.float32(2.0)
    bucket = sum((scaled_N > np.float32(m)).astype(jnp.int32) for m in mids)
    return bucket if quant_type == "nf4" else jnp.asarray(order)[bucket]


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "double_quant"))
def _quantize_flat(w_N: jax.Array, *, quant_type: str, blocksize: int, double_quant: bool):
    scaled_N, absmax_K = _scale_blocks(w_N.astype(jnp.float32), blocksize)
    if scaled_N.shape[0] % 2:
        scaled_N = jnp.pad(scaled_N, (0, 1))  # the pad quantizes as 0.0, as bitsandbytes pads
    codes = _codes(scaled_N, quant_type).astype(jnp.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)
    if not double_quant:
        return packed, absmax_K, None, None
    # torch: _absmax.mean(). XLA turns the division into a product by 1/K and, at its default CPU optimisation
    # level, contracted that product into an FMA with the subtraction below (equal blocks then centred to ~2e-8,
    # not bitsandbytes' exact 0, and the bits depended on the optimisation level): no_fma rounds it on its own.
    offset = dynamic8.no_fma(jnp.sum(absmax_K) / absmax_K.shape[0])
    q_K, nested_K2 = dynamic8.quantize_blockwise_8bit(absmax_K - offset, NESTED_BLOCKSIZE)
    return packed, q_K, nested_K2, offset


def _absmax_fp32(q: Quantized4bit) -> jax.Array:
    if not q.double_quant:
        return q.absmax.astype(jnp.float32)
    centered = dynamic8.dequantize_blockwise_8bit(q.absmax, q.nested_absmax, q.nested_blocksize)
    return dynamic8.no_fma(centered) + q.offset.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: Quantized4bit, dtype: Any) -> jax.Array:
    n = q.logical_size
    packed = q.packed.reshape(-1)
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n].astype(jnp.int32)
    vals_N = jnp.asarray(CODES[q.quant_type])[codes]
    k = -(-n // q.blocksize)
    vals_KxB = jnp.pad(vals_N, (0, k * q.blocksize - n)).reshape(k, q.blocksize)
    # Rounded on its own, so that a consumer's add (DoRA's W + dW) cannot fuse into an FMA with it.
    w_N = dynamic8.no_fma(vals_KxB * _absmax_fp32(q)[:, None]).reshape(-1)[:n].astype(dtype)
    w = w_N.reshape(q.storage_shape)
    return w.T if q.transposed else w


def quantize_4bit(
    w: jax.Array, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> Quantized4bit:
    """Quantizes a flat or torch-layout [O, I] weight as `bnb.functional.quantize_4bit` does (row-major blocks).

    `double_quant` is bitsandbytes' `compress_statistics`. For a Flax (I, O) kernel use `quantize_kernel`.
    """
    w = jnp.asarray(w)
    _check(tuple(w.shape), w.dtype, quant_type, blocksize, kernel=False)
    packed, absmax, nested, offset = _quantize_flat(
        w.reshape(-1), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return Quantized4bit(packed, absmax, nested, offset, quant_type=quant_type, blocksize=blocksize,
                         shape=tuple(w.shape), dtype_name=jnp.dtype(w.dtype).name,
                         nested_blocksize=NESTED_BLOCKSIZE if double_quant else None)


def quantize_kernel(
    kernel_IxO: jax.Array, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> Quantized4bit:
    """Quantizes a Flax (I, O) kernel in bitsandbytes' torch [O, I] block order; `.shape` stays (I, O)."""
    kernel_IxO = jnp.asarray(kernel_IxO)
    _check(tuple(kernel_IxO.shape), kernel_IxO.dtype, quant_type, blocksize, kernel=True)
    q = quantize_4bit(kernel_IxO.T, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return dataclasses.replace(q, shape=tuple(kernel_IxO.shape), transposed=True)


def dequantize_4bit(q: Quantized4bit, dtype: Any = None) -> jax.Array:
    """The dense weight in its logical shape (`q.shape`) and `dtype` (default: the quantized weight's)."""
    return _dequantize(q, jnp.dtype(dtype if dtype is not None else q.dtype))


def dequantize_kernel(q: Quantized4bit, dtype: Any = None) -> jax.Array:
    """The dense (I, O) kernel of a `quantize_kernel` result."""
    if not q.transposed or q.ndim != 2:
        raise ConfigError(f"dequantize_kernel expects a quantized (I, O) kernel from quantize_kernel; got shape "
                          f"{q.shape} with transposed={q.transposed}. Use dequantize_4bit for raw weights.")
    return dequantize_4bit(q, dtype)


def is_4bit_kernel(leaf: Any) -> bool:
    """Whether `leaf` is a 4-bit (I, O) kernel as `quantize_kernel` makes it (what bitsandbytes stores)."""
    return isinstance(leaf, Quantized4bit) and leaf.transposed and leaf.ndim == 2


def kernel_from_storage(packed: jax.Array, absmax: jax.Array, nested_absmax: jax.Array | None,
                        offset: jax.Array | None, *, quant_type: str, blocksize: int, dtype_name: str,
                        shape: tuple[int, int], nested_blocksize: int | None = None) -> Quantized4bit:
    """The 4-bit (I, O) kernel of `shape` whose bytes are stored in torch [O, I] order (bitsandbytes' layout):
    packed uint8 ((N + 1) // 2, 1), absmax [K] (uint8 codes with double quantization, nested_absmax,
    offset and nested_blocksize then given)."""
    return Quantized4bit(packed, absmax, nested_absmax, offset, quant_type=quant_type, blocksize=blocksize,
                         shape=tuple(shape), dtype_name=dtype_name, nested_blocksize=nested_blocksize,
                         transposed=True)


def quantize_params(
    params: Mapping,
    *,
    targets: Targets = "all-linear",
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict:
    """Replaces `kernel` by `qkernel` (a `Quantized4bit`) in every targeted linear module.

    "all-linear" is every linear but the output head; embeddings are never linear modules. MoE routers stay
    dense, as transformers' bitsandbytes integration leaves them.
    """
    flat = dict(flatten_params(params))
    routers = moe_routers(params)
    for module in match_targets(params, targets):
        if module + ("kernel",) in flat and module not in routers:
            kernel = flat.pop(module + ("kernel",))
            flat[module + ("qkernel",)] = quantize_kernel(
                kernel, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return unflatten_params(flat)


def dequantize_params(params: Mapping, dtype: Any = None) -> dict:
    """Replaces every `qkernel` by a dense `kernel` (in `dtype`, default each weight's original dtype)."""
    flat = {}
    for path, leaf in flatten_params(params).items():
        if path[-1] == "qkernel":
            flat[path[:-1] + ("kernel",)] = leaf.dequantize(dtype if dtype is not None else leaf.dtype)
        else:
            flat[path] = leaf
    return unflatten_params(flat)


def param_bytes(params: Mapping) -> int:
    """Bytes the parameter tree holds (quantized kernels count their packed codes and statistics)."""
    return int(sum(leaf.nbytes for leaf in flatten_params(params).values()))
