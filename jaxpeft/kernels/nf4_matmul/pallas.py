"""Fused NF4 dequantize-and-matmul in portable Pallas (Triton lowering on the GPU, `interpret=True` on the CPU).

Shape legend: M rows of x, I in features, O out features, I2 = I // 2 (bytes per weight row),
Ib = I // blocksize (absmax blocks per row), tm/tn/tk tile sizes.

Storage (bitsandbytes' torch layout, `quant/nf4.py`): the bytes hold W as [O, I] row-major, two codes a
byte, the EVEN element of a pair in the high nibble. With I % blocksize == 0 every absmax block lies in
one row, so `packed` is a uint8 [O, I2] matrix and `absmax` an fp32 [O, Ib] one, and no weight tile ever
needs to be re-interleaved: we split x instead. With x_e = x[:, 0::2] and x_o = x[:, 1::2],

    y = x @ Wᵀ_OxI = x_e @ hiᵀ + x_o @ loᵀ,    hi/lo = dequantized high/low nibbles, [O, I2] each,

and for the gradient dx = dy @ W_OxI, dx[:, 0::2] = dy @ hi and dx[:, 1::2] = dy @ lo. The strided
split of x and the interleave of dx are cheap XLA ops on activations, outside the kernels.

Each kernel program owns one output tile and loops over the reduction inside the kernel
(`lax.fori_loop` over `pl.ds` slices of refs whose block spans the whole reduction axis), as the
jax repo's GPU Pallas ops do: the Triton grid runs in parallel, so an accumulator carried across a
grid axis (the TPU idiom) would race there. Per step it loads a tile of packed bytes and the absmax
columns of those blocks, splits the nibbles, maps codes to values with a 15-select tree on the 4 bits
(no gather, which Triton cannot lower), scales in fp32 (the same single rounding as the reference),
casts to the compute dtype and accumulates in fp32 (`lax.dot_general`).

Triton constraints honoured: every loaded value has power-of-two dims; every dot has dims >= 16 (M is
padded to the row tile, so a decode GEMV runs as a 16-row tile); no unsigned integers in a dot.
Double-quantized absmax is reconstructed by XLA before the call (`reference.absmax_fp32`): O * Ib fp32
values, 1/16 of a byte per weight, next to the 1/2 byte of codes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

_TARGET_PROGRAMS = 264  # 2 x the 132 SMs of an H200; a guess until measured on the GPU


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch parameters, all powers of two.

    Forward (y = x Wᵀ): a program owns `block_m` rows x `block_n` output features and steps over the
    in features `block_k` at a time. Backward (dx = dy W): a program owns `block_m` rows x `block_n` in
    features and steps over the out features `block_k` at a time.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def _largest_dividing(n: int, candidates: tuple[int, ...]) -> int | None:
    return next((c for c in candidates if n % c == 0), None)


def _block_m(m: int) -> int:
    # Decode rows go in one 16-row tile (Triton's minimum); training shapes use 64-row tiles.
    return 16 if m <= 16 else 32 if m <= 32 else 64


def forward_tiles(m: int, i: int, o: int) -> Tiles | None:
    """Default forward tiles, or None when (I, O) admit none (I % 32, O % 16 must be 0)."""
    block_k = _largest_dividing(i, (256, 128, 64, 32))
    divisors = [c for c in (128, 64, 32, 16) if o % c == 0]
    if block_k is None or not divisors:
        return None
    block_m = _block_m(m)
    # The widest output tile that still gives ~2 programs per SM of an H200 (132 SMs); at decode
    # (one row tile) that means narrower tiles. Never below 32 unless O leaves no choice.
    rows = -(-m // block_m)
    wide = [c for c in divisors if c >= 32] or divisors
    block_n = next((c for c in wide if rows * (o // c) >= _TARGET_PROGRAMS), wide[-1])
    return Tiles(block_m, block_n, block_k)


def backward_tiles(m: int, i: int, o: int) -> Tiles | None:
    """Default backward tiles (block_n counts in features, two half-columns of I2 per byte)."""
    block_n = _largest_dividing(i, (128, 64, 32))
    block_k = _largest_dividing(o, (128, 64, 32, 16))
    if block_n is None or block_k is None:
        return None
    return Tiles(_block_m(m), block_n, block_k)


def _lookup(codes: jax.Array, table: tuple[float, ...]) -> jax.Array:
    """table[codes] in fp32 through a select tree on the 4 bits: 15 selects, no gather."""
    level = [jnp.where((codes & 1) != 0, np.float32(table[2 * k + 1]), np.float32(table[2 * k]))
             for k in range(8)]
    for bit in (2, 4, 8):
        pick = (codes & bit) != 0
        level = [jnp.where(pick, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
    return level[0]


def _scales(absmax_ref, rows, first_block, shape: tuple[int, int], blocksize: int) -> jax.Array:
    """fp32 absmax for every half-column of a (rows, width) tile whose first block is `first_block`.

    Half-column j of the tile holds elements 2j, 2j + 1, in block j // (blocksize / 2). A tile narrower
    than a block needs one column; a wider one expands its blocks with selects (no reshape or gather).
    """
    width = shape[1]
    n_blocks = max(1, 2 * width // blocksize)
    scale = jnp.broadcast_to(absmax_ref[rows, pl.ds(first_block, 1)], shape)
    if n_blocks > 1:
        block_of_col = lax.broadcasted_iota(jnp.int32, shape, 1) // (blocksize // 2)
        for b in range(1, n_blocks):
            scale = jnp.where(block_of_col == b, absmax_ref[rows, pl.ds(first_block + b, 1)], scale)
    return scale


def _dequant(packed: jax.Array, scale: jax.Array, table, dtype) -> tuple[jax.Array, jax.Array]:
    """(hi, lo) weight tiles in `dtype`: code value x absmax in fp32, then one cast, as the reference."""
    codes = packed.astype(jnp.int32)
    return ((_lookup(codes >> 4, table) * scale).astype(dtype),
            (_lookup(codes & 0xF, table) * scale).astype(dtype))


def _dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ bᵀ) accumulated in fp32. `lax.dot_general`, not `pl.dot` (deprecated in 0.10)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _forward_kernel(xe_ref, xo_ref, packed_ref, absmax_ref, y_ref, *, table, blocksize, block_k):
    tm, tn, half = xe_ref.shape[0], packed_ref.shape[0], block_k // 2
    steps = packed_ref.shape[1] // half

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * half, half), half)
        scale = _scales(absmax_ref, slice(None), (k * block_k) // blocksize, (tn, half), blocksize)
        hi, lo = _dequant(packed_ref[:, cols], scale, table, xe_ref.dtype)
        acc = acc + _dot(xe_ref[:, cols], hi, trans_b=True)
        return acc + _dot(xo_ref[:, cols], lo, trans_b=True)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((tm, tn), jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _backward_kernel(dy_ref, packed_ref, absmax_ref, dxe_ref, dxo_ref, *, table, blocksize, block_k):
    tm, half = dy_ref.shape[0], packed_ref.shape[1]
    first_block = pl.program_id(1) * (2 * half) // blocksize
    steps = packed_ref.shape[0] // block_k

    def step(k, accs):
        rows = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        scale = _scales(absmax_ref, rows, first_block, (block_k, half), blocksize)
        hi, lo = _dequant(packed_ref[rows, :], scale, table, dy_ref.dtype)
        dy = dy_ref[:, rows]
        return accs[0] + _dot(dy, hi), accs[1] + _dot(dy, lo)

    zeros = jnp.zeros((tm, half), jnp.float32)
    acc_e, acc_o = lax.fori_loop(0, steps, step, (zeros, zeros))
    dxe_ref[...] = acc_e.astype(dxe_ref.dtype)
    dxo_ref[...] = acc_o.astype(dxo_ref.dtype)


def _compiler_params(tiles: Tiles, interpret: bool) -> dict[str, Any]:
    if interpret:
        return {}
    # Explicit Triton params pick the Triton lowering even where Mosaic GPU becomes the default.
    from jax.experimental.pallas import triton as plt

    return {"compiler_params": plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)}


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    extra = -a.shape[0] % multiple
    return jnp.pad(a, ((0, extra), (0, 0))) if extra else a


@functools.partial(jax.jit, static_argnames=("table", "blocksize", "tiles", "interpret"))
def nf4_matmul_pallas(x_MxI: jax.Array, packed_OxI2: jax.Array, absmax_OxIb: jax.Array, *,
                      table: tuple[float, ...], blocksize: int, tiles: Tiles, interpret: bool) -> jax.Array:
    """y = x Wᵀ [M, O] in x's dtype; W [O, I] given as packed codes and fp32 absmax (see module docstring)."""
    m = x_MxI.shape[0]
    o, i2 = packed_OxI2.shape
    ib = absmax_OxIb.shape[1]
    x = _pad_rows(x_MxI, tiles.block_m)
    xe, xo = x[:, 0::2], x[:, 1::2]
    kernel = functools.partial(_forward_kernel, table=table, blocksize=blocksize, block_k=tiles.block_k)
    y = pl.pallas_call(
        kernel,
        grid=(x.shape[0] // tiles.block_m, o // tiles.block_n),
        in_specs=[
            pl.BlockSpec((tiles.block_m, i2), lambda r, c: (r, 0)),
            pl.BlockSpec((tiles.block_m, i2), lambda r, c: (r, 0)),
            pl.BlockSpec((tiles.block_n, i2), lambda r, c: (c, 0)),
            pl.BlockSpec((tiles.block_n, ib), lambda r, c: (c, 0)),
        ],
        out_specs=pl.BlockSpec((tiles.block_m, tiles.block_n), lambda r, c: (r, c)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], o), x.dtype),
        interpret=interpret,
        name="nf4_matmul",
        **_compiler_params(tiles, interpret),
    )(xe, xo, packed_OxI2, absmax_OxIb)
    return y[:m]


@functools.partial(jax.jit, static_argnames=("table", "blocksize", "tiles", "interpret"))
def nf4_matmul_t_pallas(dy_MxO: jax.Array, packed_OxI2: jax.Array, absmax_OxIb: jax.Array, *,
                        table: tuple[float, ...], blocksize: int, tiles: Tiles, interpret: bool) -> jax.Array:
    """dx = dy W [M, I] in dy's dtype (the x-gradient of `nf4_matmul_pallas`)."""
    m = dy_MxO.shape[0]
    o, i2 = packed_OxI2.shape
    ib = absmax_OxIb.shape[1]
    half = tiles.block_n // 2
    dy = _pad_rows(dy_MxO, tiles.block_m)
    kernel = functools.partial(_backward_kernel, table=table, blocksize=blocksize, block_k=tiles.block_k)
    half_spec = pl.BlockSpec((tiles.block_m, half), lambda r, c: (r, c))
    dxe, dxo = pl.pallas_call(
        kernel,
        grid=(dy.shape[0] // tiles.block_m, i2 // half),
        in_specs=[
            pl.BlockSpec((tiles.block_m, o), lambda r, c: (r, 0)),
            pl.BlockSpec((o, half), lambda r, c: (0, c)),
            pl.BlockSpec((o, ib), lambda r, c: (0, 0)),
        ],
        out_specs=[half_spec, half_spec],
        out_shape=[jax.ShapeDtypeStruct((dy.shape[0], i2), dy.dtype)] * 2,
        interpret=interpret,
        name="nf4_matmul_t",
        **_compiler_params(tiles, interpret),
    )(dy, packed_OxI2, absmax_OxIb)
    return jnp.stack([dxe, dxo], axis=-1).reshape(dy.shape[0], 2 * i2)[:m]


__all__ = ["Tiles", "backward_tiles", "forward_tiles", "nf4_matmul_pallas", "nf4_matmul_t_pallas"]
