"""The NF4 matmul against its reference (dequantize, then matmul): forward, dx, the gate, the VJP.

The battery runs twice: the Pallas kernel in interpret mode (so the CPU exercises the kernel body),
then the XLA path. Shapes are odd and distinct (I != O) and cover: decode M = 1, odd M, several row
tiles; several absmax blocks per tile and one block spanning several reduction steps; with and
without double quantization. A `gpu` test compiles the kernel for real (skipped without a GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.kernels.nf4_matmul import PALLAS_MAX_M, Tiles, supports
from jaxpeft.models import ops
from jaxpeft.quant import Quantized4bit, QuantizedKernel, quantize_kernel
from jaxpeft.quant.nf4_matmul import nf4_matmul, nf4_matmul_reference, nf4_matmul_t_reference
from tests import tolerances

# (M, I, O, blocksize, double_quant). Pallas tiles they hit (forward block_k / backward block_n):
#   I=512, B=64: two 256-wide steps, 4 absmax blocks expanded in each; M=1 pads to one 16-row tile.
#   I=96, B=32, O=48: 32-wide steps, 16-wide output tiles, no double quantization, M=3.
#   I=1024, B=512, O=80: each block spans two 256-wide steps; M=70 -> two 64-row tiles.
SHAPES = [(1, 512, 128, 64, True), (3, 96, 48, 32, False), (70, 1024, 80, 512, True)]
DTYPES = ["float32", "bfloat16"]
SHAPE_ID = "M{}_I{}_O{}_B{}_dq{:d}".format
# Pallas in interpret mode costs 10-25 s of CPU a case: the default run keeps the small case in both dtypes and
# the two-tile, two-steps-a-block case in bf16; the other interpreted cases are slow (the XLA path runs all).
SLOW_PALLAS = {(SHAPES[0], "float32"), (SHAPES[0], "bfloat16"), (SHAPES[2], "float32")}
PALLAS_CASES = [pytest.param(shape, dtype, id=f"{SHAPE_ID(*shape)}-{dtype}",
                             marks=pytest.mark.slow(reason="another interpreted Pallas case: see SLOW_PALLAS")
                             if (shape, dtype) in SLOW_PALLAS else ()) for shape in SHAPES for dtype in DTYPES]


def _case(m: int, i: int, o: int, blocksize: int, double_quant: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = quantize_kernel(rng.standard_normal((i, o)).astype(np.float32), blocksize=blocksize,
                        double_quant=double_quant)
    return rng.standard_normal((m, i)).astype(np.float32), q


def _close(actual, expected, dtype: str, what: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               err_msg=what, **tolerances.NF4_MATMUL[dtype])


class TestNF4MatmulPallas:
    IMPLEMENTATION = "pallas"
    INTERPRET = True

    def _matmul(self, x, q, dtype):
        return nf4_matmul(x, q, dtype=dtype, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET)

    @pytest.mark.parametrize("shape,dtype", PALLAS_CASES)
    def test_forward_and_grad_match_reference(self, shape, dtype):
        x, q = _case(*shape)
        y, vjp = jax.vjp(lambda x: self._matmul(x, q, dtype), x)
        assert y.shape == (shape[0], shape[2]) and y.dtype == jnp.dtype(dtype)
        _close(y, nf4_matmul_reference(x, q, dtype), dtype, "forward")
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        (dx,) = vjp(dy)
        assert dx.shape == x.shape and dx.dtype == x.dtype
        _close(dx, nf4_matmul_t_reference(dy, q, dtype), dtype, "dx = dy @ W^T")

    def test_leading_dims_and_jit(self):
        x, q = _case(6, 96, 48, 32, True)
        x_BxSxI = x.reshape(2, 3, 96)
        y = jax.jit(lambda x, q: self._matmul(x, q, "float32"))(x_BxSxI, q)
        assert y.shape == (2, 3, 48)
        _close(y.reshape(6, 48), nf4_matmul_reference(x, q, "float32"), "float32", "(B, S, I) input")

    def test_no_gradient_to_the_frozen_weight(self):
        for double_quant in (True, False):
            x, q = _case(3, 96, 48, 32, double_quant)
            _, vjp = jax.vjp(lambda x, q: self._matmul(x, q, "float32"), x, q)
            _, dq = vjp(np.ones((3, 48), np.float32))
            for name in ("packed", "absmax", "nested_absmax", "offset"):
                leaf, ct = getattr(q, name), getattr(dq, name)
                if leaf is None:
                    assert ct is None
                elif jnp.issubdtype(leaf.dtype, jnp.integer):
                    assert ct.dtype == jax.dtypes.float0 and ct.shape == leaf.shape, name
                else:
                    assert ct.shape == leaf.shape and not np.any(np.asarray(ct)), name


class TestNF4MatmulXLA(TestNF4MatmulPallas):
    IMPLEMENTATION = "xla"
    INTERPRET = None

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: SHAPE_ID(*s))
    def test_forward_and_grad_match_reference(self, shape, dtype):
        super().test_forward_and_grad_match_reference(shape, dtype)


@pytest.mark.parametrize("shape, dtype, blocksize, quant_type, problems", [
    ((256, 128), "bfloat16", 64, "nf4", []),
    ((96, 48), "float32", 32, "nf4", []),
    ((48, 128), "float32", 16, "nf4", ["multiple of 32"]),
    ((96, 128), "float32", 64, "nf4", ["multiple of blocksize 64"]),
    ((128, 40), "float16", 64, "nf4", ["out features 40"]),
    ((128, 128), "int8", 64, "nf4", ["dtype int8"]),
    ((128, 128), "float32", 64, "fp4", ["quant_type 'fp4'"]),
    ((128, 128, 2), "float32", 64, "nf4", ["2-D"]),
    ((100, 40), "float64", 96, "fp4",
     ["quant_type", "dtype float64", "power of two", "multiple of 32", "out features"]),
])
def test_supports_gate(shape, dtype, blocksize, quant_type, problems):
    ok, reason = supports(shape, dtype, blocksize, quant_type=quant_type)
    assert ok == (not problems), reason
    for p in problems:
        assert p in reason


def test_forced_pallas_on_unsupported_weight_raises_with_reason():
    x, q = _case(2, 96, 40, 32, True)  # O = 40 is not a multiple of 16
    with pytest.raises(NotImplementedError, match="out features 40"):
        nf4_matmul(x, q, dtype="float32", implementation="pallas")
    _close(nf4_matmul(x, q, dtype="float32"), nf4_matmul_reference(x, q, "float32"), "float32", "fallback")


def test_bad_inputs_raise():
    x, q = _case(2, 96, 48, 32, True)
    with pytest.raises(ConfigError, match="96"):
        nf4_matmul(x[:, :64], q, dtype="float32")
    with pytest.raises(ConfigError, match="implementation"):
        nf4_matmul(x, q, dtype="float32", implementation="triton")
    with pytest.raises(ConfigError, match="block_n=24.*block_k=64 does not divide"):
        nf4_matmul(x, q, dtype="float32", implementation="pallas", tiles=Tiles(16, 24, 64))


def test_default_is_xla_off_gpu_and_decode_only_on_gpu():
    x, q = _case(1, 96, 48, 32, True)
    jaxpr = str(jax.make_jaxpr(lambda x: nf4_matmul(x, q, dtype="float32"))(x))
    on_gpu = jax.default_backend() == "gpu"
    assert ("pallas_call" in jaxpr) == on_gpu
    big = np.zeros((PALLAS_MAX_M + 1, 96), np.float32)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: nf4_matmul(x, q, dtype="float32"))(big))


def test_registered_for_linear_nf4_only():
    x, q = _case(3, 96, 48, 32, True)
    assert isinstance(q, QuantizedKernel)  # ops.linear calls its protocol; nothing is registered into ops
    y = ops.linear(x, {"qkernel": q}, dtype=jnp.float32)
    _close(y, nf4_matmul_reference(x, q, "float32"), "float32", "ops.linear on an NF4 qkernel")
    fp4 = quantize_kernel(np.random.default_rng(2).standard_normal((96, 48)).astype(np.float32), quant_type="fp4")
    jaxpr = str(jax.make_jaxpr(lambda x: ops.linear(x, {"qkernel": fp4}, dtype=jnp.float32))(x))
    assert "custom_vjp" not in jaxpr  # fp4 is densified, not sent through nf4_matmul


def _abstract_q(i: int, o: int, blocksize: int = 64) -> Quantized4bit:
    """A double-quantized NF4 kernel of any size, as shapes only (lowering needs no data)."""
    k = i * o // blocksize
    s = jax.ShapeDtypeStruct
    return Quantized4bit(s((i * o // 2, 1), jnp.uint8), s((k,), jnp.uint8), s((-(-k // 256),), jnp.float32),
                         s((), jnp.float32), quant_type="nf4", blocksize=blocksize, shape=(i, o),
                         dtype_name="bfloat16", nested_blocksize=256, transposed=True)


@pytest.mark.parametrize("i, o", [(8192, 28672), (28672, 8192)])
def test_lowers_to_triton_for_cuda_without_a_gpu(i, o):
    """The Pallas -> Triton lowering (power-of-two loads, dot shapes, supported ops) at the bench shapes,
    forward and dx. It stops before Triton's own compiler, which only the `gpu` test reaches."""
    q = _abstract_q(i, o)
    for m in (1, 16, 2048):
        x = jax.ShapeDtypeStruct((m, i), jnp.bfloat16)
        f = lambda x, q: nf4_matmul(x, q, dtype="bfloat16", implementation="pallas", interpret=False)
        g = lambda x, q: jax.grad(lambda x: f(x, q).astype(jnp.float32).sum())(x)
        for fn in (f, g):
            text = jax.jit(fn).trace(x, q).lower(lowering_platforms=("cuda",)).as_text()
            assert "triton" in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_kernel_on_gpu_matches_reference(m, dtype):
    x, q = _case(m, 4096, 11008, 64, True)
    f = jax.jit(lambda x: nf4_matmul(x, q, dtype=dtype, implementation="pallas", interpret=False))
    with jax.default_matmul_precision("highest"):  # the kernel's fp32 dot is IEEE, not TF32
        ref = nf4_matmul_reference(x, q, dtype)
        y, vjp = jax.vjp(f, x)
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        (dx,) = vjp(dy)
        dx_ref = nf4_matmul_t_reference(dy, q, dtype)
    tol = tolerances.NF4_MATMUL_GPU[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), **tol)
