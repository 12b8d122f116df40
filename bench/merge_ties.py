"""Where jaxpeft's and mergekit's `ties` outputs differ, and why: ties at the density cut (issue 18).

    python -m bench.merge_ties --dir=/tmp/merge_ties            # tied bf16 deltas: outputs differ, all at ties
    python -m bench.merge_ties --dir=/tmp/merge_ties --untie    # no tie at any cut: outputs within one bf16 ulp

Three small random Llama-shaped bf16 checkpoints (default 2 layers, hidden 256, MLP 1,024, 32/8 heads,
vocabulary 2,048) from bench.big_model.generate, as bench.merge_models makes its 1.5B ones (independent
weights, so the deltas are as large as the weights, and bf16 deltas share magnitudes by the thousand), merged
by both tools' command lines (bench.merge_models.tool_commands) with bench.merge_models.CONFIG (ties, weights
0.5, density 0.5, bf16). Then, per tensor, `tie_check`: which inputs' entries equal the k-th magnitude, and
whether each tool's output is explained by a keep/drop choice that differs from the forced one only there.
`--untie` first rewrites the fine-tunes so that exactly k entries of each delta reach the k-th magnitude (the
extra tied entries set to the base), so the choice at the cut is unique. Never commit the checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.big_model import generate
from bench.merge_models import CONFIG, ROOT, read_tensor, tool_commands

WEIGHT, DENSITY = 0.5, 0.5  # bench.merge_models.CONFIG's


def _bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even, as torch rounds each bf16 op) -> fp32."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def kth_magnitude(d: np.ndarray, density: float) -> np.ndarray:
    """mergekit's `magnitude` cut: the k-th largest |d| (fp32), k = max(1, int(density * n))."""
    w = np.abs(d.reshape(-1)).astype(np.float32)
    k = max(1, int(density * w.size))
    return np.partition(w, w.size - k)[w.size - k]


def ties_of(base: np.ndarray, ds: list[np.ndarray], keep: tuple[int, ...], weights: list[float]) -> np.ndarray:
    """mergekit's bf16 `ties` of one entry choice: `keep[i]` = input i's delta kept everywhere; each torch op
    rounded to bf16 (weighted deltas, sign sum, masked sum, divisor, quotient, base + delta)."""
    w = [_bf16(np.float32(x)) for x in weights]
    wd = [_bf16(d * k * wi) for d, k, wi in zip(ds, keep, w)]
    majority = np.where(_bf16(sum(wd)) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == majority for x in wd]
    mixed = _bf16(sum(np.where(a, x, 0) for a, x in zip(agree, wd)))
    divisor = _bf16(sum(np.where(a, wi, 0) for a, wi in zip(agree, w)))
    return _bf16(base + _bf16(mixed / np.where(divisor == 0, 1, divisor)))


def tie_check(base, fts, outs: dict[str, np.ndarray], weights: list[float], density: float) -> dict:
    """Per input: d = bf16(ft - base), its k-th magnitude, the entries equal to it (`tied`). An entry's choice
    is forced where |d| != k-th (kept above, dropped below) and free where it ties. `unexplained[tool]`: entries
    that no choice (forced where forced, either where tied) reproduces exactly; `differ_untied`: entries where the
    two outputs differ although no input ties there. Both are 0 iff every difference is a tie-break."""
    base = base.astype(np.float32)
    ds = [_bf16(ft.astype(np.float32) - base) for ft in fts]
    kth = [kth_magnitude(d, density) for d in ds]
    tied = [np.abs(d) == t for d, t in zip(ds, kth)]
    outs = {k: v.astype(np.float32) for k, v in outs.items()}
    explained = {k: np.zeros(base.shape, bool) for k in outs}
    for keep in itertools.product((0, 1), repeat=len(ds)):
        allowed = np.ones(base.shape, bool)
        for k, d, t in zip(keep, ds, kth):
            allowed &= (np.abs(d) >= t) if k else (np.abs(d) <= t)
        cand = ties_of(base, ds, keep, weights)
        for tool, out in outs.items():
            explained[tool] |= allowed & (cand == out)
    a, b = outs.values()
    differ = a != b
    ulp = 2.0 ** (np.floor(np.log2(max(np.abs(a).max(), np.abs(b).max(), 1e-30))) - 7)
    return {"entries": int(base.size), "tied": [int(t.sum()) for t in tied], "differ": int(differ.sum()),
            "differ_untied": int((differ & ~np.logical_or.reduce(tied)).sum()),
            "unexplained": {k: int((~v).sum()) for k, v in explained.items()},
            "max_ulps": float(np.abs(a - b).max() / ulp)}


def untie(d: Path, density: float) -> dict:
    """Rewrites d/ft0 and d/ft1 so that exactly k entries of each bf16 delta reach its k-th magnitude: the
    tied entries past the first k - #(above) in flat order are set to the base (delta 0). Returns how many."""
    from safetensors.numpy import load_file, save_file

    changed = {}
    for ft in ("ft0", "ft1"):
        for shard in sorted((d / ft).glob("*.safetensors")):
            tensors = load_file(str(shard))
            for name, x in tensors.items():
                base = read_tensor(d / "base", name)
                delta = np.abs(_bf16(x.astype(np.float32) - base.astype(np.float32))).reshape(-1)
                t = kth_magnitude(delta, density)
                k = max(1, int(density * delta.size))
                at = np.flatnonzero(delta == t)[k - int((delta > t).sum()):]
                if t > 0 and at.size:
                    flat = x.reshape(-1).copy()
                    flat[at] = base.reshape(-1)[at]
                    tensors[name] = flat.reshape(x.shape)
                    changed[f"{ft}:{name}"] = int(at.size)
            save_file(tensors, str(shard), metadata={"format": "pt"})
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/merge_ties"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--untie", action="store_true", help="make the cut of every delta unique first")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    d = args.dir
    shutil.rmtree(d, ignore_errors=True)
    for seed, name in enumerate(("base", "ft0", "ft1")):
        generate(d / name, args.layers, 2.0, seed, tokenizer=False, vocab=args.vocab, fast=True, hidden=args.hidden,
                 intermediate=args.intermediate, heads=32, kv_heads=8)
    if args.untie:
        changed = untie(d, DENSITY)
        print(f"untied: {sum(changed.values())} entries set to the base in {len(changed)} tensors", file=sys.stderr)
    (d / "ties.yml").write_text(CONFIG.format(d=d))
    for tool, argv in tool_commands(d, 64).items():
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    names = json.loads((d / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    report = {}
    for name in sorted(names):
        outs = {tool: read_tensor(d / f"out_{tool}", name) for tool in ("mergekit", "jaxpeft")}
        report[name] = tie_check(read_tensor(d / "base", name), [read_tensor(d / f, name) for f in ("ft0", "ft1")],
                                 outs, [WEIGHT, WEIGHT], DENSITY)
    total = {k: sum(r[k] for r in report.values()) for k in ("entries", "differ", "differ_untied")}
    total["unexplained"] = {t: sum(r["unexplained"][t] for r in report.values()) for t in ("mergekit", "jaxpeft")}
    total["max_ulps"] = max(r["max_ulps"] for r in report.values())
    for name, r in report.items():
        print(f"{name}: {r}")
    print(f"total: {total}")
    if args.json:
        args.json.write_text(json.dumps({"tensors": report, "total": total}, indent=2) + "\n")


if __name__ == "__main__":
    main()
