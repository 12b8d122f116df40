"""bench/gpu_suite.py's dry run: the device suite's whole code path on the CPU with tiny shapes, every section
writing its result file, with datasets, gguf, bitsandbytes and tensorboardX unimportable (the device has none
of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("datasets", "gguf", "bitsandbytes", "tensorboardX")
SECTIONS = ("tests", "nf4", "train", "attention", "long_context")


def _blocking_env(tmp_path: Path) -> dict:
    """PYTHONPATH with a sitecustomize that makes ABSENT unimportable in every process the suite starts."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfor _name in %r:\n    sys.modules[_name] = None  # import raises ImportError\n" % (ABSENT,))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "JAX_PLATFORMS": "cpu"}


def test_dry_run_writes_every_section_without_the_absent_packages(tmp_path):
    env = _blocking_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "halted; None in sys.modules" in probe.stderr  # the block is in force
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run", f"--out={out}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and not any(f.endswith(".tmp") for f in files), files
    results = {s: json.loads((out / f"{s}.json").read_text()) for s in SECTIONS}
    for name, res in results.items():
        status = res["status"]
        assert status == "ok" or (status.startswith("skipped: ") and len(status) > 12), (name, res)
    assert (out / "tests.txt").exists()
    assert {r["path"] for r in results["nf4"]["rows"]} == {"bf16 matmul", "dequantize+matmul (xla)"}
    assert all(r["GB_per_s"] > 0 for r in results["nf4"]["rows"])
    for method in ("lora", "qlora"):
        run = results["train"][method]
        assert run["status"] == "ok" and run["method"] == method
        assert run["tokens_per_s"] > 0 and run["model_flops"] > run["frozen_base_flops"] > 0
        assert run["planner_peak_bytes"] > 0
    assert results["train"]["generate"]["shards"] > 1  # sharded as HF writes checkpoints, with an index
    assert results["long_context"]["longest_fitting_seq"] == 64
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sections"]) == set(SECTIONS) and summary["dry_run"]
