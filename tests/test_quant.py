"""NF4/FP4 quantization against bitsandbytes itself (its 4-bit functions run on the CPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_transformers
from jaxpeft.core.errors import ConfigError
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.quant import (
    ALLOWED_BLOCKSIZES, FP4_CODE, NF4_CODE, Quantized4bit, create_dynamic_map, dequantize_4bit,
    dequantize_kernel, dequantize_params, param_bytes, quantize_4bit, quantize_blockwise_8bit, quantize_kernel,
    quantize_params,
)
from jaxpeft.quant import dynamic8, nf4
from tests import tolerances
from tests.hf_tiny import VOCAB, tiny_hf_config, tiny_hf_model

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle: pip install bitsandbytes")
pytestmark = pytest.mark.full_opt  # bitsandbytes-exact bits (tests/conftest.py)
F = bnb.functional

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module", autouse=True)
def _eager_bitsandbytes():
    # bnb wraps its fallback dequantize in torch.compile; recompiling per shape would take minutes.
    with torch._dynamo.config.patch(disable=True):
        yield


def _weight(shape, dtype: str, seed: int) -> tuple[np.ndarray, "torch.Tensor"]:
    t = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).to(TORCH_DTYPES[dtype])
    return t.float().numpy(), t


def _ours(w32: np.ndarray, dtype: str, **kw) -> Quantized4bit:
    return quantize_4bit(jnp.asarray(w32).astype(dtype), **kw)


def _from_bnb(packed, state, shape) -> Quantized4bit:
    """Our container around a state bitsandbytes wrote."""
    nested = state.state2 is not None
    return Quantized4bit(
        jnp.asarray(packed.numpy()), jnp.asarray(state.absmax.numpy()),
        jnp.asarray(state.state2.absmax.numpy()) if nested else None,
        jnp.asarray(state.offset.numpy()) if nested else None,
        quant_type=state.quant_type, blocksize=state.blocksize, shape=tuple(shape),
        dtype_name=str(state.dtype).removeprefix("torch."), nested_blocksize=256 if nested else None)


def test_golden_vector():
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    q = quantize_4bit(x, quant_type="nf4", blocksize=64, double_quant=False)
    assert np.asarray(q.packed).shape == (64, 1)
    assert np.asarray(q.packed).tobytes().hex() == (
        "86a859dc42470624569c6d49b84358366a8946bd2edb86deed927a299b2452e5"
        "96eda07bc4e24c7f84522aad4e6e548c8421ac62b24a094878b4dbbdbb716318")
    np.testing.assert_array_equal(np.asarray(q.absmax), np.float32([2.32503080368042, 2.250141143798828]))


def test_code_tables_match_bitsandbytes():
    for name, ours in [("nf4", NF4_CODE), ("fp4", FP4_CODE)]:
        np.testing.assert_array_equal(ours, F.get_4bit_type(name, device="cpu").numpy())
    np.testing.assert_array_equal(create_dynamic_map().view(np.uint32), F.create_dynamic_map().numpy().view(np.uint32))
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds  # the FP4 sort order it uses

    np.testing.assert_array_equal(nf4.FP4_SORTED_ORDER, _get_4bit_quantize_bounds("fp4", torch.device("cpu"))[1])


def test_8bit_quantizer_matches_bitsandbytes_at_every_grid_point():
    # Each block is 1.0 followed by 255 grid values, so bnb's absmax is 1 and its table is read at every index.
    vals = np.float32(-1) + np.float32(2) * np.arange(65536, dtype=np.float32) / np.float32(65535)
    vals = np.concatenate([vals, -vals[:-3], np.random.default_rng(0).uniform(-1, 1, 255 * 40).astype(np.float32)])
    k = -(-vals.size // 255)
    x = np.concatenate([np.ones((k, 1), np.float32), np.resize(vals, (k, 255))], axis=1).reshape(-1)[:-77]
    q_bnb, st = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    codes, absmax = quantize_blockwise_8bit(jnp.asarray(x), 256)
    np.testing.assert_array_equal(np.asarray(codes), q_bnb.numpy())
    np.testing.assert_array_equal(np.asarray(absmax), st.absmax.numpy())


CASES = [(448,), (461,), (63,), (1,), (37, 29), (13, 77)]  # (O, I) torch layout for 2-D


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", CASES)
def test_quantize_matches_bitsandbytes(quant_type, dtype, shape):
    w32, t = _weight(shape, dtype, seed=sum(shape))
    packed, st = F.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=False)
    q = _ours(w32, dtype, quant_type=quant_type, blocksize=64, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax), st.absmax.numpy())
    theirs = F.dequantize_4bit(packed, st).float().numpy().reshape(shape)
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(q).astype(jnp.float32)), theirs)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_3d_expert_stack_quantized_over_its_flattened_weights_matches_bitsandbytes(double_quant):
    """The layout planned for QLoRA of MoE experts: an (E, 2I, H) stack is one NF4 tensor, blockwise over its
    flattened weights, as bitsandbytes' functional quantize_4bit treats a 3-D tensor (odd sizes: a partial block)."""
    shape = (4, 10, 13)
    w32, t = _weight(shape, "bfloat16", seed=3)
    packed, st = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = _ours(w32, "bfloat16", quant_type="nf4", blocksize=64, double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    theirs = F.dequantize_4bit(packed, st).float().numpy()
    assert theirs.shape == shape
    np.testing.assert_array_equal(np.asarray(dequantize_4bit(q).astype(jnp.float32)), theirs)

def test_double_quant_of_equal_blocks_centres_to_bitsandbytes_exact_zero():
    """Every block's absmax equal (here 1.0): the mean is exact, so bitsandbytes' centred absmax is exactly 0 (nested
    absmax 0, codes 0). XLA once fused the mean's 1/K product into the subtraction as an FMA (centred ~2e-8, codes
    255), and only at its default optimisation level."""
    w32 = np.random.default_rng(1).integers(-16, 17, (40, 40)).astype(np.float32) / 16
    w32[:, 0] = 1.0  # every block of 64 holds a 1.0: absmax 1.0 everywhere
    packed, st = F.quantize_4bit(torch.from_numpy(w32), blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_4bit(jnp.asarray(w32), quant_type="nf4", blocksize=64, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.packed).ravel(), packed.numpy().ravel())
    np.testing.assert_array_equal(np.asarray(q.absmax), st.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), st.state2.absmax.numpy())
    assert float(q.offset) == st.offset.item() == 1.0



@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_every_blocksize_matches_bitsandbytes(blocksize):
    w32, t = _weight((37, 129), "float32", seed=blocksize)
    w32[5, :] = 0.0  # zero blocks and a zero tail keep their bnb codes and absmax
    w32[-1, -20:] = 0.0
    t = torch.from_numpy(w32)
    packed, st = F.quantize_4bit(t, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    q = _ours(w32, "float32", quant_type="nf4", blocksize=blocksize, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint32), st.absmax.numpy().view(np.uint32))


def _ulps(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, np.float32).view(np.int32).astype(np.int64) - np.asarray(b, np.float32).view(np.int32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, seed, dtype", [((301, 205), 7, "bfloat16"), ((1536, 576), 2, "float32")])
def test_double_quant_matches_bitsandbytes(quant_type, shape, seed, dtype):
    # (301, 205): 965 absmax blocks, 3 full nested blocks and a partial one. (1536, 576) at std 0.02, a
    # SmolLM2 MLP kernel, is data on which one nested code differs (of 13824), so the near-tie check runs.
    t = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02)
    t = t.to(TORCH_DTYPES[dtype])
    w32 = t.float().numpy()
    packed, st = F.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=True)
    q = _ours(w32, dtype, quant_type=quant_type, blocksize=64, double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy())
    # torch's mean sums in an order that depends on the CPU's vector width, ours in XLA's: the offset may
    # differ by a few ulps (seen: <= 2), the nested absmax then too (seen: <= 4). Given the same offset
    # the rest is exact (next test).
    assert _ulps(q.offset, st.offset.numpy()).max() <= 4
    assert _ulps(q.nested_absmax, st.state2.absmax.numpy()).max() <= 8
    ours_q, bnb_q = np.asarray(q.absmax), st.absmax.numpy()
    differ = np.nonzero(ours_q != bnb_q)[0]
    assert differ.size <= max(2, bnb_q.size // 2000), f"{differ.size} of {bnb_q.size} nested codes differ"
    # Each difference is a near-tie: the code flips within the ulps by which the offset and nested absmax
    # differ (in ulps of the centered value that can be many: absmax - offset cancels).
    raw = np.asarray(quantize_4bit(jnp.asarray(w32).astype(dtype), quant_type=quant_type, double_quant=False).absmax)
    offsets = np.asarray(q.offset) + np.arange(-4, 5, dtype=np.float32) * np.spacing(np.asarray(q.offset))
    for i in differ:
        nested = np.asarray(q.nested_absmax)[i // 256]
        inv = np.float32(1) / (nested + np.arange(-8, 9, dtype=np.float32) * np.spacing(nested))
        scaled = (raw[i] - offsets)[:, None] * inv[None, :]
        reachable = set(np.asarray(dynamic8.lut_codes(jnp.asarray(scaled))).ravel().tolist())
        assert int(bnb_q[i]) in reachable and abs(int(bnb_q[i]) - int(ours_q[i])) <= 2, (i, reachable)


def test_double_quant_given_torch_offset_is_exact():
    absmax = torch.from_numpy(np.abs(np.random.default_rng(3).standard_normal(1000)).astype(np.float32) + 0.5)
    offset = absmax.mean()
    q_bnb, st2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    codes, nested = quantize_blockwise_8bit(jnp.asarray((absmax - offset).numpy()), 256)
    np.testing.assert_array_equal(np.asarray(codes), q_bnb.numpy())
    np.testing.assert_array_equal(np.asarray(nested), st2.absmax.numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(96, 200), (37, 129)])
def test_dequantize_a_bitsandbytes_state_is_exact(quant_type, dtype, shape):
    w32, t = _weight(shape, dtype, seed=11)
    packed, st = F.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=True)
    theirs = F.dequantize_4bit(packed, st)
    ours = dequantize_4bit(_from_bnb(packed, st, shape))
    assert ours.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), theirs.float().numpy())
    # The same bytes read as a Flax (I, O) kernel.
    kernel = dequantize_kernel(dataclasses.replace(_from_bnb(packed, st, shape[::-1]), transposed=True))
    np.testing.assert_array_equal(np.asarray(kernel.astype(jnp.float32)), theirs.float().numpy().T)


def test_quantize_kernel_is_torch_layout():
    kernel_IxO = np.random.default_rng(5).standard_normal((29, 37)).astype(np.float32)
    q = quantize_kernel(kernel_IxO)
    assert (q.shape, q.transposed, q.logical_size, q.dtype) == ((29, 37), True, 29 * 37, jnp.float32)
    raw = quantize_4bit(kernel_IxO.T)
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(raw.packed))
    np.testing.assert_array_equal(np.asarray(dequantize_kernel(q)), np.asarray(dequantize_4bit(raw)).T)


def test_quality_matches_reference():
    # bitsandbytes' test_functional figures (randn 1024x1024, blocksize 64): mean abs and relative error.
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    for quant_type, abs_err, rel_err in [("nf4", 0.0728, 0.203), ("fp4", 0.0965, 0.260)]:
        for double_quant in (False, True):
            q = quantize_4bit(w, quant_type=quant_type, double_quant=double_quant)
            err = np.abs(np.asarray(dequantize_4bit(q)) - w)
            assert abs(err.mean() - abs_err) < 5e-4, (quant_type, double_quant, err.mean())
            assert abs((err / (np.abs(w) + 1e-8)).mean() - rel_err) < 2e-3, (quant_type, double_quant)


def test_bad_inputs_raise_config_errors():
    w = np.ones((8, 8), np.float32)
    with pytest.raises(ConfigError, match=r"blocksize 48.*\[32, 64, 128"):
        quantize_4bit(w, blocksize=48)
    with pytest.raises(ConfigError, match=r"quant_type 'int4'.*\['fp4', 'nf4'\]"):
        quantize_4bit(w, quant_type="int4")
    with pytest.raises(ConfigError, match="empty weight"):
        quantize_4bit(np.zeros((0, 8), np.float32))
    with pytest.raises(ConfigError, match="2-D Flax kernel"):
        quantize_kernel(np.ones(64, np.float32))
    with pytest.raises(ConfigError, match="dtype int32"):
        quantize_4bit(np.ones(64, np.int32))
    with pytest.raises(ConfigError) as both:  # every problem at once
        quantize_4bit(w, blocksize=7, quant_type="nf3")
    assert "blocksize 7" in str(both.value) and "nf3" in str(both.value)
    with pytest.raises(ConfigError, match="quantize_kernel"):
        dequantize_kernel(quantize_4bit(w))


def test_jit_equals_eager_and_tree_map_keeps_the_container():
    w = np.random.default_rng(2).standard_normal((33, 65)).astype(np.float32)
    eager = quantize_kernel(w)
    jitted = jax.jit(quantize_kernel)(jnp.asarray(w))
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), jitted, eager)
    dense = jax.jit(lambda q: dequantize_kernel(q, jnp.bfloat16))(eager)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(dequantize_kernel(eager, jnp.bfloat16)))
    moved = jax.tree.map(jnp.asarray, eager)
    assert isinstance(moved, Quantized4bit) and moved.shape == (33, 65)


def test_bits_per_weight():
    kernel = jnp.asarray(np.random.default_rng(4).standard_normal((256, 1024)).astype(np.float32))
    assert quantize_kernel(kernel).nbytes * 8 / kernel.size == pytest.approx(4.127, abs=1e-3)
    assert quantize_kernel(kernel, double_quant=False).nbytes * 8 / kernel.size == pytest.approx(4.5)


def test_quantized_model_runs_and_matches_its_dequantized_twin():
    model, params = from_transformers(tiny_hf_model(tiny_hf_config()))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 9)))
    flat = flatten_params(params)
    up = ("model", "layers", "0", "mlp", "up_proj")
    q = quantize_kernel(flat.pop(up + ("kernel",)))
    one_q = unflatten_params({**flat, up + ("qkernel",): q})
    one_dense = unflatten_params({**flat, up + ("kernel",): dequantize_kernel(q, jnp.float32)})
    np.testing.assert_allclose(model.apply({"params": one_q}, ids), model.apply({"params": one_dense}, ids),
                               **tolerances.EXACT)

    qparams = quantize_params(params)
    flat_names = ["/".join(p) for p in flatten_params(qparams)]
    assert sum(n.endswith("qkernel") for n in flat_names) == 3 * 7
    assert not any(n.endswith("qkernel") for n in flat_names if "lm_head" in n or "embed" in n)
    dense = dequantize_params(qparams)
    np.testing.assert_allclose(model.apply({"params": qparams}, ids),
                               model.apply({"params": dense}, ids), **tolerances.EXACT)
    # Under jit XLA fuses the dequantization into the dots, which may reorder fp32 sums.
    np.testing.assert_allclose(jax.jit(model.apply)({"params": qparams}, ids),
                               model.apply({"params": dense}, ids), **tolerances.LOGITS_FP32)
    assert param_bytes(qparams) < param_bytes(params)
