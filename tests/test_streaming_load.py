"""Loading in the checkpoint's dtype, one tensor at a time (`convert.stream`): bf16 stays bf16 unless
overridden, QLoRA quantizes each linear as it is read with the same bytes as quantizing a full load, the
lazy checkpoint reads each tensor only when looked up, and a bf16 base trains in bf16 with fp32 adapters."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
from jaxpeft.convert.bnb import Bnb4bitConfig
from jaxpeft.convert.hf import read_hf_weights
from jaxpeft.convert.load import from_transformers
from jaxpeft.convert.stream import Checkpoint
from jaxpeft.core.errors import CheckpointError
from jaxpeft.core.tree import flatten_params
from jaxpeft.quant import quantize_params
from tests.cli import run_entry
from tests.hf_tiny import hf_logits, tiny_hf_config, tiny_hf_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny end-to-end model (with its tokenizer) saved by transformers in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return str(path)


def _float_dtypes(params) -> set[str]:
    return {np.dtype(v.dtype).name for v in flatten_params(params).values()}


def test_a_bf16_checkpoint_loads_as_bf16_and_agrees_with_transformers(bf16_folder):
    from transformers import AutoModelForCausalLM

    model, params, _ = jaxpeft.from_pretrained(bf16_folder, load_tokenizer=False)
    assert _float_dtypes(params) == {"bfloat16"} and jnp.dtype(model.dtype) == jnp.bfloat16
    ids = np.array([[3, 9, 14, 27, 5, 11, 40, 2]])
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).astype(jnp.float32))
    theirs = hf_logits(AutoModelForCausalLM.from_pretrained(bf16_folder, dtype=torch.bfloat16).eval(), ids)
    assert np.abs(ours - theirs).max() <= 0.02 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.85

    model32, params32, _ = jaxpeft.from_pretrained(bf16_folder, param_dtype="float32", load_tokenizer=False)
    assert _float_dtypes(params32) == {"float32"} and jnp.dtype(model32.dtype) == jnp.float32
    model_mixed, _, _ = jaxpeft.from_pretrained(bf16_folder, dtype="float32", load_tokenizer=False)
    assert jnp.dtype(model_mixed.dtype) == jnp.float32  # compute overridden, weights as stored


def test_an_fp32_folder_stays_fp32(tiny_model_dir):
    model, params, _ = jaxpeft.from_pretrained(tiny_model_dir, load_tokenizer=False)
    assert _float_dtypes(params) == {"float32"} and jnp.dtype(model.dtype) == jnp.float32


def test_from_transformers_keeps_the_torch_dtype():
    hf = tiny_hf_model(tiny_hf_config(layers=1)).to(torch.bfloat16)
    model, params = from_transformers(hf)
    assert _float_dtypes(params) == {"bfloat16"} and jnp.dtype(model.dtype) == jnp.bfloat16
    state = hf.state_dict()["model.layers.0.mlp.down_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"],
                                             np.float32), state.T)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_on_read_equals_quantizing_a_full_load(tiny_model_dir, bf16_folder, dtype):
    folder = tiny_model_dir if dtype == "float32" else bf16_folder
    cfg = Bnb4bitConfig()
    _, streamed, _ = jaxpeft.from_pretrained(folder, quantize=cfg, load_tokenizer=False)
    _, full, _ = jaxpeft.from_pretrained(folder, load_tokenizer=False)
    reference = quantize_params(full, targets=cfg.targets, quant_type=cfg.quant_type, blocksize=cfg.blocksize,
                                double_quant=cfg.double_quant)
    a, b = flatten_params(streamed), flatten_params(reference)
    assert a.keys() == b.keys() and sum(p[-1] == "qkernel" for p in a) == 14
    for path in a:
        la, lb = jax.tree_util.tree_leaves(a[path]), jax.tree_util.tree_leaves(b[path])
        assert jax.tree_util.tree_structure(a[path]) == jax.tree_util.tree_structure(b[path]), path
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    assert {q.dtype_name for p, q in a.items() if p[-1] == "qkernel"} == {dtype}


def test_the_lazy_checkpoint_reads_a_tensor_only_when_looked_up(tiny_model_dir, tmp_path):
    source = read_hf_weights(tiny_model_dir)
    assert isinstance(source, Checkpoint) and source.requested == 0
    name = "model.layers.0.mlp.up_proj.weight"
    array = source[name]
    assert source.requested == array.nbytes == source.info[name].nbytes
    part = source.read_slice(name, (slice(0, 4), slice(8, 16)))
    np.testing.assert_array_equal(part, array[0:4, 8:16])
    assert source.requests[-1] == (name, (slice(0, 4), slice(8, 16)), part.nbytes)

    broken = tmp_path / "broken"
    broken.mkdir()
    data = (Path(tiny_model_dir) / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_hf_weights(broken)


def test_a_bf16_base_trains_in_bf16_with_fp32_adapters(bf16_folder, tmp_path):
    out = tmp_path / "run"
    run_entry("experiments.lora", f"--model={bf16_folder}", f"--out={out}", "--steps=2", "--batch_size=2", "--rank=4",
              "--eval_examples=0", "--noprogress", "--save_every=0")
    config = json.loads((out / "config.json").read_text())
    assert (config["base"]["param_dtype"], config["base"]["compute_dtype"]) == ("bfloat16", "bfloat16")
    assert config["settings"]["dtype"] == "auto" and config["plan"]["method"] == "lora"
    from safetensors.numpy import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {v.dtype.name for v in adapter.values()} == {"float32"}
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line) and "step" in json.loads(line) and json.loads(line)["step"] > 0]
    assert losses and all(np.isfinite(losses))
