"""bitsandbytes 4-bit HF folders: ours load in transformers, transformers' load in jaxpeft, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_pretrained
from jaxpeft.convert.bnb import Bnb4bitConfig, load_bnb_folder, save_bnb_folder
from jaxpeft.convert.load import QuantizedBaseLoader
from jaxpeft.convert.hf import read_safetensors
from jaxpeft.core.errors import UnsupportedModelError
from jaxpeft.core.tree import flatten_params
from jaxpeft.quant import dequantize_kernel, quantize_params
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits, tiny_model_folder

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle and the loader: pip install bitsandbytes")
pytestmark = pytest.mark.full_opt  # bitsandbytes-exact bits (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
FORMATS = [("nf4", True), ("fp4", False)]


@pytest.fixture(scope="module", autouse=True)
def _eager_bitsandbytes():
    # bnb wraps its fallback dequantize in torch.compile; recompiling per shape would take minutes.
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    tiny_model_folder(root / "fp32", layers=2, seed=5)  # with a tokenizer, for the CLI
    return root


def _hf_4bit(folder):
    """transformers' bnb model on the CPU, through bitsandbytes' reference (dequantize + fp32 matmul) path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu", attn_implementation="eager").eval()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in linears:  # the AVX512-BF16 repacking path needs out dims divisible by 32 and computes in bf16
        m.support_avx512bf16_for_cpu = False
    return model, linears


def _transformers_quantized(root, quant_type, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = root / f"hf-{quant_type}-{double_quant}"
    if not out.exists():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
        AutoModelForCausalLM.from_pretrained(str(root / "fp32"), quantization_config=config,
                                             device_map="cpu").save_pretrained(out)
    return out


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_our_folder_loads_in_transformers_with_equal_logits(root, quant_type, double_quant):
    model, params, _ = from_pretrained(str(root / "fp32"), load_tokenizer=False)
    qparams = quantize_params(params, quant_type=quant_type, double_quant=double_quant)
    out = save_bnb_folder(root / f"ours-{quant_type}-{double_quant}", qparams, model.config)
    hf, linears = _hf_4bit(out)
    assert len(linears) == 2 * 7 and type(hf.lm_head) is torch.nn.Linear
    assert {m.weight.quant_state.quant_type for m in linears} == {quant_type}
    ours = np.asarray(model.apply({"params": qparams}, jnp.asarray(IDS)))
    np.testing.assert_allclose(hf_logits(hf, IDS), ours, **tolerances.LOGITS_FP32)


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_our_export_is_transformers_own_quantization(root, quant_type, double_quant):
    theirs = read_safetensors(_transformers_quantized(root, quant_type, double_quant) / "model.safetensors")
    model, params, _ = from_pretrained(str(root / "fp32"), load_tokenizer=False)
    out = save_bnb_folder(root / f"export-{quant_type}-{double_quant}", quantize_params(
        params, quant_type=quant_type, double_quant=double_quant), model.config)
    ours = read_safetensors(out / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, key
        if "quant_state" in key:  # JSON: its length varies with the digits of nested_offset
            a, b = (json.loads(bytes(x).decode()) for x in (ours[key], t))
            assert list(a) == list(b), key  # same fields in the same order
            assert a.pop("nested_offset", 0) == pytest.approx(b.pop("nested_offset", 0), rel=1e-6) and a == b
        elif key.endswith("nested_absmax"):
            # Our mean(absmax) may differ from torch's by a few fp32 ulps (summation order; see quant/nf4.py).
            np.testing.assert_allclose(ours[key], t, rtol=1e-6)
        else:  # codes, absmax (fp32 or its 8-bit codes), code tables, dense tensors: identical
            np.testing.assert_array_equal(ours[key], t, err_msg=key)


@pytest.mark.parametrize("quant_type,double_quant", FORMATS)
def test_transformers_bnb_folder_loads_with_bnb_exact_weights(root, quant_type, double_quant):
    folder = _transformers_quantized(root, quant_type, double_quant)
    model, params, _ = load_bnb_folder(folder, load_tokenizer=False)
    hf, linears = _hf_4bit(folder)
    flat = flatten_params(params)
    names = dict(hf.named_modules())
    quantized = {".".join(p[:-1]): q for p, q in flat.items() if p[-1] == "qkernel"}
    assert len(quantized) == len(linears) == 2 * 7
    for name, q in quantized.items():
        w = names[name].weight
        reference = bnb.functional.dequantize_4bit(w.data, w.quant_state).numpy()
        np.testing.assert_array_equal(np.asarray(dequantize_kernel(q)).T, reference, err_msg=name)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    np.testing.assert_allclose(hf_logits(hf, IDS), ours, **tolerances.LOGITS_FP32)
    # The generic entry point recognises the folder and loads the same codes.
    _, generic, _ = from_pretrained(str(folder), load_tokenizer=False)
    assert jax.tree_util.tree_structure(generic) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(generic), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_qlora_loader_keeps_a_checkpoints_codes(root):
    folder = _transformers_quantized(root, "nf4", True)
    _, params, _, info = QuantizedBaseLoader(Bnb4bitConfig(quant_type="fp4", blocksize=128))(str(folder), dtype=None,
                                                                                    load_tokenizer=False)
    q = info["quantization"]
    assert q["source"].startswith("bitsandbytes checkpoint") and (q["quant_type"], q["blocksize"]) == (["nf4"], [64])
    stored = read_safetensors(folder / "model.safetensors")
    up = flatten_params(params)[("model", "layers", "1", "mlp", "up_proj", "qkernel")]
    np.testing.assert_array_equal(np.asarray(up.packed), stored["model.layers.1.mlp.up_proj.weight"])
    np.testing.assert_array_equal(np.asarray(up.absmax), stored["model.layers.1.mlp.up_proj.weight.absmax"])


def _rewrite(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    if tensors:
        save_file(tensors(read_safetensors(src / "model.safetensors")), str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
    if config:
        hf = json.loads((src / "config.json").read_text())
        config(hf["quantization_config"])
        (dst / "config.json").write_text(json.dumps(hf))
    return dst


def test_unknown_quant_type_is_a_clear_error(root, tmp_path):
    folder = _transformers_quantized(root, "nf4", True)

    def int3(state):
        out = {}
        for k, v in state.items():
            if k.endswith("bitsandbytes__nf4"):
                meta = json.loads(bytes(v).decode())
                k, v = k[:-3] + "int3", np.frombuffer(json.dumps({**meta, "quant_type": "int3"}).encode(), np.uint8)
            out[k] = v
        return out

    bad = _rewrite(folder, tmp_path / "int3", tensors=int3)
    with pytest.raises(UnsupportedModelError, match=r"(?s)4-bit types jaxpeft does not know.*"
                       r"model\.layers\.0\.mlp\.down_proj.*'int3'.*Supported: \['fp4', 'nf4'\]") as err:
        load_bnb_folder(bad, load_tokenizer=False)
    assert str(err.value).count("'int3'") == 2 * 7  # every module listed at once
    in_config = _rewrite(folder, tmp_path / "cfg", config=lambda qc: qc.update(bnb_4bit_quant_type="int3"))
    with pytest.raises(UnsupportedModelError, match=r"bnb_4bit_quant_type='int3' \(supported: \['fp4', 'nf4'\]\)"):
        load_bnb_folder(in_config, load_tokenizer=False)
    eight = _rewrite(folder, tmp_path / "int8", config=lambda qc: qc.update(load_in_8bit=True, load_in_4bit=False))
    with pytest.raises(UnsupportedModelError, match="LLM.int8 checkpoints are not supported"):
        load_bnb_folder(eight, load_tokenizer=False)


def test_quantize_cli_writes_a_folder_qlora_and_transformers_load(root):
    out = root / "cli"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "experiments.quantize", f"--model={root / 'fp32'}", f"--out={out}",
                           "--quant_type=fp4", "--nodouble_quant", "--blocksize=128"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 linear modules in fp4" in proc.stdout
    model, params, _ = from_pretrained(str(root / "fp32"), load_tokenizer=False)
    expected = quantize_params(params, quant_type="fp4", double_quant=False, blocksize=128)
    _, loaded, _ = load_bnb_folder(out, load_tokenizer=False)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
    hf, _ = _hf_4bit(out)
    np.testing.assert_allclose(hf_logits(hf, IDS), np.asarray(model.apply({"params": expected}, jnp.asarray(IDS))),
                               **tolerances.LOGITS_FP32)


def test_sharded_export_loads_in_transformers_and_is_sharded_as_transformers_does(root, tmp_path):
    model, params, _ = from_pretrained(str(root / "fp32"), load_tokenizer=False)
    qparams = quantize_params(params, quant_type="nf4", double_quant=True)
    one = save_bnb_folder(tmp_path / "one", qparams, model.config)
    sharded = save_bnb_folder(tmp_path / "sharded", qparams, model.config, max_shard_size="8KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in sharded.glob("*.safetensors")) == shards
    whole = read_safetensors(one / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(whole)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
    hf, linears = _hf_4bit(sharded)
    assert len(linears) == 2 * 7
    np.testing.assert_array_equal(hf_logits(hf, IDS), hf_logits(_hf_4bit(one)[0], IDS))
    # transformers quantizing the same model and saving it with the same limit shards it the same way (its
    # total_size differs by a few bytes: the quant_state JSONs print nested_offset with other digits).
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(str(root / "fp32"), quantization_config=config, device_map="cpu"
                                         ).save_pretrained(tmp_path / "theirs", max_shard_size="8KB")
    theirs = json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
    assert theirs["weight_map"] == index["weight_map"]
    assert theirs["metadata"]["total_parameters"] == index["metadata"]["total_parameters"]
