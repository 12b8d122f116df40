"""The held-out loss from the generation's prompt pass (`generate.score_and_generate`, used by the Evaluator
when every held-out row is its prompt plus the answer): the same tokens as `generate` and the same NLL as the
full-row loss step, on a Llama and a Gemma 2 (soft-capped head) tiny model; and the rows it must not take."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpeft.data.batching import ordered_batches
from jaxpeft.models.generate import generate, score_and_generate
from jaxpeft.train.evaluate import shared_answers
from jaxpeft.train.step import make_eval_step
from tests.hf_tiny import VOCAB

pytest.importorskip("torch")


def _rows(seed=0, n=5):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, k).tolist() for k in rng.integers(3, 12, n)]
    answers = [rng.integers(3, VOCAB, k).tolist() for k in rng.integers(1, 6, n)]
    return prompts, answers


@pytest.mark.parametrize("family", [None, "gemma2"])
def test_one_prompt_pass_gives_the_tokens_and_the_full_row_loss(family, tiny_base, family_base):
    _, model, params = family_base(family) if family else tiny_base(seed=5)
    prompts, answers = _rows()
    targets = [[1] * (len(a) - 1) + [0] if len(a) > 1 else [1] for a in answers]  # the last token not counted
    got, nll, count = score_and_generate(model, params, prompts, answers, targets, max_new_tokens=6, min_prompt_len=16)
    assert got == generate(model, params, prompts, max_new_tokens=6, min_prompt_len=16)
    encoded = [{"input_ids": p + a, "loss_mask": [0] * len(p) + t} for p, a, t in zip(prompts, answers, targets)]
    step = make_eval_step(model, max_targets=64)
    total, n = 0.0, 0
    for batch in ordered_batches(encoded, 3, 24, 0):
        s, c = step(params, batch)
        total, n = total + float(s), n + int(c)
    assert count == n == sum(map(sum, targets))
    assert nll == pytest.approx(total, rel=1e-5)


def test_rows_that_are_not_prompt_plus_answer_take_the_full_row_loss(tiny_base):
    _, model, _ = tiny_base(seed=5)
    prompts, answers = _rows(1, 3)
    examples = [(p, "ref") for p in prompts]
    good = [{"input_ids": p + a, "loss_mask": [0] * len(p) + [1] * len(a)} for p, a in zip(prompts, answers)]
    assert shared_answers(model, examples, good) == [(a, [1] * len(a)) for a in answers]
    in_prompt = [dict(e) for e in good]
    in_prompt[1] = {"input_ids": good[1]["input_ids"], "loss_mask": [1] * len(good[1]["input_ids"])}
    assert shared_answers(model, examples, in_prompt) is None  # a target inside the prompt (train_on=all)
    other = [dict(e) for e in good]
    other[2] = {"input_ids": [7] + good[2]["input_ids"][1:], "loss_mask": good[2]["loss_mask"]}
    assert shared_answers(model, examples, other) is None  # the row does not start with the prompt
    assert shared_answers(model, examples[:2], good) is None  # a record without a prompt left out
    assert shared_answers(model, examples, good, budget_bytes=1000) is None  # answer logits over the budget
