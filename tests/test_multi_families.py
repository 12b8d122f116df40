"""Per-example adapters (`jaxpeft.multi`) on every family of the family table: one adapter per row in a batch
gives, row by row, the logits (and the greedy tokens) of that adapter alone. The families' own modules are the
targets (Phi-3's fused qkv_proj / gate_up_proj), and the batch is left padded past the sliding windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft.core.tree import flatten_params, unflatten_params
from jaxpeft.methods.lora import Lora, LoraConfig
from jaxpeft.models.generate import generate
from jaxpeft.multi import BASE, AdapterRegistry, per_example_logits, stack
from tests.hf_tiny import FAMILY_CASES, VOCAB

pytest.importorskip("torch")
LORA = Lora()
DENSE = sorted(f for f in FAMILY_CASES if f not in ("mixtral", "qwen3_moe"))
TARGETS = {"phi3": ("qkv_proj", "gate_up_proj")}
# The default run: Gemma 3 (Gemma's module, q/k norms, sliding layers) and Phi-3 (fused targets); Gemma 2 and
# Qwen3 run the same vmapped code through the Gemma and Llama modules, so they are slow (~30 s of CPU more).
SLOW = {"gemma2", "qwen3"}
LOGIT_CASES = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in DENSE]


def _adapters(base, family):
    targets = TARGETS.get(family, ("q_proj", "v_proj", "up_proj"))
    out = {}
    for seed, (name, r) in enumerate((("a", 4), ("b", 2)), 1):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
        flat = flatten_params(LORA.init(jax.random.key(seed), base, cfg))
        for i, p in enumerate(sorted(p for p in flat if p[-1] == "lora_b")):
            flat[p] = 0.5 * jax.random.normal(jax.random.key(100 * seed + i), flat[p].shape)
        out[name] = (unflatten_params(flat), cfg)
    return out


@pytest.mark.parametrize("family", LOGIT_CASES)
def test_per_example_rows_equal_each_adapter_alone(family, family_base):
    _, model, base = family_base(family)
    adapters = _adapters(base, family)
    names = ["a", None, "b", "a"]
    ids = np.random.default_rng(0).integers(3, VOCAB, (len(names), 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    stacked = stack({n: LORA.split(tree, cfg)[0] for n, (tree, cfg) in adapters.items()})
    got = np.asarray(per_example_logits(model, base, stacked, names, ids, mask))
    for row, n in enumerate(names):
        params = adapters[n][0] if n else base
        want = np.asarray(model.apply({"params": params}, jnp.asarray(ids[row:row + 1]),
                                      attention_mask_BxS=jnp.asarray(mask[row:row + 1])))[0]
        real = mask[row].astype(bool)
        np.testing.assert_allclose(got[row][real], want[real], atol=1e-5, rtol=0, err_msg=f"{family} row {row} ({n})")
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the adapter changes the row, so equality is not trivial


@pytest.mark.slow  # greedy decoding per family: one decode loop compile per family and per adapter (~40 s of CPU)
@pytest.mark.parametrize("family", DENSE)
def test_per_example_generation_equals_each_adapter_alone(family, family_base):
    _, model, base = family_base(family)
    adapters = _adapters(base, family)
    reg = AdapterRegistry(model, base)
    for n, (tree, cfg) in adapters.items():
        reg.add(n, tree, cfg)
    rng = np.random.default_rng(4)
    names = ["a", "b", None, BASE]
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (3, 9, 7, 5)]
    kw = dict(max_new_tokens=8, min_prompt_len=16)
    got = reg.per_example_generate(prompts, names, **kw)
    for prompt, n, row in zip(prompts, names, got):
        alone = generate(model, adapters[n][0] if n in adapters else base, [prompt], **kw)[0]
        assert row == alone, (family, n)
