"""HF folder export/import round trips and the errors bad checkpoints give."""

from __future__ import annotations

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import from_pretrained, from_transformers, save_hf_folder
from jaxpeft.core.errors import CheckpointError, UnsupportedModelError
from jaxpeft.models.config import LlamaConfig
from tests import tolerances
from tests.hf_tiny import VOCAB, hf_logits, tiny_hf_config, tiny_hf_model

pytest.importorskip("torch")


@pytest.fixture(scope="module", params=["untied", "tied-bias"])
def pair(request):
    kw = dict(tied=True, bias=True) if request.param == "tied-bias" else {}
    hf = tiny_hf_model(tiny_hf_config(**kw), seed=1)
    return hf, *from_transformers(hf)


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    import transformers

    hf, model, params = pair
    out = save_hf_folder(tmp_path / "export", params, model.config)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 13))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    chex.assert_trees_all_close(hf_logits(loaded, ids), ours, **tolerances.LOGITS_FP32)
    # ... and our own loader reads it back bit for bit.
    _, again, _ = from_pretrained(str(out), load_tokenizer=False)
    chex.assert_trees_all_equal(again, params)


def test_hf_saved_folder_loads(pair, tmp_path):
    hf, model, params = pair
    hf.save_pretrained(tmp_path / "hf")
    _, loaded, _ = from_pretrained(str(tmp_path / "hf"), load_tokenizer=False)
    chex.assert_trees_all_equal(loaded, params)


def test_sharded_index_loads(pair, tmp_path):
    hf, model, params = pair
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, loaded, _ = from_pretrained(str(tmp_path / "sharded"), load_tokenizer=False)
    chex.assert_trees_all_equal(loaded, params)


def test_bf16_export_loads(pair, tmp_path):
    import torch
    import transformers

    hf, model, params = pair
    out = save_hf_folder(tmp_path / "bf16", params, model.config, dtype="bfloat16")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_export_refuses_to_overwrite_and_leaves_no_partial_folder(pair, tmp_path):
    hf, model, params = pair
    out = save_hf_folder(tmp_path / "x", params, model.config)
    with pytest.raises(FileExistsError):
        save_hf_folder(out, params, model.config)
    broken = dict(params, extra={"lora_a": jnp.zeros((2, 2))})
    with pytest.raises(CheckpointError, match="not a plain weight"):
        save_hf_folder(tmp_path / "y", broken, model.config)
    assert not (tmp_path / "y").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(str(tmp_path / "nope"))


def test_folder_without_weights_is_a_clear_error(pair, tmp_path):
    hf, model, params = pair
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        from_pretrained(str(tmp_path), load_tokenizer=False)


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(str(tmp_path), load_tokenizer=False)


def test_truncated_safetensors_is_a_clear_error(pair, tmp_path):
    hf, model, params = pair
    out = save_hf_folder(tmp_path / "t", params, model.config)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(str(out), load_tokenizer=False)


def test_pickle_weights_need_an_explicit_opt_in(pair, tmp_path):
    import torch

    hf, model, params = pair
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        from_pretrained(str(tmp_path / "bin"), load_tokenizer=False)
    _, loaded, _ = from_pretrained(str(tmp_path / "bin"), load_tokenizer=False, allow_pickle=True)
    chex.assert_trees_all_equal(loaded, params)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModelError, match="gpt2.*not supported"):
        from_pretrained(str(tmp_path), load_tokenizer=False)


def test_unsupported_fields_are_listed_together():
    hf = tiny_hf_config().to_dict()
    hf.update(hidden_act="gelu", mlp_bias=True, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4},
              quantization_config={"quant_method": "awq"})
    with pytest.raises(UnsupportedModelError) as err:
        LlamaConfig.from_hf(hf)
    for needle in ("hidden_act='gelu'", "mlp_bias", "yarn", "quantization_config"):
        assert needle in str(err.value)


def test_mismatched_weights_list_every_offender(pair, tmp_path):
    hf, model, params = pair
    hf.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected: model.layers.2.mlp.down_proj.weight"):
        from_pretrained(str(tmp_path / "m"), load_tokenizer=False)
