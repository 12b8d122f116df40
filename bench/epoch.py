"""One epoch of LoRA on real SFT records: the jaxpeft CLI with its defaults (packing) against PEFT + torch with
dynamic padding, on the same training examples, in the same run.

    python -m bench.epoch                                   # 256 code_alpaca records, --seq_len=512 --batch_size=4
    python -m bench.epoch --records=64 --seq=256            # smaller

Both sides: SmolLM2-135M-Instruct (the cached HF folder), LoRA r16 alpha 32 on q,k,v,o, fp32, AdamW, the same
first --records records of --data with the CLI's chat template and split (`prepare_data`, no held-out
evaluation). The one thing that differs is what each side does by default with the rows:

- jaxpeft: `python -m experiments.lora --dataset=FILE --seq_len=S --batch_size=B --epochs=1 --eval_examples=0`
  as a user runs it (packing on: --batch_size packed rows of S tokens), in a subprocess; each step is timed
  from outside by the arrival of its record in metrics.jsonl (written as the step ends), as the issue timed it.
- PEFT: the same examples in the CLI's unpacked batches of B (`pack=False`: the same order), each cut to its
  longest row (right padding: what transformers' `DataCollatorWithPadding` gives), through
  `bench.train_step`'s torch child (the PEFT model, AdamW, clipping as there).

The first step of each side (jaxpeft: compiling) is left out; the epoch's time is the timed steps' time
scaled to the epoch's real tokens (each side's first step holds a different share of the epoch), printed with
the raw sum. Real (non-pad) tokens/s on both sides; the ratio jaxpeft / PEFT of the epoch time (issue 17's
target: at most 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench import train_step as ts  # noqa: E402
from bench.forward import model_folder  # noqa: E402

DEFAULT_DATA = os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "code_alpaca_2k.json"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="a JSON list / JSONL file of SFT records")
    p.add_argument("--records", type=int, default=256, help="the first N records of --data")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2-135M folder)")
    p.add_argument("--keep", default=None, help="keep the jaxpeft run folder here (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write both sides' figures to this file")
    return p.parse_args(argv)


def _records(path: str, n: int) -> list[dict]:
    with open(path) as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return records[:n]


def _prepared(args: argparse.Namespace, folder: str, path: str, pack: bool):
    from transformers import AutoTokenizer

    from jaxpeft.train.run_config import RunConfig
    from jaxpeft.train.run_data import prepare_data

    cfg = RunConfig(out="", dataset=path, batch_size=args.batch, seq_len=args.seq, pack=pack, eval_examples=0,
                    epochs=1)
    return prepare_data(cfg, AutoTokenizer.from_pretrained(folder))


def _epoch_batches(data) -> list[dict[str, np.ndarray]]:
    return [next(data.batcher) for _ in range(data.steps)]


def run_peft(args: argparse.Namespace, folder: str, path: str, tmp: str) -> dict:
    data = _prepared(args, folder, path, pack=False)
    batches = _epoch_batches(data)
    child = ts.parse_args([f"--data=file:{path}", f"--batch={args.batch}", f"--seq={args.seq}", f"--lr={args.lr}",
                           f"--steps={len(batches) - 1}", "--warmup=0", f"--file_batches={len(batches)}",
                           f"--model={folder}"])
    inputs = ts.stack_inputs(child, batches, 0, ts._lora_in_dims(folder), dynamic=True)
    npz = os.path.join(tmp, "peft_inputs.npz")
    np.savez(npz, **inputs)
    res = ts._spawn("torch", child, npz)
    res["epoch_steps"] = len(batches)
    res["epoch_real_tokens"] = int(sum(int(b["attention_mask"].sum()) for b in batches))
    res["timed_s"] = res["real_tokens_timed"] / res["real_tokens_per_s"]
    res["widths"] = [int(b["attention_mask"].sum(1).max()) for b in batches]
    return res


def run_jaxpeft(args: argparse.Namespace, folder: str, path: str, tmp: str) -> dict:
    data = _prepared(args, folder, path, pack=True)
    batches = _epoch_batches(data)
    real = [int(b["attention_mask"].sum()) for b in batches]
    out = args.keep or os.path.join(tmp, "run")
    cmd = [sys.executable, "-m", "experiments.lora", f"--model={folder}", f"--dataset={path}",
           f"--seq_len={args.seq}", f"--batch_size={args.batch}", "--epochs=1", "--eval_examples=0",
           "--targets=q_proj,k_proj,v_proj,o_proj", "--rank=16", "--alpha=32", f"--lr={args.lr}",
           f"--out={out}", "--overwrite", "--noprogress"]
    metrics = os.path.join(out, "metrics.jsonl")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    arrivals: dict[int, float] = {}
    seen = 0
    while proc.poll() is None:
        time.sleep(0.02)
        if os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.read().splitlines()
            for line in lines[seen:]:
                if not line.endswith("}"):
                    break  # a record still being written
                rec = json.loads(line)
                seen += 1
                if "loss" in rec and "step" in rec:
                    arrivals.setdefault(int(rec["step"]), time.perf_counter())
    log = proc.stdout.read()
    if proc.returncode != 0:
        sys.stderr.write(log[-4000:])
        raise SystemExit(f"the jaxpeft run failed (exit {proc.returncode}): {' '.join(cmd)}")
    steps = sorted(arrivals)
    if len(steps) < 2 or steps != list(range(1, len(steps) + 1)):
        raise SystemExit(f"expected one metrics record per step, got steps {steps}")
    times = [arrivals[s] - arrivals[s - 1] for s in steps[1:]]
    timed_real = sum(real[1:len(steps)])
    return {"side": "jax", "epoch_steps": len(steps), "timed_s": sum(times), "median_s": float(np.median(times)),
            "first_step_s": arrivals[1] - t0, "real_tokens_timed": timed_real,
            "real_tokens_per_s": timed_real / sum(times), "epoch_real_tokens": int(sum(real)),
            "rows_real_fraction": float(np.mean([b["attention_mask"].mean() for b in batches])),
            "wall_s": time.perf_counter() - t0, "widths": [int(b["input_ids"].shape[1]) for b in batches]}


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = model_folder(args.model)
    with tempfile.TemporaryDirectory(prefix="jaxpeft-epoch-") as tmp:
        path = os.path.join(tmp, "records.json")
        with open(path, "w") as f:
            json.dump(_records(args.data, args.records), f)
        load0 = os.getloadavg()
        peft_res = run_peft(args, folder, path, tmp)
        jax_res = run_jaxpeft(args, folder, path, tmp)
        load1 = os.getloadavg()
    for r in (peft_res, jax_res):
        r["epoch_s"] = r["timed_s"] * r["epoch_real_tokens"] / r["real_tokens_timed"]
    print(f"data: the first {args.records} records of {args.data}, --seq_len={args.seq} --batch_size={args.batch}, "
          f"LoRA r16 q,k,v,o fp32; load average before {load0[0]:.2f}, after {load1[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"PEFT (dynamic padding, {peft_res['epoch_steps']} steps of {args.batch}, widths {peft_res['widths']})")
    print(f"jaxpeft (the CLI's defaults: packing, {jax_res['epoch_steps']} steps of {args.batch} rows, widths "
          f"{jax_res['widths']}; real tokens {jax_res['rows_real_fraction']:.0%} of the slots)")
    print(f"{'side':8s} {'steps':>5s} {'timed s':>8s} {'median s':>8s} {'real tok/s':>10s} {'epoch tokens':>12s} "
          f"{'epoch s':>8s} {'first s':>8s}")
    for name, r in (("jaxpeft", jax_res), ("PEFT", peft_res)):
        print(f"{name:8s} {r['epoch_steps']:5d} {r['timed_s']:8.1f} {r['median_s']:8.2f} {r['real_tokens_per_s']:10.1f} "
              f"{r['epoch_real_tokens']:12d} {r['epoch_s']:8.1f} {r['first_step_s']:8.1f}")
    ratio = jax_res["epoch_s"] / peft_res["epoch_s"]
    print(f"jaxpeft / PEFT: epoch time (first step left out, scaled to the epoch's real tokens) x{ratio:.2f} "
          f"(target: at most 0.5); real tokens/s x{jax_res['real_tokens_per_s'] / peft_res['real_tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jaxpeft": jax_res, "peft": {k: v for k, v in peft_res.items() if k != "losses"},
                       "ratio": ratio, "load": [load0, load1]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
