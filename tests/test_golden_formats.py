"""Every file format jaxpeft writes, byte for byte: folders written from fixed trees, hashed.

The trees hold only small dyadic numbers (multiples of 1/16), so every sum and product the writers
compute (LoRA merges, DoRA norms of exact squares, NF4 scaling) is exact and the bytes do not depend on
the CPU's vector width. A failing hash means a file format changed: if that was intended (a new field
PEFT needs, a bug fix in a writer), say so in the commit and update GOLDEN with the printed hashes; the
restructuring of issue 11 must never change one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods.bottleneck import AdaptersConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.methods.prefix import PrefixConfig
from jaxpeft.methods.prompt import PromptConfig
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.llama import LlamaForCausalLM

CONFIG = LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=5,
                     num_key_value_heads=1, head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
BASE_NAME = "golden/tiny-llama"
pytestmark = pytest.mark.full_opt  # the bytes are pinned at XLA's default optimisation level (tests/conftest.py)


def _dyadic(tree, seed: int):
    """Every float leaf replaced by multiples of 1/16 in [-1, 1] (ones-like leaves stay near 1)."""
    rng = np.random.default_rng(seed)
    flat = flatten_params(tree)
    out = {}
    for path, leaf in sorted(flat.items()):
        x = np.asarray(leaf)
        if x.dtype.kind != "f" or x.ndim == 0:
            out[path] = leaf
            continue
        vals = rng.integers(-16, 17, x.shape).astype(np.float32) / 16
        if path[-1] in ("weight", "ia3_in", "ia3_out", "lora_magnitude"):
            vals = 1.0 + vals / 4
        out[path] = jnp.asarray(vals, x.dtype)
    return unflatten_params(out)


@pytest.fixture(scope="module")
def base():
    model = LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    return model, _dyadic(params, 1)


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _adapter_folder(method_name: str, config, base, out: Path) -> Path:
    from jaxpeft.methods import get_method

    model, params = base
    method = get_method(method_name)
    config = method.prepare(config, model_config=CONFIG)
    adapted = method.init(jax.random.PRNGKey(3), params, config)
    adapter, frozen = method.split(adapted, config)
    adapter = _dyadic(adapter, 7)
    full = method.combine(adapter, frozen)
    method.save(out, full, config, model_config=CONFIG, base_model_name_or_path=BASE_NAME)
    return out


def _lora_full(base, config: LoraConfig):
    from jaxpeft.methods import get_method

    _, params = base
    lora = get_method("lora")
    adapted = lora.init(jax.random.PRNGKey(3), params, config)
    adapter, frozen = lora.split(adapted, config)
    keep_scale = {p: v for p, v in flatten_params(adapter).items() if p[-1] == "lora_scale"}
    adapter = unflatten_params({**flatten_params(_dyadic(adapter, 7)), **keep_scale})
    return lora, lora.combine(adapter, frozen)


GOLDEN = {
    'adapterhub': {
        'adapter.safetensors': 'f9725ea1280daba9',
        'adapter_config.json': '07fbd26d2a512497',
    },
    'bnb_nf4_dq0': {
        'config.json': '16210f09261a577e',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': 'd3f87033c2bc3122',
    },
    'bnb_nf4_dq1': {
        'config.json': 'd91b61e05c36ec70',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': '9c31610f06d16c54',
    },
    'ia3': {
        'adapter_config.json': 'f87f7bddd5690240',
        'adapter_model.safetensors': '92553c29d9f5fe36',
    },
    'lora_dora': {
        'adapter_config.json': '257e82d2abc4a7e1',
        'adapter_model.safetensors': 'e3b8470be35c9582',
    },
    'lora_patterns': {
        'adapter_config.json': 'a8c6c5fadede453a',
        'adapter_model.safetensors': '1d75f05fc35723cc',
    },
    'merged': {
        'config.json': 'd09e1a4c8449ab64',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': '885c3bdb89641c61',
    },
    'merged_bf16': {
        'config.json': '23daa6e9a3add45f',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': '808789a57c3668cf',
    },
    'merged_dora': {
        'config.json': 'd09e1a4c8449ab64',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': '9e052211c20eab3a',
    },
    'merged_ia3': {
        'config.json': 'd09e1a4c8449ab64',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': 'fa2e0cb5bb661da4',
    },
    'prefix': {
        'adapter_config.json': 'af2a00093d52d40b',
        'adapter_model.safetensors': '7a2935381497ece7',
    },
    'prompt': {
        'adapter_config.json': '3ef0e0dc097b2b29',
        'adapter_model.safetensors': '9f979d0d6b9d4da5',
    },
    'qlora_adapter': {
        'adapter_config.json': 'a4dd3b62474ab26e',
        'adapter_model.safetensors': '591a281005a6d72c',
    },
    'qlora_merged': {
        'config.json': 'd09e1a4c8449ab64',
        'generation_config.json': '6c66025e4fe8684d',
        'model.safetensors': '10c856063496c0b6',
    },
}

ADAPTER_CASES = {
    "lora_dora": ("lora", LoraConfig(r=2, lora_alpha=4, use_dora=True, use_rslora=True,
                                     target_modules=("q_proj", "v_proj", "down_proj"))),
    "lora_patterns": ("lora", LoraConfig(r=3, lora_alpha=6, target_modules="all-linear",
                                         rank_pattern={"down_proj": 2}, layers_to_transform=(1,))),
    "ia3": ("ia3", IA3Config()),
    "prefix": ("prefix", PrefixConfig(num_virtual_tokens=3)),
    "prompt": ("prompt", PromptConfig(num_virtual_tokens=4)),
    "adapterhub": ("adapters", AdaptersConfig(reduction_factor=8)),
}


def _check(name: str, folder: Path) -> None:
    got = _folder_hashes(folder)
    assert got == GOLDEN[name], (
        f"the {name} folder's bytes changed (a file format changed). If intended, update GOLDEN[{name!r}] to "
        f"{got!r} and say why in the commit.")


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter_folder_bytes(case, base, tmp_path):
    method_name, config = ADAPTER_CASES[case]
    _check(case, _adapter_folder(method_name, config, base, tmp_path / case))


def test_merged_hf_folder_bytes(base, tmp_path):
    from jaxpeft.convert.hf import save_hf_folder

    lora, full = _lora_full(base, LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "o_proj", "up_proj")))
    merged = lora.merge(full)
    save_hf_folder(tmp_path / "merged", merged, CONFIG)
    save_hf_folder(tmp_path / "merged_bf16", merged, CONFIG, dtype="bfloat16")
    _check("merged", tmp_path / "merged")
    _check("merged_bf16", tmp_path / "merged_bf16")


def test_merged_dora_and_ia3_bytes(base, tmp_path):
    from jaxpeft.convert.hf import save_hf_folder
    from jaxpeft.methods import get_method

    lora, full = _lora_full(base, LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=("k_proj",)))
    save_hf_folder(tmp_path / "dora", lora.merge(full), CONFIG)
    _check("merged_dora", tmp_path / "dora")
    ia3 = get_method("ia3")
    config = IA3Config()
    adapted = ia3.init(jax.random.PRNGKey(3), base[1], config)
    adapter, frozen = ia3.split(adapted, config)
    save_hf_folder(tmp_path / "ia3", ia3.merge(ia3.combine(_dyadic(adapter, 7), frozen), config), CONFIG)
    _check("merged_ia3", tmp_path / "ia3")


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_4bit_folder_bytes(base, tmp_path, double_quant):
    from jaxpeft.convert.bnb import save_bnb_folder
    from jaxpeft.quant import quantize_params

    quantized = quantize_params(base[1], quant_type="nf4", blocksize=64, double_quant=double_quant)
    name = f"bnb_nf4_dq{int(double_quant)}"
    save_bnb_folder(tmp_path / name, quantized, CONFIG)
    _check(name, tmp_path / name)


def test_qlora_adapter_and_dequantized_merge_bytes(base, tmp_path):
    from jaxpeft.convert.hf import save_hf_folder
    from jaxpeft.quant import dequantize_params, quantize_params

    quantized = quantize_params(base[1], quant_type="nf4", blocksize=64, double_quant=False)
    lora, full = _lora_full((base[0], quantized), LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj")))
    lora.save(tmp_path / "adapter", full, LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj")),
              model_config=CONFIG, base_model_name_or_path=BASE_NAME)
    _check("qlora_adapter", tmp_path / "adapter")
    save_hf_folder(tmp_path / "merged", dequantize_params(lora.merge(full), jnp.float32), CONFIG)
    _check("qlora_merged", tmp_path / "merged")


def test_module_by_module_merged_saves_have_the_golden_bytes(base, tmp_path):
    """`save_merged` (what --save_merged and experiments.merge write: merged, cast and written one module at a
    time) gives the bytes the whole-tree merges above were pinned with."""
    from jaxpeft.merge.unload import save_merged
    from jaxpeft.methods import get_method
    from jaxpeft.quant import quantize_params

    config = LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "o_proj", "up_proj"))
    lora, full = _lora_full(base, config)
    save_merged(tmp_path / "merged", full, lora, config, CONFIG)  # dtype "auto": this fp32 base's float32
    save_merged(tmp_path / "merged_bf16", full, lora, config, CONFIG, dtype="bfloat16")
    config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=("k_proj",))
    save_merged(tmp_path / "merged_dora", _lora_full(base, config)[1], lora, config, CONFIG)
    ia3, ia3_config = get_method("ia3"), IA3Config()
    adapter, frozen = ia3.split(ia3.init(jax.random.PRNGKey(3), base[1], ia3_config), ia3_config)
    save_merged(tmp_path / "merged_ia3", ia3.combine(_dyadic(adapter, 7), frozen), ia3, ia3_config, CONFIG)
    quantized = quantize_params(base[1], quant_type="nf4", blocksize=64, double_quant=False)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"))
    save_merged(tmp_path / "qlora_merged", _lora_full((base[0], quantized), config)[1], lora, config, CONFIG)
    for name in ("merged", "merged_bf16", "merged_dora", "merged_ia3", "qlora_merged"):
        _check(name, tmp_path / name)
