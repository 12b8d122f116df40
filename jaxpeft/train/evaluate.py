"""Evaluation: loss/perplexity over held-out batches, generation-based task metrics, and the `Evaluator`
a run calls before, during and after training."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

from jaxpeft.data.batching import ordered_batches
from jaxpeft.data.encode import eval_prompts
from jaxpeft.models.generate import SamplingConfig, generate, score_and_generate, stop_ids_for
from jaxpeft.train.loop import micro_batch_targets
from jaxpeft.train.run_data import RunData
from jaxpeft.train.step import make_eval_step


def eval_loss(eval_step: Callable, params: Mapping, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Token-weighted mean NLL over `batches` and its perplexity."""
    total, count = 0.0, 0
    for batch in batches:
        nll, n = eval_step(params, batch)
        total, count = total + float(nll), count + int(n)
    return {f"eval_{k}": v for k, v in loss_metrics(total, count).items()}


def loss_metrics(nll_sum: float, count: int) -> dict[str, float]:
    """The mean NLL of `count` target tokens, its perplexity, and the count."""
    loss = nll_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def even_width(n: int, most: int) -> int:
    """The width of the fewest chunks of at most `most` rows that hold `n` rows, as even as they can be
    (100 rows, most 64: 2 chunks of 50)."""
    if n < 1:
        return 1
    return -(-n // -(-n // most))


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
    answers: Sequence[tuple[list[int], list[int]]] | None = None,
) -> dict[str, Any]:
    """Greedy-decodes every prompt, scores it against its reference, and averages each score.

    With `answers` ((answer ids, target mask) per example, the rest of its encoded row after the prompt), the
    same prompt pass also gives the held-out loss of prompt + answer (`score_and_generate`): eval_loss,
    eval_perplexity and eval_tokens join the result."""
    stops = stop_ids_for(tokenizer, model.config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    totals: dict[str, float] = {}
    shown = []
    nll, count = 0.0, 0
    longest = max((len(p) for p, _ in examples), default=1)
    longest_answer = max((len(a) for a, _ in answers), default=1) if answers else 0
    # Decoding on the CPU is bound by reading the weights, so wide batches are nearly free; the prompts
    # (their prefill is most of the cost) are split into chunks of one width (so the decode loop compiles
    # once) that waste as few rows as they can: 100 prompts are 2 x 50, not 64 + 36 filled up to 64.
    width = even_width(len(examples), batch_size)
    for start in range(0, len(examples), width):
        chunk = examples[start:start + width]
        prompts = [p for p, _ in chunk] + [chunk[-1][0]] * (width - len(chunk))
        if answers is None:
            outs = generate(model, params, prompts, max_new_tokens=max_new_tokens,
                            sampling=SamplingConfig(greedy=True), stop_ids=stops, pad_id=pad,
                            min_prompt_len=longest, pad_multiple=8)
        else:
            part = list(answers[start:start + width])
            part += [(part[-1][0], [0] * len(part[-1][0]))] * (width - len(chunk))  # the fill rows count nothing
            outs, chunk_nll, chunk_count = score_and_generate(
                model, params, prompts, [a for a, _ in part], [t for _, t in part], max_new_tokens=max_new_tokens,
                stop_ids=stops, pad_id=pad, min_prompt_len=longest, min_answer_len=longest_answer, pad_multiple=8)
            nll, count = nll + chunk_nll, count + chunk_count
        for (prompt, ref), out in zip(chunk, outs[: len(chunk)]):
            pred = tokenizer.decode(out, skip_special_tokens=True).strip()
            for key, value in score(pred, ref).items():
                totals[key] = totals.get(key, 0.0) + float(value)
            if len(shown) < samples:
                shown.append({"prediction": pred, "reference": ref})
    n = max(len(examples), 1)
    out = {**{k: v / n for k, v in totals.items()}, "n": len(examples), "samples": shown}
    if answers is not None:
        out.update(loss_metrics(nll, count))
    return out


def shared_answers(model: Any, prompts: Sequence[tuple[list[int], str]], encoded: Sequence[Mapping],
                   *, rows: int = 64, budget_bytes: int = 1 << 30) -> list[tuple[list[int], list[int]]] | None:
    """(answer ids, target mask) per held-out example when the loss can come from the generation's prompt pass:
    each encoded row is its prompt followed by the answer, with no target inside the prompt, the model does
    not recompute while generating (LongRoPE), and the answers' logits (rows x answer x vocab, fp32) fit in
    `budget_bytes`. None otherwise (the loss then runs over the full rows)."""
    if len(prompts) != len(encoded) or not prompts or model.config.generation_recompute_length() is not None:
        return None
    out = []
    for (prompt, _), example in zip(prompts, encoded):
        ids, mask, k = list(example["input_ids"]), list(example["loss_mask"]), len(prompt)
        if ids[:k] != list(prompt) or any(mask[:k]) or len(ids) == k:
            return None
        out.append((ids[k:], [int(m) for m in mask[k:]]))
    longest = -(-max(len(a) for a, _ in out) // 8) * 8
    if even_width(len(out), rows) * longest * model.config.vocab_size * 4 > budget_bytes:
        return None
    return out


class Evaluator:
    """A run's held-out evaluation: the loss over the encoded held-out examples (batches of up to 32 rows)
    and the task metrics of greedy generation on their prompts. `evaluator(params)` returns both.

    With no held-out examples (`--eval_examples=0`) it is off: `enabled` is False and a call returns {}.
    """

    def __init__(self, model: Any, tokenizer: Any, data: RunData) -> None:
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self.enabled = bool(data.eval_encoded)
        if not self.enabled:
            logging.info("evaluation off: no held-out examples (--eval_examples=0)")
            return
        # Batches of at most 32 rows, as even as they can be (100 examples: 4 x 25, not 4 x 32 with 28
        # empty rows), each as long as the longest held-out example (rounded up to 8), not the training rows.
        self.rows = even_width(len(data.eval_encoded), 32)
        longest = max(len(e["input_ids"]) for e in data.eval_encoded)
        self.seq_len = min(data.seq_len, -(-longest // 8) * 8)
        targets = micro_batch_targets(data.eval_encoded, self.rows, self.seq_len, False)
        self.eval_step = make_eval_step(model, max_targets=targets)
        self.prompts = eval_prompts(tokenizer, data.eval_records)
        # When every held-out row is its generation prompt plus the answer, one prompt pass gives both.
        self.answers = shared_answers(model, self.prompts, data.eval_encoded)

    def __call__(self, params: Mapping) -> dict[str, Any]:
        if not self.enabled:
            return {}
        data = self.data
        start = time.perf_counter()
        if self.answers is not None:
            result = {f"eval_{k}": v for k, v in generation_eval(
                self.model, params, self.tokenizer, self.prompts, data.score, max_new_tokens=data.max_new_tokens,
                answers=self.answers).items()}
            logging.info("evaluation: loss and generation on %d examples from one prompt pass, %.1f s",
                         len(self.prompts), time.perf_counter() - start)
            return result
        result = eval_loss(self.eval_step, params, ordered_batches(data.eval_encoded, self.rows, self.seq_len,
                                                                   data.pad_id))
        mid = time.perf_counter()
        result.update({f"eval_{k}": v for k, v in generation_eval(
            self.model, params, self.tokenizer, self.prompts, data.score,
            max_new_tokens=data.max_new_tokens).items()})
        logging.info("evaluation: loss %.1f s, generation on %d examples %.1f s", mid - start, len(self.prompts),
                     time.perf_counter() - mid)
        return result


def scalars(d: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of an evaluation (what metrics.jsonl and results.json hold)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}
