"""bitsandbytes' 8-bit dynamic map and its CPU blockwise quantizer, used for NF4 double quantization.

Shape legend: N values, K blocks (ceil(N / blocksize)).

The map is `bitsandbytes.functional.create_dynamic_map()` (signed, 7 exponent bits): 127 positive
values, their negatives, 0 and 1.0, sorted. Its float32 values come from `torch.linspace` (whose
vectorised CPU kernel a numpy re-derivation does not reproduce), so the 127 positive values are
hard-coded as big-endian float32 bit patterns.

bitsandbytes' CPU `quantize_blockwise` (0.50.x) does not count midpoints: per block it takes
absmax (fp32), scales by MULTIPLYING with `1 / absmax`, clamps to [-1, 1], maps the scaled value onto a
65536-point grid, `idx = trunc(((v + 1) * 0.5) * 65535 + 0.5)`, and reads the code from a table
built once: `lut[i]` = number of midpoints strictly below `-1 + 2i / 65535`. A block whose absmax is 0
gets code 0. We reproduce that rule bit for bit (checked at all 65536 grid points and on random data);
the plain midpoint rule would differ from it wherever a value lies within one grid step (~3e-5) of a
midpoint, and maps an exact 0 to code 127 where bitsandbytes gives 131.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_POSITIVE_HEX = (
    "3513a3b7365a1a94370205ff37b2420638378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a80"
    "3a59e83e3a7765ff3aa7ef9d3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd3"
    "3bf4bc6a3c0395813c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb852"
    "3d0ae1483d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb33343df80000"
    "3e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d33343e9466663e9b999a"
    "3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a3eeacccc3ef200003ef93332"
    "3f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d00003f20999a3f2433343f27cccd3f2b6666"
    "3f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f4833333f4bcccd3f4f66663f5300003f56999a3f5a3333"
    "3f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f7366663f7700003f7a999a3f7e3333"
)
LUT_SIZE = 65536


def create_dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map()` (signed, 8 bits): float32[256], sorted ascending."""
    pos = np.frombuffer(bytes.fromhex(_POSITIVE_HEX), dtype=">f4").astype(np.float32)
    return np.sort(np.concatenate([-pos, pos, np.float32([0.0, 1.0])])).astype(np.float32)


def build_lut(code_256: np.ndarray) -> np.ndarray:
    """The CPU kernel's grid -> code table: lut[i] = #float32 midpoints strictly below -1 + 2i/65535."""
    code = np.asarray(code_256, np.float32)
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    grid = np.float32(-1.0) + (np.float32(2.0) * np.arange(LUT_SIZE, dtype=np.float32)) / np.float32(LUT_SIZE - 1)
    return np.searchsorted(mids, grid, side="left").astype(np.uint8)


DYNAMIC_MAP = create_dynamic_map()
DYNAMIC_LUT = build_lut(DYNAMIC_MAP)


def no_fma(product: jax.Array) -> jax.Array:
    """`product`, rounded on its own: XLA contracts `a * b + c` into an FMA (one rounding) where C and torch
    round twice. A select on the product breaks the pattern (an optimization barrier does not survive
    to codegen); it turns -0.0 into +0.0, which no sum that follows can tell apart."""
    return jnp.where(product == 0, 0.0, product)


def _pad_to_blocks(x_N: jax.Array, blocksize: int) -> jax.Array:
    n = x_N.shape[0]
    k = -(-n // blocksize)
    return jnp.pad(x_N, (0, k * blocksize - n)).reshape(k, blocksize)


def lut_codes(scaled: jax.Array) -> jax.Array:
    """uint8 codes of values already scaled by 1 / absmax, through the CPU kernel's 65536-point table."""
    scaled = jnp.clip(scaled, -1.0, 1.0)
    grid = no_fma(((scaled + 1.0) * 0.5) * (LUT_SIZE - 1))  # C rounds the product, then adds
    idx = (grid + 0.5).astype(jnp.int32)  # truncation toward zero, as the C cast
    return jnp.asarray(DYNAMIC_LUT)[idx]


def quantize_blockwise_8bit(x_N: jax.Array, blocksize: int = 256) -> tuple[jax.Array, jax.Array]:
    """(codes uint8 [N], absmax fp32 [K]) as bitsandbytes' CPU `quantize_blockwise` computes them."""
    n = x_N.shape[0]
    x_KxB = _pad_to_blocks(x_N.astype(jnp.float32), blocksize)  # zero padding leaves each absmax unchanged
    absmax_K = jnp.max(jnp.abs(x_KxB), axis=1)
    inv_K = 1.0 / jnp.where(absmax_K == 0, 1.0, absmax_K)
    codes = lut_codes(x_KxB * inv_K[:, None])
    codes = jnp.where((absmax_K == 0)[:, None], jnp.uint8(0), codes)
    return codes.reshape(-1)[:n], absmax_K


def dequantize_blockwise_8bit(codes_N: jax.Array, absmax_K: jax.Array, blocksize: int = 256) -> jax.Array:
    """fp32 `code[q] * absmax[i // blocksize]`, as bitsandbytes' `dequantize_blockwise`."""
    n = codes_N.shape[0]
    vals_KxB = _pad_to_blocks(jnp.asarray(DYNAMIC_MAP)[codes_N.astype(jnp.int32)], blocksize)
    return (vals_KxB * absmax_K.astype(jnp.float32)[:, None]).reshape(-1)[:n]
