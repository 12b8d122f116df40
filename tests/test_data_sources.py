"""The data flags and sources as a run uses them (issue 19): csv, save_to_disk folders, --field_map, several
datasets, hub --dataset_config/--dataset_split, `experiments.data`, the numeric flag ranges, --resume of
an older run folder, packing of `text` records, and one training run on the new formats (slow)."""

from __future__ import annotations

import json
import re

import pytest

from jaxpeft import data
from jaxpeft.core.errors import ConfigError, DataError
from jaxpeft.data import preview
from tests.test_data_formats import CONVERSATIONAL, MULTI_TURN, PROMPT_COMPLETION, SHAREGPT, TEXT


def test_sources_csv_saved_folder_field_map_and_several_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text("question,answer,id\nWhat is 1+1?,2,a\nWhat is 2+2?,4,b\n")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT[:2]),
                          "test": datasets.Dataset.from_list(TEXT[2:])}).save_to_disk(str(saved))
    train, _ = data.load_records(f"{csv_path},{saved}", field_map={"question": "prompt", "answer": "completion"})
    assert [r["_format"] for r in train] == ["prompt_completion"] * 2 + ["text"] * 2
    assert (train[0]["prompt"], train[0]["completion"]) == ("What is 1+1?", "2")
    train, ev = data.load_records(str(saved), eval_split="test")
    assert [r["text"] for r in train] == [r["text"] for r in TEXT[:2]] and ev[0]["text"] == TEXT[2]["text"]
    with pytest.raises(DataError, match="has splits.*--dataset_split"):
        data.load_records(str(saved), split="validation")
    body = tmp_path / "body.jsonl"
    body.write_text(json.dumps({"body": "Some prose."}) + "\n")
    (only,), _ = data.load_records(str(body), text_field="body")
    assert only["text"] == "Some prose."


def test_packing_never_trains_an_example_first_token():
    examples = [{"input_ids": [11, 12, 13], "loss_mask": [1, 1, 1]}, {"input_ids": [21, 22], "loss_mask": [1, 1]}]
    batch = next(data.Batcher(examples, batch_size=1, seq_len=8, pad_id=0, seed=0, pack=True))
    seg, mask = batch["segment_ids"][0], batch["loss_mask"][0]
    firsts = [int(i) for i in range(len(seg)) if seg[i] and (i == 0 or seg[i - 1] != seg[i])]
    assert len(firsts) >= 2 and all(mask[i] == 0 for i in firsts)
    assert mask.sum() == batch["attention_mask"][0].sum() - len(firsts)  # every other token stays a target


def test_experiments_data_prints_targets_and_dumps_in_order(tiny_model_dir, tmp_path, capsys):
    from experiments import data as data_cli
    from jaxpeft.convert.hf import load_tokenizer_from

    records = tmp_path / "mixed.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL + TEXT))
    dump = tmp_path / "out" / "dump.jsonl"
    argv = ["data", f"--dataset={records}", f"--model={tiny_model_dir}", "--seq_len=64", "--show=2",
            f"--dump={dump}", "--nocolor"]
    assert data_cli.run(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and "«" in out and '"target_tokens"' in out
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    expected, _ = preview.encode_dataset(load_tokenizer_from(tiny_model_dir), str(records), seq_len=64)
    assert lines == [{"input_ids": e["input_ids"], "loss_mask": e["loss_mask"]} for e in expected]
    assert len(lines) == 5 and sorted(p.name for p in dump.parent.iterdir()) == ["dump.jsonl"]  # no temp left
    # A bad input is one "error:" line, before anything is written.
    assert data_cli.run(["data", f"--dataset={tmp_path / 'nope.jsonl'}", f"--model={tiny_model_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Data file") and "nope.jsonl does not exist" in err[-1]


@pytest.mark.slow  # a real training run (jit compile of the train and eval steps): ~20 s of CPU
def test_lora_trains_on_text_and_messages_packed(tiny_model_dir, tmp_path):
    from tests.cli import run_entry

    records = tmp_path / "mixed.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in (TEXT + MULTI_TURN + SHAREGPT) * 3))
    out = tmp_path / "run"
    proc = run_entry("experiments.lora", f"--model={tiny_model_dir}", f"--dataset={records}", "--rank=2",
                     "--steps=2", "--batch_size=2", "--seq_len=64", "--pack", "--eval_examples=3", "--eval_split=0.2",
                     "--truncation=right", f"--out={out}", "--noprogress", "--save_every=0")
    assert "ignored field(s) beside the record formats: ['id']" in proc.stderr
    assert re.search(r"longer than --seq_len=64 \(right: \d+ cut, 0 dropped\)", proc.stderr)
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["truncation"] == "right" and settings["train_on"] is None
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m.get("loss", 0) == m.get("loss", 0) for m in metrics)  # no NaN


def test_numeric_training_flags_are_range_checked_before_anything_loads(tmp_path, capsys):
    from absl import flags

    from experiments import common, lora

    code = lora.run(["lora", "--lr=-1", "--steps=-5", "--dropout=1.0", f"--out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not (tmp_path / "run").exists()
    for part in ("--lr=-1.0 (expected > 0)", "--steps=-5 (expected >= 1)", "--dropout=1.0 (expected in [0, 1))"):
        assert part in err[0]
    fv = flags.FlagValues()
    lora.define_flags(fv)
    common.document_flag_ranges(fv)
    assert fv["lr"].help.endswith("Valid: > 0.") and fv["seq_len"].help.endswith("Valid: >= 2.")


def test_hub_dataset_config_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config=None):
        calls.append((name, config))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT[:1]),
                                     "dev": datasets.Dataset.from_list(PROMPT_COMPLETION[:1])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, ev = data.load_records("someone/corpus", config="en", split="dev", eval_split="train")
    assert calls == [("someone/corpus", "en")] * 2
    assert train[0]["_format"] == "prompt_completion" and ev[0]["_format"] == "text"


def test_resume_of_a_run_saved_before_the_data_flags(tmp_path):
    """A run folder written before --train_on & co. existed resumes when those flags keep their defaults."""
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train.run_config import RunConfig
    from jaxpeft.train.run_folder import prepare_out_dir, run_settings

    cfg = RunConfig(out=str(tmp_path / "run"), resume=True)
    settings = run_settings(cfg, get_method("lora"), LoraConfig(), None)
    new = ("dataset_split", "dataset_config", "dataset_text_field", "field_map", "train_on", "chat_template",
           "truncation")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"settings": {k: v for k, v in settings.items()
                                                                           if k not in new}}))
    prepare_out_dir(cfg, settings)
    with pytest.raises(ConfigError, match="train_on: None -> 'last'"):
        changed = RunConfig(out=cfg.out, resume=True, train_on="last")
        prepare_out_dir(changed, run_settings(changed, get_method("lora"), LoraConfig(), None))
