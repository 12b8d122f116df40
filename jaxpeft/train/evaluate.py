"""Evaluation: loss/perplexity over held-out batches, and generation-based task metrics."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxpeft.models.generate import SamplingConfig, generate, stop_ids_for


def eval_loss(eval_step: Callable, params: Mapping, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Token-weighted mean NLL over `batches` and its perplexity."""
    total, count = 0.0, 0
    for batch in batches:
        nll, n = eval_step(params, batch)
        total, count = total + float(nll), count + int(n)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def generation_eval(
    model: Any,
    params: Mapping,
    tokenizer: Any,
    examples: Sequence[tuple[list[int], str]],
    score: Callable[[str, str], Mapping[str, float]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    samples: int = 3,
) -> dict[str, Any]:
    """Greedy-decodes every prompt, scores it against its reference, and averages each score."""
    stops = stop_ids_for(tokenizer, model.config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals: dict[str, float] = {}
    shown = []
    longest = max((len(p) for p, _ in examples), default=1)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        # Decoding on the CPU is bound by reading the weights, so wide batches are nearly free; the
        # last chunk is filled up to the same width so the decode loop compiles once.
        width = min(batch_size, len(examples))
        prompts = [p for p, _ in chunk] + [chunk[-1][0]] * (width - len(chunk))
        outs = generate(model, params, prompts, max_new_tokens=max_new_tokens,
                        sampling=SamplingConfig(greedy=True), stop_ids=stops, pad_id=pad,
                        min_prompt_len=longest)[: len(chunk)]
        for (prompt, ref), out in zip(chunk, outs):
            pred = tokenizer.decode(out, skip_special_tokens=True).strip()
            for key, value in score(pred, ref).items():
                totals[key] = totals.get(key, 0.0) + float(value)
            if len(shown) < samples:
                shown.append({"prediction": pred, "reference": ref})
    n = max(len(examples), 1)
    return {**{k: v / n for k, v in totals.items()}, "n": len(examples), "samples": shown}
