"""Generation with a KV cache: greedy or sampled (temperature, top-k, top-p), stop tokens, and batched
prompts of different lengths (left padded). The whole decode loop is one jitted `lax.while_loop`.

Shape legend: B batch, P padded prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen. `greedy=True` ignores the other fields."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy=True")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")


def select_token(logits_BxV: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Picks the next token id per row according to `sampling`."""
    if sampling.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < sampling.top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode_loop(forward, cache, ids_BxP, mask_BxP, stop_ids, key, *, max_new_tokens: int,
                sampling: SamplingConfig, recompute_at: int | None = None, prefilled=None):
    """The traced decode loop: `forward(ids_BxS, mask_BxS, cache) -> (logits, cache)` runs the prompt once,
    then one token per step until every row has produced a stop token or `max_new_tokens` tokens.
    Returns the new tokens (B, max_new_tokens); rows stop being meaningful after their stop token.

    `recompute_at` (the config's `generation_recompute_length`): the step whose longest row first holds
    recompute_at + 1 tokens runs the whole sequence again on the empty cache it started from, as transformers'
    Phi-3 generate does when LongRoPE switches factors (with prompts padded to the longest, as its batches are).

    `prefilled` = (the prompt's last logits (B, V), the cache after the prompt): the prompt already ran (`cache`
    is then the empty cache it ran on)."""
    b, p = ids_BxP.shape
    empty = cache
    if prefilled is None:
        logits, cache = forward(ids_BxP, mask_BxP, cache)
        last_BxV = logits[:, -1]
    else:
        last_BxV, cache = prefilled
    key, sub = jax.random.split(key)
    first = select_token(last_BxV, sub, sampling)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    longest = jnp.max(jnp.sum(mask_BxP, axis=1))

    def one_token(step, token, cache, out):
        return forward(token[:, None], jnp.ones((b, 1), jnp.int32), cache)

    def whole_sequence(step, token, cache, out):
        ids = jnp.concatenate([ids_BxP, out], axis=1)
        ids = jax.lax.dynamic_update_slice(ids, token[:, None], (0, p + step - 1))
        filled = (jnp.arange(max_new_tokens) < step).astype(mask_BxP.dtype)
        mask = jnp.concatenate([mask_BxP, jnp.broadcast_to(filled, (b, max_new_tokens))], axis=1)
        logits, fresh = forward(ids, mask, empty)
        last = jax.lax.dynamic_slice_in_dim(logits, p + step - 1, 1, axis=1)
        return last, {**fresh, "index": empty["index"] + p + step}

    def body(state):
        step, token, cache, done, out, key = state
        if recompute_at is None:
            logits, cache = one_token(step, token, cache, out)
        else:
            crossing = longest + step == recompute_at + 1  # this step's sequence has recompute_at + 1 tokens
            logits, cache = jax.lax.cond(crossing, whole_sequence, one_token, step, token, cache, out)
        key, sub = jax.random.split(key)
        nxt = select_token(logits[:, -1], sub, sampling)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, cache, done | jnp.isin(nxt, stop_ids), out, key

    state = (jnp.int32(1), first, cache, done, out, key)
    return jax.lax.while_loop(cond, body, state)[4]


@functools.lru_cache(maxsize=32)
def _decode_fn(model: Any, max_new_tokens: int, sampling: SamplingConfig, cache_dtype: Any):
    def run(params, ids_BxP, mask_BxP, stop_ids, key):
        b, p = ids_BxP.shape
        # new_cache puts an adapter's virtual tokens (prompt/prefix tuning) in front of the prompt's slots.
        cache = model.apply({"params": params}, b, p + max_new_tokens, cache_dtype, method="new_cache")

        def forward(ids, mask, cache):
            return model.apply({"params": params}, ids, attention_mask_BxS=mask, cache=cache)

        return decode_loop(forward, cache, ids_BxP, mask_BxP, stop_ids, key, max_new_tokens=max_new_tokens,
                           sampling=sampling, recompute_at=model.config.generation_recompute_length())

    return jax.jit(run)


@functools.lru_cache(maxsize=32)
def _score_and_decode_fn(model: Any, max_new_tokens: int, cache_dtype: Any):
    def run(params, ids_BxP, mask_BxP, answer_BxA, answer_mask_BxA, target_BxA, stop_ids, key):
        b, p = ids_BxP.shape
        empty = model.apply({"params": params}, b, p + max(max_new_tokens, answer_BxA.shape[1]), cache_dtype,
                            method="new_cache")

        def forward(ids, mask, cache):
            return model.apply({"params": params}, ids, attention_mask_BxS=mask, cache=cache)

        def head(hidden):
            return model.apply({"params": params}, hidden, method="head")

        # The prompt once: its cache serves both the teacher-forced answer and the decoding.
        hidden_BxPxD, cache = model.apply({"params": params}, ids_BxP, attention_mask_BxS=mask_BxP, cache=empty,
                                          return_hidden=True)
        last_BxV = head(hidden_BxPxD[:, -1:])[:, 0]
        answer_hidden, _ = model.apply({"params": params}, answer_BxA, attention_mask_BxS=answer_mask_BxA,
                                       cache=cache, return_hidden=True)
        # Answer token t is predicted from the position before it: the prompt's last one, then the answer's.
        pred_BxAxV = jnp.concatenate([last_BxV[:, None], head(answer_hidden[:, :-1])], axis=1)
        logp_BxAxV = jax.nn.log_softmax(pred_BxAxV.astype(jnp.float32), axis=-1)
        nll_BxA = -jnp.take_along_axis(logp_BxAxV, answer_BxA[..., None], axis=-1)[..., 0]
        weight_BxA = target_BxA.astype(jnp.float32)
        tokens = decode_loop(forward, empty, ids_BxP, mask_BxP, stop_ids, key, max_new_tokens=max_new_tokens,
                             sampling=SamplingConfig(greedy=True), prefilled=(last_BxV, cache))
        return tokens, jnp.sum(nll_BxA * weight_BxA), jnp.sum(weight_BxA)

    return jax.jit(run)


def score_and_generate(
    model: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    min_prompt_len: int = 0,
    min_answer_len: int = 0,
    pad_multiple: int = 16,
) -> tuple[list[list[int]], float, int]:
    """Greedy continuations of `prompts` (as `generate`) and, from the same prompt pass, the summed NLL of the
    reference `answers` (answer token i counted where `targets[i]` is 1) and the number of counted tokens:
    the held-out loss of prompt + answer rows without running the prompts twice. Models whose generation
    recomputes the sequence (LongRoPE) are refused: use the full-sequence loss there."""
    if model.config.generation_recompute_length() is not None:
        raise ValueError("score_and_generate: this model recomputes the sequence while generating (LongRoPE); "
                         "score the full sequences instead")
    if len(answers) != len(prompts) or len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers and {len(targets)} target masks")
    ids, mask = left_pad(prompts, pad_id, multiple=pad_multiple, min_len=min_prompt_len)
    width = -(-max(max(len(a) for a in answers), min_answer_len, 1) // pad_multiple) * pad_multiple
    answer = np.full((len(answers), width), pad_id, np.int32)
    answer_mask = np.zeros_like(answer)
    target = np.zeros_like(answer)
    for i, (a, t) in enumerate(zip(answers, targets)):
        answer[i, :len(a)], answer_mask[i, :len(a)], target[i, :len(t)] = a, 1, t
    fn = _score_and_decode_fn(model, max_new_tokens, model.dtype)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    out, nll, count = fn(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(answer), jnp.asarray(answer_mask),
                         jnp.asarray(target), stops, jax.random.key(0))
    return cut_at_stop(out, stop_ids), float(nll), int(count)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16,
             min_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to one length (at least `min_len`, rounded up to `multiple` to limit recompiles)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(max(len(p) for p in prompts), min_len)
    width = -(-longest // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def generate(
    model: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    cache_dtype: Any = None,
    min_prompt_len: int = 0,
    pad_multiple: int = 16,
) -> list[list[int]]:
    """Continues each prompt; returns the new tokens per row, cut after the first stop token (kept).

    `min_prompt_len` pads prompts to at least that length, so calls with different prompts share one
    compiled decode loop; the padded length is a multiple of `pad_multiple`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask = left_pad(prompts, pad_id, multiple=pad_multiple, min_len=min_prompt_len)
    fn = _decode_fn(model, max_new_tokens, sampling, cache_dtype or model.dtype)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    return cut_at_stop(fn(params, jnp.asarray(ids), jnp.asarray(mask), stops, jax.random.key(seed)), stop_ids)


def cut_at_stop(out_BxN: Any, stop_ids: Sequence[int]) -> list[list[int]]:
    """Each row of the decode loop's tokens up to and including its first stop token."""
    stop_set = set(stop_ids)
    results = []
    for row in np.asarray(out_BxN).tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:cut])
    return results


def stop_ids_for(tokenizer: Any, config: Any) -> list[int]:
    """End-of-sequence ids from the model config and the tokenizer (chat end-of-turn included)."""
    ids: set[int] = set()
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (tuple, list)) else [eos] if eos is not None else [])
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
            if tid is not None:
                ids.add(int(tid))
    return sorted(ids)
