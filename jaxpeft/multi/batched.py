"""Per-example adapters in one batch (multi-tenant serving): row b runs the base with adapter ids[b].

Legend: N adapter slots, B batch rows, S/P sequence/padded prompt length, T cache length, V vocab.

How: the adapters' LoRA leaves are stacked on a leading N axis (`stack.stack_adapters`; slot 0 is
`BASE`, a zero adapter, for rows that want the plain base model), each row's leaves are gathered by
its adapter id, and the model is `jax.vmap`-ed over the rows with the base tree unbatched (in_axes None)
and the gathered adapter leaves batched. Inside, each row is a batch of one, so the model code is the
unmodified single-adapter code; vmap turns the base matmul x·W into one (B·S, I)·(I, O) GEMM over all
rows and x·A·B into per-row batched matmuls. No merged weights are ever formed.

Generation reuses generate.py's pieces (left padding, token selection, the KV cache layout) in the
same single `lax.while_loop`; the cache's per-row tensors are batched and its write index is shared.
Greedy decoding gives, row by row, the tokens each adapter gives alone (test). Sampling draws from one
key for the whole batch, so sampled rows depend on the batch they run in (as in `generate`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.core import partition
from jaxpeft.core.errors import ConfigError
from jaxpeft.models.generate import SamplingConfig, cut_at_stop, decode_loop, left_pad
from jaxpeft.models.causal_lm import init_cache
from jaxpeft.multi.stack import gather_rows, stack_adapters

BASE = "__base__"  # the slot of rows that use no adapter (PEFT's name for it in mixed batches)
_BATCHED_CACHE = ("layers", "mask")


@dataclasses.dataclass(frozen=True)
class StackedLora:
    """N adapters' LoRA leaves on a leading axis; `names[i]` is slot i, `names[0]` is `BASE` (zeros)."""

    names: tuple[str, ...]
    leaves: dict

    def ids(self, adapter_names: Sequence[str | None]) -> np.ndarray:
        """Slot index per row (None means `BASE`); an unknown name is a ConfigError listing the known ones."""
        slot = {n: i for i, n in enumerate(self.names)}
        unknown = sorted({str(n) for n in adapter_names if (n if n is not None else BASE) not in slot})
        if unknown:
            raise ConfigError(f"unknown adapters {unknown}; the stack holds {list(self.names)}")
        return np.asarray([slot[n if n is not None else BASE] for n in adapter_names], np.int32)


def stack(adapters: Mapping[str, Mapping]) -> StackedLora:
    """Stacks named adapter trees (LoRA leaves only) behind a zero `BASE` slot; see the module doc."""
    if BASE in adapters:
        raise ConfigError(f"{BASE!r} names the base model's slot; give the adapter another name")
    if not adapters:
        raise ConfigError("stack needs at least one adapter")
    names = list(adapters)
    stacked = stack_adapters(list(adapters.values()), names)
    # Slot 0, the base: zero factors and scale, so its rows compute x W exactly.
    with_base = jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x]), stacked)
    return StackedLora((BASE, *names), with_base)


def _rows(model: Any, base: Mapping, rows_adapter: Mapping, ids_BxS: jax.Array, mask_BxS: jax.Array,
          cache: Mapping | None):
    """The model over rows (vmap): base unbatched, each row's adapter leaves and cache batched."""

    def one(adapter, ids_S, mask_S, cache_row):
        params = partition.combine(base, adapter)
        if cache_row is None:
            return model.apply({"params": params}, ids_S[None], attention_mask_BxS=mask_S[None])[0], None
        c = {**cache_row, "layers": jax.tree.map(lambda x: x[None], cache_row["layers"]),
             "mask": cache_row["mask"][None]}
        logits, new = model.apply({"params": params}, ids_S[None], attention_mask_BxS=mask_S[None], cache=c)
        return logits[0], {**new, "layers": jax.tree.map(lambda x: x[0], new["layers"]), "mask": new["mask"][0]}

    if cache is None:
        return jax.vmap(lambda a, i, m: one(a, i, m, None)[0])(rows_adapter, ids_BxS, mask_BxS), None
    # Per-row tensors (keys/values, the slot mask) are batched; the write index (and any other entry) is shared.
    axes = {k: 0 if k in _BATCHED_CACHE else None for k in cache}
    return jax.vmap(one, in_axes=(0, 0, 0, axes), out_axes=(0, axes))(rows_adapter, ids_BxS, mask_BxS, cache)


@functools.lru_cache(maxsize=16)
def _logits_fn(model: Any):
    def run(base, stacked, adapter_ids_B, ids_BxS, mask_BxS):
        return _rows(model, base, gather_rows(stacked, adapter_ids_B), ids_BxS, mask_BxS, None)[0]

    return jax.jit(run)


def per_example_logits(model: Any, base: Mapping, stacked: StackedLora, adapter_names: Sequence[str | None],
                       input_ids_BxS: Any, attention_mask_BxS: Any = None) -> jax.Array:
    """Logits (B, S, V) with row b run through adapter `adapter_names[b]` (None or BASE: the base model)."""
    ids = jnp.asarray(input_ids_BxS, jnp.int32)
    _check_rows(len(adapter_names), ids.shape[0])
    mask = jnp.ones_like(ids) if attention_mask_BxS is None else jnp.asarray(attention_mask_BxS, jnp.int32)
    return _logits_fn(model)(base, stacked.leaves, jnp.asarray(stacked.ids(adapter_names)), ids, mask)


@functools.lru_cache(maxsize=16)
def _decode_fn(model: Any, max_new_tokens: int, sampling: SamplingConfig, cache_dtype: Any):
    def run(base, stacked, adapter_ids_B, ids_BxP, mask_BxP, stop_ids, key):
        b, p = ids_BxP.shape
        rows = gather_rows(stacked, adapter_ids_B)  # gathered once, reused by every step
        cache = init_cache(model.config, b, p + max_new_tokens, cache_dtype)

        def forward(ids, mask, cache):
            return _rows(model, base, rows, ids, mask, cache)

        return decode_loop(forward, cache, ids_BxP, mask_BxP, stop_ids, key, max_new_tokens=max_new_tokens,
                           sampling=sampling, recompute_at=model.config.generation_recompute_length())

    return jax.jit(run)


def per_example_generate(model: Any, base: Mapping, stacked: StackedLora, prompts: Sequence[Sequence[int]],
                         adapter_names: Sequence[str | None], *, max_new_tokens: int = 64,
                         sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] = (), pad_id: int = 0,
                         seed: int = 0, cache_dtype: Any = None, min_prompt_len: int = 0) -> list[list[int]]:
    """Continues prompt b with adapter `adapter_names[b]`, all rows in one decode loop; like `generate`,
    returns each row's new tokens cut after its first stop token (kept)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_rows(len(adapter_names), len(prompts))
    slots = jnp.asarray(stacked.ids(adapter_names))
    ids, mask = left_pad(prompts, pad_id, min_len=min_prompt_len)
    fn = _decode_fn(model, max_new_tokens, sampling, cache_dtype or model.dtype)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    return cut_at_stop(fn(base, stacked.leaves, slots, jnp.asarray(ids), jnp.asarray(mask), stops,
                           jax.random.key(seed)), stop_ids)


def _check_rows(n_names: int, n_rows: int) -> None:
    if n_names != n_rows:
        raise ConfigError(f"{n_rows} rows but {n_names} adapter names; name one adapter (or None) per row")
