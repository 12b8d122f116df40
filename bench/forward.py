"""Forward-pass throughput: jaxpeft (jax.jit, CPU) against transformers (torch, fp32, no_grad).

Runs each side in its own subprocess on the same random token ids (seeded numpy, written once to a
temporary .npy by the parent), then prints a table, the jaxpeft/transformers ratio and a logits
agreement check. The model is the default SmolLM2-135M-Instruct (the cached fp32 HF folder that
`jaxpeft.convert.default_model.cached_hf_folder()` returns), so both sides read the same weights.

    python -m bench.forward                          # batch 4 x 128, 10 timed reps
    python bench/forward.py --batch 8 --seq 256 --reps 20
    python -m bench.forward --xla_flags=--xla_cpu_use_onednn=true   # also a JAX run with these XLA_FLAGS
    python -m bench.forward --head last              # logits of the last position only (both sides)
    python -m bench.forward --head none              # final hidden states only, no vocab projection

Children print one JSON line each (`--side=jax` / `--side=torch` are internal but can be run by hand).
Throughput is batch*seq / median step time; the min step time is reported too. The machine may be
shared (other jobs running), so repeat with --rounds to interleave several runs of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python bench/forward.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, _REPO)

HEADS = ("full", "last", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per side (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (compiling) one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
    p.add_argument("--head", default="full", choices=HEADS,
                   help="full: logits for every position (B,S,V); last: logits of the last position only; "
                        "none: final hidden states, no vocab projection")
    p.add_argument("--xla_flags", default=None,
                   help="if given, also run the JAX side with XLA_FLAGS set to this (e.g. "
                        "--xla_cpu_use_onednn=true) and report both JAX numbers")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch.set_num_threads in the torch child (default: leave torch's default alone)")
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the logits checksum")
    p.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2-135M folder)")
    p.add_argument("--json", default=None, help="also write all child results to this file")
    # internal: what a child runs
    p.add_argument("--side", default=None, choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_folder(name: str | None) -> str:
    if name:
        return name
    from jaxpeft.convert import default_model

    return str(default_model.cached_hf_folder())


def _time_steps(step, reps: int, warmup: int) -> tuple[object, float, list[float]]:
    """Calls `step()` once (compile), `warmup` more times, then `reps` timed times; returns the last output."""
    t0 = time.perf_counter()
    out = step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        out = step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
    return out, first, times


def _summary(side: str, out_np: np.ndarray, ids: np.ndarray, first: float, times: list[float], **extra) -> dict:
    med = statistics.median(times)
    b, s = ids.shape
    last = out_np[0, -1]
    return {
        "side": side,
        "tokens_per_s": b * s / med,
        "tokens_per_s_best": b * s / min(times),
        "median_s": med,
        "min_s": min(times),
        "first_call_s": first,
        "reps": len(times),
        "out_shape": list(out_np.shape),
        "mean": float(out_np.astype(np.float64).mean()),
        "last_sum": float(last.astype(np.float64).sum()),
        "ids_sum": int(ids.sum()),
        **extra,
    }


def run_jax(args: argparse.Namespace, ids: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxpeft
    from jaxpeft.models.llama import LlamaForCausalLM

    folder = model_folder(args.model)
    model, params, _ = jaxpeft.from_pretrained(folder, load_tokenizer=False)
    params = jax.device_put(params)

    if args.head == "full":
        def fwd(p, x):
            return model.apply({"params": p}, x)
    elif args.head == "none":
        def fwd(p, x):
            return model.apply({"params": p}, x, return_hidden=True)
    else:
        def fwd(p, x):
            h = model.apply({"params": p}, x, return_hidden=True)
            return model.apply({"params": p}, h[:, -1:], method=LlamaForCausalLM.head)

    f = jax.jit(fwd)
    x = jnp.asarray(ids, jnp.int32)
    out, first, times = _time_steps(lambda: f(params, x).block_until_ready(), args.reps, args.warmup)
    out_np = np.asarray(out)
    if args.dump:
        np.save(args.dump, out_np[:, -1])
    return _summary("jax", out_np, ids, first, times, jax_version=jax.__version__,
                    backend=jax.default_backend(), devices=len(jax.devices()),
                    xla_flags=os.environ.get("XLA_FLAGS", ""), cpu_count=os.cpu_count())


def run_torch(args: argparse.Namespace, ids: np.ndarray) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    folder = model_folder(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=args.attn)
    model.eval()
    x = torch.from_numpy(ids.astype(np.int64))

    def step():
        with torch.no_grad():
            if args.head == "full":
                return model(x).logits
            if args.head == "last":
                return model(x, logits_to_keep=1).logits
            return model.model(x).last_hidden_state

    out, first, times = _time_steps(step, args.reps, args.warmup)
    out_np = out.float().numpy()
    if args.dump:
        np.save(args.dump, out_np[:, -1])
    return _summary("torch", out_np, ids, first, times, torch_version=torch.__version__,
                    transformers_version=transformers.__version__, threads=torch.get_num_threads(),
                    interop_threads=torch.get_num_interop_threads(),
                    attn_implementation=model.config._attn_implementation, cpu_count=os.cpu_count())


def child_main(args: argparse.Namespace) -> None:
    ids = np.load(args.ids)
    result = run_jax(args, ids) if args.side == "jax" else run_torch(args, ids)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _spawn(side: str, args: argparse.Namespace, ids_path: str, dump: str, xla_flags: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--ids={ids_path}", f"--dump={dump}",
           f"--reps={args.reps}", f"--warmup={args.warmup}", f"--attn={args.attn}", f"--head={args.head}"]
    if args.model:
        cmd.append(f"--model={args.model}")
    if args.torch_threads:
        cmd.append(f"--torch_threads={args.torch_threads}")
    env = dict(os.environ)
    if xla_flags is not None:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    return run_child(cmd, side, env=env)


def run_child(cmd: list[str], side: str, *, marker: str = "BENCH_RESULT", env: dict | None = None) -> dict:
    """Runs a bench side's subprocess and returns the JSON of its last `marker` line; a failed child (or one
    that printed no result) stops the bench with its output's tail."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {side} child failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1][len(marker) + 1:])


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def parent_main(args: argparse.Namespace) -> int:
    folder = model_folder(args.model)
    with open(os.path.join(folder, "config.json")) as fh:
        vocab = json.load(fh)["vocab_size"]
    ids = np.random.default_rng(args.seed).integers(0, vocab, size=(args.batch, args.seq), dtype=np.int64)
    variants = [("jaxpeft", "jax", None)]
    if args.xla_flags:
        variants.append((f"jaxpeft [{args.xla_flags}]", "jax", args.xla_flags))
    variants.append(("transformers", "torch", None))

    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    w = max(len(name) for name, _, _ in variants) + 2
    load_before = os.getloadavg()
    dumps: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.npy")
        np.save(ids_path, ids)
        for r in range(args.rounds):
            for i, (name, side, flags) in enumerate(variants):
                dump = os.path.join(tmp, f"{i}.npy")
                res = _spawn(side, args, ids_path, dump, flags)
                res["round"] = r
                results[name].append(res)
                dumps[name] = np.load(dump)
                print(f"  round {r} {name:<{w}s} {res['tokens_per_s']:10.1f} tok/s  "
                      f"(median {res['median_s'] * 1e3:.1f} ms, min {res['min_s'] * 1e3:.1f} ms)", flush=True)

    torch_res = results["transformers"][0]
    jax_res = results["jaxpeft"][0]
    load_after = os.getloadavg()
    print()
    print(f"model {folder}")
    print(f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, {args.reps} timed reps "
          f"after {1 + args.warmup} warm-up calls, head={args.head}, fp32, CPU count {os.cpu_count()}")
    print(f"load average (1/5/15 min) before {'/'.join(f'{v:.2f}' for v in load_before)}, after "
          f"{'/'.join(f'{v:.2f}' for v in load_after)}: above ~0.5 means other processes shared the CPUs")
    print(f"torch {torch_res['torch_version']} / transformers {torch_res['transformers_version']}: "
          f"attn_implementation={torch_res['attn_implementation']}, torch.get_num_threads()={torch_res['threads']}"
          f" (interop {torch_res['interop_threads']}); jax {jax_res['jax_version']} on {jax_res['backend']}")
    print()
    header = f"{'side':<{w}s} {'tok/s (median)':>14s} {'tok/s (best)':>13s} {'median ms':>10s} {'min ms':>9s} " \
             f"{'1st call s':>10s} {'ratio':>7s}"
    print(header)
    print("-" * len(header))
    # Over rounds: the best median (the run least disturbed by other load) and the overall best step.
    best = {name: min(r["median_s"] for r in runs) for name, runs in results.items()}
    tokens = args.batch * args.seq
    for name, _, _ in variants:
        runs = results[name]
        med, mn = best[name], min(r["min_s"] for r in runs)
        first = statistics.median(r["first_call_s"] for r in runs)
        print(f"{name:<{w}s} {tokens / med:14.1f} {tokens / mn:13.1f} {med * 1e3:10.1f} {mn * 1e3:9.1f} "
              f"{first:10.2f} {best['transformers'] / med:7.3f}")
    for name, _, _ in variants[:-1]:
        print(f"ratio {name} / transformers (tokens/s, best median over {args.rounds} round(s)): "
              f"{best['transformers'] / best[name]:.3f}")

    print()
    ok = True
    t_mean, t_last = torch_res["mean"], torch_res["last_sum"]
    what = {"full": "logits", "last": "last-position logits", "none": "hidden states"}[args.head]
    for name, _, _ in variants[:-1]:
        j = results[name][0]
        rel_mean, rel_last = _rel(j["mean"], t_mean), _rel(j["last_sum"], t_last)
        max_diff = float(np.max(np.abs(dumps[name] - dumps["transformers"])))
        scale = float(np.max(np.abs(dumps["transformers"])))
        good = j["ids_sum"] == torch_res["ids_sum"] and rel_mean <= args.rtol
        ok &= good
        print(f"check {name}: mean of {what} {j['mean']:.6f} vs {t_mean:.6f} (rel {rel_mean:.2e}); "
              f"row-0 last-position sum {j['last_sum']:.4f} vs {t_last:.4f} (rel {rel_last:.2e}); "
              f"max |diff| at last positions {max_diff:.2e} (max |value| {scale:.1f}) -> "
              f"{'OK' if good else 'MISMATCH'} (rtol {args.rtol:g})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
