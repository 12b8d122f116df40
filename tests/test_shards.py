"""The streaming safetensors writer: the library's bytes, transformers' shards, one tensor at a time.

Parity is against the real libraries: a single file is byte for byte what `safetensors.numpy.save_file`
writes; shard plans are huggingface_hub's (what transformers' `save_pretrained` uses); a sharded folder
has the index transformers writes for the same model and loads in transformers with the same logits.
"""

from __future__ import annotations

import json
import os
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpeft.convert.hf import hf_tensors, read_safetensors, save_hf_folder, write_hf_folder
from jaxpeft.convert.shards import (TensorSpec, Tensors, file_order, header_bytes, parse_size, plan_shards,
                                    save_shards, shard_file_names, write_safetensors)
from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.merge.unload import save_merged
from jaxpeft.methods import get_method
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.quant import dequantize_params, quantize_params
from tests.hf_tiny import VOCAB, hf_logits

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32,
          np.float64, np.int64, np.uint64, np.bool_]


def _random_state(rng, n: int) -> dict[str, np.ndarray]:
    state = {}
    for _ in range(n):
        name = "".join(rng.choice(list("ab.c_09"), int(rng.integers(1, 9))))
        shape = tuple(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 3))))
        state[name] = np.asarray(rng.standard_normal(shape) * 3).astype(DTYPES[int(rng.integers(len(DTYPES)))])
    return state


def test_one_file_is_byte_identical_to_safetensors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    for trial in range(60):  # every dtype, scalars, empty tensors, header lengths on and off the 8-byte grid
        state = _random_state(rng, int(rng.integers(0, 12)))
        save_file(state, tmp_path / "theirs", metadata={"format": "pt"})
        write_safetensors(tmp_path / "ours", state, metadata={"format": "pt"})
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes(), (trial, sorted(state))


def test_shard_plan_is_huggingface_hubs():
    from huggingface_hub import split_state_dict_into_shards_factory

    rng = np.random.default_rng(1)
    for limit in (1, 50, 200, 1000, 10**9):
        # Sizes around the limit, including tensors bigger than it (each alone in a shard).
        state = {f"t{i}": np.zeros(int(n), np.uint8) for i, n in enumerate(rng.integers(0, 300, 25))}
        theirs = split_state_dict_into_shards_factory(state, get_storage_size=lambda t: t.nbytes,
                                                      filename_pattern="model{suffix}.safetensors",
                                                      max_shard_size=limit)
        shards = plan_shards(Tensors.from_mapping(state).specs, limit)
        files = shard_file_names(len(shards))
        assert {f: [s.name for s in shard] for f, shard in zip(files, shards)} == theirs.filename_to_tensors, limit
    assert parse_size("50GB") == 50 * 10**9 and parse_size("20KB") == 20_000 and parse_size(7) == 7
    with pytest.raises(ValueError, match="units"):
        parse_size("5GiB")


def test_the_default_shard_size_is_the_hubs_5gb():
    import inspect

    from transformers import PreTrainedModel

    from jaxpeft.convert.shards import DEFAULT_MAX_SHARD_SIZE

    # Ours is the Hub's long-standing 5 GB (transformers 4.x's default); transformers 5.24 writes up to 50 GB
    # per file. Both load either way; the sharded-folder tests above load ours with transformers.
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert (DEFAULT_MAX_SHARD_SIZE, default) == ("5GB", "50GB")


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_folder_is_transformers_layout_and_loads_with_the_same_logits(tiny_base, tmp_path, tied):
    import transformers

    hf, model, params = tiny_base(layers=2, tied=tied)
    one = save_hf_folder(tmp_path / "one", params, model.config)
    sharded = save_hf_folder(tmp_path / "sharded", params, model.config, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3 and shards == sorted(set(index["weight_map"].values()))
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and not (sharded / "model.safetensors").exists()
    whole = read_safetensors(one / "model.safetensors")
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
    for shard in shards:  # every tensor where the index says, with the unsharded file's values
        for name, value in read_safetensors(sharded / shard).items():
            assert index["weight_map"].pop(name) == shard
            np.testing.assert_array_equal(value, whole.pop(name))
    assert not whole and not index["weight_map"]
    # transformers shards the same model into the same files, with the same index.
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").read_text() == (
        tmp_path / "theirs" / "model.safetensors.index.json").read_text()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    logits = [hf_logits(transformers.AutoModelForCausalLM.from_pretrained(d).eval(), ids) for d in (one, sharded)]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_the_writer_makes_each_tensor_after_the_last_ones_bytes_are_out(tmp_path):
    rng = np.random.default_rng(2)
    state = {f"w{i}": rng.standard_normal((5 + i, 3)).astype(np.float32) for i in range(6)}
    specs = file_order(Tensors.from_mapping(state).specs)
    head = len(header_bytes(specs, {"format": "pt"}))
    made: list[weakref.ref] = []
    seen: list[str] = []

    def build(name: str) -> dict[str, np.ndarray]:
        assert all(r() is None for r in made), "an earlier tensor is still alive while the next is made"
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".model.safetensors.tmp-")]
        assert tmp.stat().st_size == head + sum(state[n].nbytes for n in seen), "earlier bytes not written yet"
        array = state[name].copy()
        made.append(weakref.ref(array))
        seen.append(name)
        return {name: array}

    tensors = Tensors(([TensorSpec(n, v.shape, v.dtype)], lambda n=n: build(n)) for n, v in state.items())
    assert save_shards(tmp_path, tensors) == ["model.safetensors"]
    assert seen == [s.name for s in specs]  # each made once, in file order
    got = read_safetensors(tmp_path / "model.safetensors")
    assert all(np.array_equal(got[n], v) for n, v in state.items())


def test_a_failing_producer_leaves_no_folder_and_no_file(tiny_base, tmp_path):
    _, model, params = tiny_base(layers=2)
    good = hf_tensors(params)
    calls = []

    def build(name: str) -> dict[str, np.ndarray]:
        calls.append(name)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return {name: good.get(name)}

    broken = Tensors(([s], lambda n=s.name: build(n)) for s in good.specs)
    for shard_size in ("50GB", "20KB"):
        calls.clear()
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_hf_folder(tmp_path / "out", broken, {"tie_word_embeddings": False}, max_shard_size=shard_size)
        assert len(calls) == 4 and list(tmp_path.iterdir()) == []  # no folder, no temp sibling
    calls.clear()
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(tmp_path / "x.safetensors", broken)
    assert list(tmp_path.iterdir()) == []
    # A producer that makes the wrong shape is caught before its bytes land anywhere.
    wrong = Tensors([([TensorSpec("a", (2, 3), np.float32)], lambda: {"a": np.zeros((3, 2), np.float32)})])
    with pytest.raises(ValueError, match=r"a: made as float32\[3, 2\], declared float32\[2, 3\]"):
        write_safetensors(tmp_path / "y.safetensors", wrong)
    assert list(tmp_path.iterdir()) == []


def _noisy(tree, seed: int):
    """Random, not dyadic, adapter values: the merge rounds, so an order or dtype slip would show."""
    rng = np.random.default_rng(seed)
    return unflatten_params({p: jnp.asarray(rng.standard_normal(np.shape(v)) * 0.3, v.dtype)
                             if p[-1] in ("lora_a", "lora_b", "lora_magnitude", "ia3_in", "ia3_out") else v
                             for p, v in flatten_params(tree).items()})


@pytest.mark.parametrize("case", ["lora", "dora", "ia3", "qlora"])
def test_module_by_module_merge_is_the_whole_tree_merge_bit_for_bit(tiny_base, tmp_path, case):
    _, model, params = tiny_base(layers=2)
    name, config = {"lora": ("lora", LoraConfig(r=3, target_modules="all-linear")),
                    "dora": ("lora", LoraConfig(r=2, use_dora=True, target_modules=("q_proj", "down_proj"))),
                    "ia3": ("ia3", IA3Config()),
                    "qlora": ("lora", LoraConfig(r=2, target_modules=("q_proj", "v_proj")))}[case]
    if case == "qlora":  # every linear quantized, two of them adapted: the rest are dequantized on the way out
        params = quantize_params(params, quant_type="nf4", blocksize=64, double_quant=True)
    method = get_method(name)
    full = _noisy(method.init(jax.random.PRNGKey(0), params, config), 3)
    for dtype in ("auto", "bfloat16") if case != "lora" else ("auto", "float16"):
        old = dequantize_params(method.merge(full, config), jnp.float32)  # what --save_merged did before
        save_hf_folder(tmp_path / f"old-{dtype}", old, model.config, dtype="float32" if dtype == "auto" else dtype)
        save_merged(tmp_path / f"new-{dtype}", full, method, config, model.config, dtype=dtype,
                    max_shard_size="30KB" if dtype == "bfloat16" else "50GB")
        ours, theirs = tmp_path / f"new-{dtype}", tmp_path / f"old-{dtype}"
        assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
        if (ours / "model.safetensors").exists():
            assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
        else:  # sharded: the same tensors, bit for bit
            whole = read_safetensors(theirs / "model.safetensors")
            index = json.loads((ours / "model.safetensors.index.json").read_text())
            assert sorted(index["weight_map"]) == sorted(whole)
            for shard in sorted(set(index["weight_map"].values())):
                for k, v in read_safetensors(ours / shard).items():
                    assert v.dtype == whole[k].dtype and v.tobytes() == whole[k].tobytes(), k


def test_save_merged_refuses_an_unmergeable_method_before_writing(tiny_base, tmp_path):
    from jaxpeft.core.errors import ConfigError
    from jaxpeft.methods.prompt import PromptConfig

    _, model, params = tiny_base(layers=2)
    method = get_method("prompt")
    config = method.prepare(PromptConfig(num_virtual_tokens=2), model_config=model.config)
    full = method.init(jax.random.PRNGKey(0), params, config)
    with pytest.raises(ConfigError, match="cannot be merged"):
        save_merged(tmp_path / "m", full, method, config, model.config)
    assert not os.listdir(tmp_path)
