"""Preference data: token ids equal TRL 1.16's tokenized dataset (strings and conversational, the default
model's chat template), the batch layout, truncation, the bundled task and the errors naming records."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.data.tasks import get_task
from jaxpeft.preference.data import PairBatcher, encode_pairs, pair_rows, tokenize_pair
from jaxpeft.preference.tasks import load_preference_task

score_dates = get_task("dates").score

STRINGS = [{"prompt": "Rewrite 5 March 2021 as ISO: ", "chosen": "2021-03-05", "rejected": "2021-05-03"},
           {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " five, I think"}]
MESSAGES = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Date of 5/3/21?"}],
             "chosen": [{"role": "assistant", "content": "2021-03-05"}],
             "rejected": [{"role": "assistant", "content": "2021-05-03"}]},
            {"prompt": [{"role": "user", "content": "Capital of France?"}],
             "chosen": [{"role": "assistant", "content": "Paris."}],
             "rejected": [{"role": "assistant", "content": "Lyon, probably."}]}]


def _trl_tokenized(tokenizer, records):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    stub = types.SimpleNamespace(_tokenizer=tokenizer)  # _prepare_dataset reads only the tokenizer's EOS here
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return list(DPOTrainer._prepare_dataset(stub, datasets.Dataset.from_list(records), tokenizer, args, "train"))


@pytest.mark.parametrize("records", [STRINGS, MESSAGES], ids=["strings", "messages"])
def test_token_ids_equal_trl(smollm2_tokenizer, records):
    theirs = _trl_tokenized(smollm2_tokenizer, records)
    for ours, t in zip((tokenize_pair(smollm2_tokenizer, r) for r in records), theirs):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[k] == t[k], k
        assert ours["chosen_ids"] != ours["rejected_ids"] and ours["prompt_ids"]


def test_rows_layout_and_prompt_mask():
    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
             {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [14, 15]}]
    rows = pair_rows(pairs, 6, pad_id=0)
    # TRL's DataCollatorForPreference layout: the chosen rows, then the rejected rows, right-padded.
    np.testing.assert_array_equal(rows["input_ids"], [[5, 6, 7, 8, 9, 0], [11, 12, 13, 0, 0, 0],
                                                      [5, 6, 7, 10, 0, 0], [11, 12, 14, 15, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0],
                                                      [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(rows["attention_mask"].sum(1), [5, 3, 4, 4])


def test_batcher_micro_batches_and_resume():
    pairs = [{"prompt_ids": [3, i], "chosen_ids": [100 + i], "rejected_ids": [200 + i]} for i in range(7)]
    b = PairBatcher(pairs, batch_size=4, grad_accum=2, seq_len=4, pad_id=0, seed=1)
    first = [next(b) for _ in range(3)]
    micro = first[0]["input_ids"].reshape(2, 4, 4)  # the Trainer's reshape to (A, 2B, S)
    for m in micro:  # each micro-batch: its own 2 chosen rows, then the same prompts' rejected rows
        np.testing.assert_array_equal(m[:2, 2] + 100, m[2:, 2])
        np.testing.assert_array_equal(m[:2, 1], m[2:, 1])
    state = {"epoch": 0, "position": 4}
    again = PairBatcher(pairs, batch_size=4, grad_accum=2, seq_len=4, pad_id=0, seed=1)
    again.restore(state)
    np.testing.assert_array_equal(next(again)["input_ids"], first[1]["input_ids"])


def test_max_prompt_len_keeps_the_prompt_end_and_seq_len_keeps_the_completion(smollm2_tokenizer):
    full = tokenize_pair(smollm2_tokenizer, MESSAGES[0])
    cut = encode_pairs(smollm2_tokenizer, MESSAGES[:1], seq_len=256, max_prompt_len=5)[0]
    assert cut["prompt_ids"] == full["prompt_ids"][-5:] and cut["chosen_ids"] == full["chosen_ids"]
    longest = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    tight = encode_pairs(smollm2_tokenizer, MESSAGES[:1], seq_len=longest + 3)[0]
    assert tight["prompt_ids"] == full["prompt_ids"][-3:]


@pytest.mark.parametrize("bad,expected", [
    ({"prompt": "p", "rejected": "r"}, "record 1: no 'chosen'"),
    ({"prompt": "p", "chosen": "c", "rejected": "  "}, "record 1: empty 'rejected'"),
])
def test_bad_records_are_named(smollm2_tokenizer, bad, expected):
    with pytest.raises(ConfigError, match=expected):
        encode_pairs(smollm2_tokenizer, [STRINGS[0], bad], seq_len=64)


def test_chosen_equal_rejected_everywhere_and_too_long_completion(smollm2_tokenizer):
    same = [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3
    with pytest.raises(ConfigError, match="chosen equals rejected in every one of its 3 records"):
        encode_pairs(smollm2_tokenizer, same, seq_len=64)
    long = {"prompt": "p", "chosen": "word " * 40, "rejected": "no"}
    with pytest.raises(ConfigError, match=r"(?s)--seq_len - 1 = 15 tokens.*record 1: a 4\d-token completion"):
        encode_pairs(smollm2_tokenizer, [STRINGS[1], long], seq_len=16)


def test_dates_pref_is_deterministic_disjoint_and_wrong_in_the_base_models_three_ways():
    train, held = load_preference_task("dates-pref", seed=0, n_train=300, n_eval=100)
    again, _ = load_preference_task("dates-pref", seed=0, n_train=300, n_eval=100)
    assert train == again
    answers = lambda rs: {r["chosen"][0]["content"] for r in rs}  # noqa: E731
    assert not answers(train) & answers(held)
    iso = re.compile(r"\d{4}-\d{2}-\d{2}")
    kinds = {"wrong date": 0, "not rewritten": 0, "chatter": 0}
    for r in train + held:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert iso.fullmatch(chosen) and chosen != rejected
        assert score_dates(rejected, chosen)["exact_match"] == 0.0
        if iso.fullmatch(rejected):  # an ISO date, but not this one
            kinds["wrong date"] += 1
        elif chosen in rejected:  # the right date inside a sentence
            kinds["chatter"] += 1
            assert len(rejected) > len(chosen) + 10
        else:  # the date left in a human style
            assert not iso.search(rejected) and chosen[:4] in rejected
            kinds["not rewritten"] += 1
    n = len(train + held)
    assert all(0.25 * n < k < 0.42 * n for k in kinds.values()), kinds  # about a third each
    echoed = sum(r["rejected"][0]["content"].lower() == r["prompt"][0]["content"].rsplit("\n", 1)[-1].lower()
                 for r in train)
    assert echoed > 30  # the base's most common failure: the input given back
