"""experiments.compare: the 7B adapter-size table against the article (REFERENCE.md), the child-process
peak-memory reading, the pieces of a run summary, and (slow) the --quick comparison end to end on a tiny
model with LoRA, prompt tuning and IA3."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft import compare
from jaxpeft.compare.report import render_markdown, table_rows, write_report

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "REFERENCE.md"


def test_7b_lora_adapter_sizes_match_the_article():
    rows = compare.adapter_size_table()
    assert [r["rank"] for r in rows] == [4, 8, 16, 32, 64]
    # REFERENCE.md: rank 16 on one 4096x4096 matrix is 131,072 parameters; q,k,v,o of 32 layers is 128 of them.
    r16 = next(r for r in rows if r["rank"] == 16)
    assert r16["parameters"] == 128 * 131_072 and r16["bytes"] == 2 * r16["parameters"]
    for r in rows:
        assert r["agrees"], r
        assert int(r["MB"]) == r["reference_MB"], r  # the article truncates decimal MB: 8.39 -> "~8"
    # The check can fail: a 13B shape (hidden 5120, 40 layers) is far from the 7B figures.
    _, big = compare.lora_adapter_size(16, layers=40, hidden=5120)
    assert abs(big / 1e6 - compare.REFERENCE_7B_MB[16]) / compare.REFERENCE_7B_MB[16] > 0.05


def test_reference_figures_are_reference_md_s():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is absent (only development checkouts have ../shared)")
    # The bullet "- Adapter size for a 7B model (...): rank 4 ~8 MB, 8 ~16 MB, ..." (it wraps over lines).
    bullet = REFERENCE.read_text().split("Adapter size for a 7B model", 1)[1].split("\n- ", 1)[0]
    found = {int(r): float(mb) for r, mb in re.findall(r"(\d+) ~(\d+) MB", bullet)}
    assert found == compare.REFERENCE_7B_MB


def test_size_table_cli_prints_the_checked_table():
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", "--only_size_table"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 16 | 16,777,216 | 33,554,432 | 33.6 | ~33 MB | yes |" in proc.stdout
    assert "all agree" in proc.stdout


def test_run_child_reads_the_childs_own_peak_memory(tmp_path):
    big = compare.run_child([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                            log_path=tmp_path / "big.log")
    small = compare.run_child([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"],
                              log_path=tmp_path / "small.log")
    assert big.returncode == 0 and small.returncode == 3
    assert big.peak_rss_bytes >= 300 * 2**20
    # Its own peak, not the earlier child's nor the launcher's (this pytest process holds ~1 GB by now).
    assert small.peak_rss_bytes < 100 * 2**20 < big.peak_rss_bytes
    assert small.launcher_peak_rss_bytes > 0
    assert (tmp_path / "small.log").read_text().strip() == "hi"


def test_train_tokens_per_s_leaves_out_the_compile_step():
    records = [{"step": 0, "eval_loss": 1.0}, {"step": 1, "tokens_per_s": 5.0}, {"step": 2, "tokens_per_s": 100.0},
               {"step": 3, "tokens_per_s": 120.0}, {"step": 4, "tokens_per_s": 110.0}]
    assert compare.train_tokens_per_s(records) == 110.0
    assert compare.train_tokens_per_s(records[:2]) == 5.0  # one step: it is all there is
    assert compare.train_tokens_per_s([{"step": 0}]) is None


def test_config_lists_every_problem_and_the_lr_grid():
    with pytest.raises(ConfigError) as e:
        compare.CompareConfig(out="x", methods=("lora", "dora"), lrs=(("full", (1e-4,)), ("lora", (-1.0,))), steps=0)
    msg = str(e.value)
    for part in ("unknown method 'dora'", "'full', which is not compared", "lora: learning rate -1.0", "steps=0",
                 "Known methods: full,lora,qlora,adapters,prefix,prompt,ia3"):
        assert part in msg
    cfg = compare.CompareConfig(out="x", lrs=(("prompt", (0.3,)),))
    assert cfg.grid("lora") == (1e-3,) and cfg.grid("prompt") == (0.3,) and cfg.grid("full") == (5e-5,)
    swept = compare.CompareConfig(out="x", sweep=True)
    assert all(swept.grid(m) == compare.SPECS[m].lrs and len(swept.grid(m)) == 2 for m in compare.METHOD_ORDER)
    text = compare.lr_choice_text(cfg)
    assert "full 5e-05" in text and "prompt 0.3" in text and "set by --lrs for prompt" in text


def test_selection_prefers_exact_match_then_lower_loss():
    a = {"after": {"eval_exact_match": 0.9, "eval_loss": 0.5}}
    b = {"after": {"eval_exact_match": 0.9, "eval_loss": 0.2}}
    c = {"after": {"eval_exact_match": 0.95, "eval_loss": 0.9}}
    assert max([a, b, c], key=compare.selection_key) is c
    assert max([a, b], key=compare.selection_key) is b


def _row(trainable=10, pct=1.0):
    return {"lr": 1e-3, "parameters": {"trainable": trainable, "trainable_percent": pct},
            "artifact_weight_bytes": 2048, "peak_rss_bytes": 3e9, "train_tokens_per_s": 500.0,
            "after": {"eval_exact_match": 0.9, "eval_loss": 0.1}, "tried": [{"lr": 1e-3}]}


def test_report_shows_failed_methods_and_writes_all_three_files(tmp_path):
    summary = {
        "settings": {"model": None, "steps": 5, "batch_size": 2, "eval_examples": 3, "quick": False},
        "command": "python -m experiments.compare --out=x", "lr_choice": "one per method.",
        "methods": {"lora": _row(), "prompt": {"error": "boom", "log": "logs/prompt.log", "tried": [{"lr": 0.03}]}},
        "base": {"source": "lora run", "eval_exact_match": 0.0, "eval_loss": 1.0},
        "generation": {"base": {"tokens_per_s": 50.0}, "settings": {"prompts": 2, "new_tokens": 4, "rounds": 1},
                       "variants": {"lora": {"adapted": {"relative_to_base": 0.8},
                                             "merged": {"relative_to_base": 1.0}}}},
        "adapter_size_7b": compare.adapter_size_table(),
    }
    rows = {r["method"]: r for r in table_rows(summary)}
    assert rows["prompt"]["exact_match"] == "failed"
    assert rows["lora"]["gen_adapted"] == "0.80" and rows["lora"]["gen_merged"] == "1.00"
    assert rows["lora"]["artifact"] == "2.05 kB" and rows["lora"]["peak_rss"] == "3 GB"
    md = render_markdown(summary)
    assert "prompt: training failed, see `logs/prompt.log`" in md
    paths = write_report(tmp_path, summary)
    assert json.loads(paths["json"].read_text())["methods"]["prompt"]["error"] == "boom"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_comparison_end_to_end(tmp_path):
    """~1.5-2 min on the 2 shared cores: three tiny training runs, then generation timing."""
    from tests.hf_tiny import tiny_model_folder

    model = tiny_model_folder(tmp_path / "model")
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "experiments.compare", f"--out={out}", "--quick", f"--model={model}",
                           "--methods=lora,prompt,ia3"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "compare.json").read_text())
    methods = summary["methods"]
    assert set(methods) == {"lora", "prompt", "ia3"} and summary["settings"]["methods"] == ["lora", "prompt", "ia3"]
    # Parameter counts from shapes (tiny model: 2 layers, hidden 40, kv width 8, MLP 52).
    expected = {"lora": 2 * 4 * (2 * (40 + 40) + 2 * (40 + 8)),  # rank 4 on q,o (40->40) and k,v (40->8)
                "prompt": 4 * 40,  # 4 virtual tokens x hidden
                "ia3": 2 * (8 + 8 + 52)}  # k and v outputs, down_proj input
    for label, row in methods.items():
        assert "error" not in row, row.get("error")
        assert row["lr"] == compare.SPECS[label].lrs[0]
        assert row["parameters"]["trainable"] == expected[label]
        assert 0 < row["parameters"]["trainable_percent"] < 100
        weights = sum(p.stat().st_size for p in Path(row["artifact"]).glob("*.safetensors"))
        assert row["artifact_weight_bytes"] == weights > 0
        assert row["peak_rss_bytes"] > 100e6 and row["train_tokens_per_s"] > 0 and row["wall_s"] > 0
        assert row["peak_rss_bytes"] > row["launcher_peak_rss_bytes"] + 100e6  # the run's own peak
        assert {"eval_exact_match", "eval_loss"} <= set(row["after"])
        assert not (Path(row["run_dir"]) / "checkpoints").exists()  # removed without --keep_checkpoints
    assert summary["base"]["source"] == "lora run, before training"
    gen = summary["generation"]
    assert gen["base"]["tokens_per_s"] > 0
    for label in ("lora", "ia3"):  # mergeable: the merged model times too, and gives the adapted logits
        v = gen["variants"][label]
        assert v["adapted"]["relative_to_base"] > 0 and v["merged"]["relative_to_base"] > 0
        assert v["merged_max_logit_diff"] < 1e-4
    assert gen["variants"]["prompt"]["merged"] is None and gen["variants"]["prompt"]["adapted"]["tokens_per_s"] > 0
    assert [r["MB"] for r in summary["adapter_size_7b"]] == [r["MB"] for r in compare.adapter_size_table()]
    md = (out / "compare.md").read_text()
    for text in ("| lora |", "| prompt |", "| ia3 |", "Learning rates", "~134 MB", "peak RSS"):
        assert text in md
    assert "| ia3 |" in proc.stdout and "all agree" in proc.stdout
