"""Out-of-core model merging, jaxpeft against mergekit on the same files in the same run (issue 18).

    python -m bench.merge_models --dir=/tmp/merge_bench              # generate, run both, print, keep files
    python -m bench.merge_models --dir=/tmp/merge_bench --cleanup    # ... and delete everything afterwards
    python -m bench.merge_models --dir=/tmp/mb_small --layers=2 --vocab=8192 --tools=jaxpeft   # a dry run

`gen` writes three random Llama-shaped bf16 checkpoints (base, ft0, ft1; by default 22 layers, hidden 2,048,
MLP 8,192, 32 heads, 8 KV heads, vocabulary 49,152, untied head: 1.54 B parameters, 3.08 GB each) as
transformers writes one: sharded safetensors (`--shard_gb`) with model.safetensors.index.json and
config.json (bench.big_model.generate; `fast`: each matrix a cyclic copy of one 64 MB pool of normal draws
from a random offset, a different pool per seed, so the deltas between the models are dense and random).
Then, one after the other (never two multi-GB jobs at once), each under `/usr/bin/time -v`:

    baseline  each tool's imports and nothing else (jaxpeft: jaxpeft.merge.kit_exec and a first jnp op;
              mergekit: mergekit.merge, torch, transformers): the RSS its merge starts from
    jaxpeft   python -m experiments.merge_models --config=ties.yml --out=DIR/out_jaxpeft --noprogress
    mergekit  python -m mergekit.scripts.run_yaml ties.yml DIR/out_mergekit --lazy-unpickle --no-copy-tokenizer

with `ties` (weights 0.5, density 0.5, dtype bfloat16). Printed: wall time, peak RSS, baseline, peak minus
baseline of both tools side by side with the ratios, the machine's load and available memory before each
run, and how many entries of two output tensors differ between the tools (bf16 deltas tie at the density
cut by the thousand; the order among equal magnitudes is unspecified, torch's unstable sort's for mergekit).
Never commit the checkpoints.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.big_model import generate

ROOT = Path(__file__).resolve().parents[1]
BASELINE = {
    "jaxpeft": "import jax, jaxpeft.merge.kit_exec; jax.numpy.zeros(1).block_until_ready()",
    "mergekit": "import mergekit.merge, torch, transformers",
}
CONFIG = """merge_method: ties
base_model: {d}/base
models:
  - model: {d}/ft0
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {d}/ft1
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""


def tool_commands(d: Path, chunk_mb: int) -> dict[str, list[str]]:
    """Both tools' command lines for DIR/ties.yml, writing DIR/out_jaxpeft and DIR/out_mergekit."""
    return {
        "jaxpeft": [sys.executable, "-m", "experiments.merge_models", f"--config={d}/ties.yml",
                    f"--out={d}/out_jaxpeft", "--noprogress", f"--chunk_mb={chunk_mb}"],
        "mergekit": [sys.executable, "-m", "mergekit.scripts.run_yaml", f"{d}/ties.yml", f"{d}/out_mergekit",
                     "--lazy-unpickle", "--no-copy-tokenizer"],
    }


def timed(argv: list[str], log: Path) -> dict:
    """argv under /usr/bin/time -v: {rc, wall_s, peak_rss_gb} (GB = 1e9), output in `log`."""
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    text = log.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) * 1024 / 1e9
    h, m, s = (["0"] + re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)[1].split(":"))[-3:]
    if rc:
        print("\n".join(f"    | {line}" for line in text.splitlines()[-15:]), file=sys.stderr)
    return {"rc": rc, "wall_s": round(int(h) * 3600 + int(m) * 60 + float(s), 1), "peak_rss_gb": round(rss, 3)}


def machine() -> str:
    avail = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    return f"load {os.getloadavg()[0]:.2f}, {avail / 1e6:.1f} GB available"


def read_tensor(folder: Path, name: str) -> np.ndarray:
    """One tensor of a (sharded or single-file) safetensors folder, as stored (bf16 through ml_dtypes)."""
    from safetensors import safe_open

    importlib.import_module("ml_dtypes")  # registers bf16 for safetensors' numpy reader
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] if (
        folder / "model.safetensors.index.json").exists() else {name: "model.safetensors"}
    with safe_open(str(folder / index[name]), framework="numpy") as f:
        return f.get_tensor(name)


def compare(a: Path, b: Path, names: list[str]) -> dict:
    """Fraction of entries that differ, and the largest difference in bf16 ulps of the tensor's peak."""
    out = {}
    for name in names:
        x, y = read_tensor(a, name).astype(np.float32), read_tensor(b, name).astype(np.float32)
        ulp = 2.0 ** (np.floor(np.log2(np.abs(x).max())) - 7)
        out[name] = {"differ": round(float((x != y).mean()), 4), "max_ulps": float(np.abs(x - y).max() / ulp)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/merge_bench"))
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--shard_gb", type=float, default=2.0)
    p.add_argument("--tools", default="jaxpeft,mergekit")
    p.add_argument("--chunk_mb", type=int, default=64)
    p.add_argument("--cleanup", action="store_true", help="delete the checkpoints and outputs at the end")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("base", "ft0", "ft1")):
        if not (d / name / "config.json").exists():
            info = generate(d / name, args.layers, args.shard_gb, seed, tokenizer=False, vocab=args.vocab, fast=True,
                            hidden=args.hidden, intermediate=args.intermediate, heads=32, kv_heads=8)
            print(f"generated {d / name}: {info}", file=sys.stderr, flush=True)
    (d / "ties.yml").write_text(CONFIG.format(d=d))
    commands = tool_commands(d, args.chunk_mb)
    results = {}
    for tool in filter(None, args.tools.split(",")):
        shutil.rmtree(d / f"out_{tool}", ignore_errors=True)
        before = machine()
        base = timed([sys.executable, "-c", BASELINE[tool]], d / f"{tool}_baseline.log")
        run = timed(commands[tool], d / f"{tool}.log")
        results[tool] = {**run, "baseline_gb": base["peak_rss_gb"],
                         "above_baseline_gb": round(run["peak_rss_gb"] - base["peak_rss_gb"], 3),
                         "machine_before": before, "machine_after": machine(), "command": " ".join(commands[tool])}
        print(f"{tool}: {results[tool]}", file=sys.stderr, flush=True)
    print("\n| tool | wall | peak RSS | after imports | peak - baseline | load / available before |\n|---|---|---|---|---|---|")
    for tool, r in results.items():
        print(f"| {tool} | {r['wall_s'] // 60:.0f} min {r['wall_s'] % 60:.0f} s | {r['peak_rss_gb']:.2f} GB | "
              f"{r['baseline_gb']:.2f} GB | {r['above_baseline_gb']:.2f} GB | {r['machine_before']} |")
    if len(results) == 2 and all(r["rc"] == 0 for r in results.values()):
        jp, mk = results["jaxpeft"], results["mergekit"]
        results["ratio"] = {"wall": round(jp["wall_s"] / mk["wall_s"], 3),
                            "peak_rss": round(jp["peak_rss_gb"] / mk["peak_rss_gb"], 3)}
        print(f"\njaxpeft / mergekit: wall x{results['ratio']['wall']}, peak RSS x{results['ratio']['peak_rss']}")
        results["outputs"] = compare(d / "out_mergekit", d / "out_jaxpeft",
                                     ["model.embed_tokens.weight",
                                      f"model.layers.{min(3, args.layers - 1)}.self_attn.q_proj.weight"])
        print(f"outputs: {results['outputs']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.cleanup:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
