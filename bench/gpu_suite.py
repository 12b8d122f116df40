"""One prepared script for a lent GPU (an H200): every GPU check of the project, each section time-boxed.

    python -m bench.gpu_suite --out=$OUT                  # on the device (or: bench/gpu_suite.sh $OUT)
    python -m bench.gpu_suite --out=/tmp/s --dry-run      # the same code path on the CPU, tiny shapes
    python -m bench.gpu_suite --out=$OUT --sections=nf4,train --budget=train=240

Sections, run one after another, each in its own process group killed at its time limit (--budget, seconds;
the defaults add up to 300), each writing `<section>.json` under --out as it finishes, with "status" ok,
"skipped: <reason>", "partial" (killed after writing some results), "timeout" or "error"; one failing never
stops the others. `summary.json` lists them (rewritten after every section). At most 7 files in all.

    tests         `python -m pytest -q -m gpu` (the full output in tests.txt)
    nf4           NF4 matmul: the Pallas kernel vs dequantize-then-matmul (XLA) vs a bf16 matmul, batch 1, 8,
                  128 on 4096 x 4096 and 4096 x 14336: us/call, achieved GB/s and % of HBM peak (4.8 TB/s)
    train         a random Llama-3-8B-shaped bf16 checkpoint written under /tmp (sharded safetensors, as HF
                  writes them; bench/big_model.generate), then LoRA and QLoRA steps (r16, all linear layers,
                  batch 4 x 2048 of random ids, loss on every position) each in its own process: tokens/s,
                  MFU, peak device memory against the planner's figure (jaxpeft.plan.plan_memory)
    attention     dense vs blockwise vs cudnn forward+backward time and compiled memory at 4k-32k, when this
                  checkout has jaxpeft.kernels.attention (skipped otherwise)
    long_context  the longest sequence whose compiled 8B-shape QLoRA step (batch 1, remat) fits the device
                  (jaxpeft.plan.xla.compiled_memory on abstract inputs: compiled, never run)

FLOPs (per step, T = batch x seq tokens, N = the matmul weights: every linear of every layer plus lm_head, the
embedding table excluded; L layers, H query heads, E head dim, S seq):
    model FLOPs        6 N T + 6 L H E S^2 B      (MaxText's convention: 12 L H E S^2 / 2 per row, causal)
    frozen-base FLOPs  4 N T + 6 L H E S^2 B      (what a LoRA / QLoRA step computes: no base weight gradients)
    MFU = model FLOPs / step time / 989e12 (H200 bf16 dense); recomputation under remat is not counted.

Needs jax (with its GPU plugin), flax, optax, numpy, safetensors, ml_dtypes; none of datasets, gguf,
bitsandbytes, tensorboardX (tests/test_gpu_suite.py runs the dry run with them blocked).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # `python bench/gpu_suite.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, str(_REPO))

SECTIONS = ("tests", "nf4", "train", "attention", "long_context")
# 300 s in all; guesses until the suite has run on a device (an 8B compile on the GPU may take a minute).
BUDGET_S = {"tests": 40, "nf4": 35, "train": 150, "attention": 20, "long_context": 55}
PEAK_FLOPS = 989e12  # H200 SXM bf16 dense
PEAK_HBM = 4.8e12  # H200 bytes/s
DRY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CHECKPOINT = Path("/tmp/jaxpeft_gpu_suite/llama-3-8b-random")
LLAMA3_8B = dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
TINY = dict(layers=1, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder ($OUT on the device)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="CPU, tiny shapes, same code path")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {SECTIONS}")
    p.add_argument("--budget", default="", help="per-section seconds, e.g. train=240,nf4=20")
    p.add_argument("--attention", default=None, help="attention implementation for the train and long_context "
                   "sections, passed on only where the model takes one")
    p.add_argument("--batch", type=int, default=None, help="train: rows per step (default 4; dry run 2)")
    p.add_argument("--seq", type=int, default=None, help="train: tokens per row (default 2048; dry run 32)")
    # internal: what a section's process runs
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    # The dry run's limits are 4x: it runs on shared CPUs, where a tiny step's compile alone can take 20 s.
    args.budgets = {k: v * (4 if args.dry_run else 1) for k, v in BUDGET_S.items()}
    for item in filter(None, args.budget.split(",")):
        name, _, value = item.partition("=")
        if name not in SECTIONS or not value.replace(".", "", 1).isdigit():
            p.error(f"--budget: {item!r} is not <section>=<seconds> with a section from {SECTIONS}")
        args.budgets[name] = float(value)
    args.batch = args.batch or (2 if args.dry_run else 4)
    args.seq = args.seq or (32 if args.dry_run else 2048)
    return args


# ----------------------------------------------------------------------------------------------
# Files and processes.


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def run_boxed(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit code or None on timeout, output tail) of `cmd` in its own process group, killed whole at the limit."""
    proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""


def section_cmd(args: argparse.Namespace, section: str, deadline: float, **extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "bench.gpu_suite", f"--out={args.out}", f"--section={section}",
           f"--deadline={deadline}", f"--batch={args.batch}", f"--seq={args.seq}"]
    if args.dry_run:
        cmd.append("--dry-run")
    if args.attention:
        cmd.append(f"--attention={args.attention}")
    return cmd + [f"--{k}={v}" for k, v in extra.items()]


def dtype_name(args: argparse.Namespace) -> str:
    """bf16 on the device; fp32 in the dry run (XLA's CPU backend compiles bf16 steps ~10x slower)."""
    return "float32" if args.dry_run else "bfloat16"


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    limit = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return {"backend": jax.default_backend(), "device": str(d), "kind": d.device_kind, "jax": jax.__version__,
            "bytes_limit": int(limit), "limit_from": "memory_stats" if stats.get("bytes_limit") else "half of RAM"}


def peak_device_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def time_median(fn, reps: int) -> tuple[float, list[float]]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ----------------------------------------------------------------------------------------------
# Sections (each returns its result dict; "status" defaults to ok).


def section_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]
    if args.dry_run:
        cmd.append("tests/test_nf4_matmul.py")  # collecting one file: the dry run checks the plumbing only
    rc, out = run_boxed(cmd, args.deadline - time.time() - 3)
    (Path(args.out) / "tests.txt").write_text(out[-4_000_000:])
    last = [ln for ln in out.splitlines() if ln.strip()][-1:] or [""]
    status = "ok" if rc in (0, 5) else ("timeout" if rc is None else "failed")
    return {"status": status, "rc": rc, "summary": last[0], "command": " ".join(cmd[1:])}


def section_nf4(args) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.nf4_matmul import _time_per_call
    from jaxpeft.quant import nf4_matmul, quantize_kernel

    on_gpu = jax.default_backend() == "gpu"
    shapes = ((4096, 4096), (4096, 14336)) if not args.dry_run else ((256, 512),)
    ms = (1, 8, 128) if not args.dry_run else (1,)
    inner, rounds = (50, 3) if not args.dry_run else (1, 1)  # 18 timings in ~35 s on the device
    rows = []
    for i, o in shapes:
        w32 = jax.random.normal(jax.random.PRNGKey(i + o), (i, o), jnp.float32) * 0.02
        q = jax.block_until_ready(quantize_kernel(w32, blocksize=64))
        w = w32.astype(jnp.bfloat16)
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, i), jnp.float32).astype(jnp.bfloat16)
            act = (m * i + m * o) * 2
            paths = {"bf16 matmul": (lambda x, w: x @ w, w, i * o * 2, False),
                     "dequantize+matmul (xla)": (lambda x, q: nf4_matmul(x, q, dtype="bfloat16",
                                                                         implementation="xla"), q, q.nbytes, True)}
            if on_gpu:  # (its interpret mode on the CPU is tests/test_nf4_matmul.py's; too slow to time here)
                paths["nf4 kernel (pallas)"] = (
                    lambda x, q: nf4_matmul(x, q, dtype="bfloat16", implementation="pallas", interpret=False),
                    q, q.nbytes, False)
            for name, (f, weight, wbytes, codes) in paths.items():
                try:
                    s, n = _time_per_call(f, x, weight, inner, rounds, codes=codes)
                except Exception as e:  # one path failing (e.g. Triton rejecting a shape) is a result
                    rows.append({"I": i, "O": o, "M": m, "path": name, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                gbs = (wbytes + act) / s
                rows.append({"I": i, "O": o, "M": m, "path": name, "us_per_call": s * 1e6, "bytes": wbytes + act,
                             "GB_per_s": gbs / 1e9, "pct_hbm_peak": 100 * gbs / PEAK_HBM, "inner": n})
    return {"status": "ok", "rows": rows, "hbm_peak_bytes_per_s": PEAK_HBM,
            "pallas": "timed" if on_gpu else "skipped: no GPU (its interpret mode is tests/test_nf4_matmul.py's)",
            "goal": "nf4 kernel >= 80% of HBM peak at M=1"}


def _matmul_params(cfg: dict) -> int:
    """N: every linear of every layer plus lm_head (the embedding lookup is no matmul)."""
    d, f, layers, kv = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["kv_heads"] * cfg["hidden"] // cfg["heads"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * f) + cfg["vocab"] * d


def step_flops(cfg: dict, batch: int, seq: int) -> dict:
    n, t = _matmul_params(cfg), batch * seq
    attention = 6 * cfg["layers"] * cfg["heads"] * (cfg["hidden"] // cfg["heads"]) * seq ** 2 * batch
    return {"N": n, "tokens": t, "attention_flops": attention, "model_flops": 6 * n * t + attention,
            "frozen_base_flops": 4 * n * t + attention,
            "formula": "model = 6*N*T + 6*L*H*E*S^2*B; frozen-base = 4*N*T + 6*L*H*E*S^2*B; "
                       "N = all linear weights + lm_head (no embedding), T = B*S"}


def section_train(args) -> dict:
    from bench.big_model import generate

    shape = TINY if args.dry_run else LLAMA3_8B
    folder = Path(tempfile.mkdtemp(prefix="gpu_suite_ckpt_")) / "tiny" if args.dry_run else CHECKPOINT
    out: dict = {"status": "partial", "shape": shape, "checkpoint": str(folder)}
    path = Path(args.out) / "train.json"
    t0 = time.perf_counter()
    if not (folder / "model.safetensors.index.json").exists():
        gen = generate(folder, shape["layers"], 0.0002 if args.dry_run else 5.0, seed=0, tokenizer=False,
                       vocab=shape["vocab"], fast=True, hidden=shape["hidden"], intermediate=shape["intermediate"],
                       heads=shape["heads"], kv_heads=shape["kv_heads"])
        out["generate"] = {**gen, "seconds": time.perf_counter() - t0}
    write_json(path, out)
    for method in ("lora", "qlora"):
        left = args.deadline - time.time() - 2
        if method == "lora":
            left *= 0.5  # leave QLoRA its half
        rc, text = run_boxed(section_cmd(args, "train_one", time.time() + left, method=method,
                                         checkpoint=str(folder)), left)
        lines = [ln for ln in text.splitlines() if ln.startswith("SECTION_RESULT ")]
        out[method] = json.loads(lines[-1][len("SECTION_RESULT "):]) if lines else {
            "status": "timeout" if rc is None else "error", "rc": rc, "tail": text[-3000:]}
        write_json(path, out)
    if args.dry_run:
        shutil.rmtree(folder.parent, ignore_errors=True)
    ok = all(out[m].get("status") == "ok" for m in ("lora", "qlora"))
    out["status"] = "ok" if ok else "partial"
    return out


def train_one(args) -> dict:
    """One LoRA or QLoRA step setting on the generated checkpoint, compiled first (falling back to remat, then
    half the batch, when the compiled step would not fit the device)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxpeft
    from bench.long_context import apply_attention, attention_option
    from jaxpeft.convert.bnb import Bnb4bitConfig
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.plan import PlanConfig, plan_memory, resolve_model
    from jaxpeft.train.loop import TrainConfig, Trainer
    from jaxpeft.train.optim import OptimConfig

    shape = TINY if args.dry_run else LLAMA3_8B
    info = device_info()
    t0 = time.perf_counter()
    quantize = Bnb4bitConfig() if args.method == "qlora" else None
    dtype = dtype_name(args)
    kwargs, how = attention_option(args.attention, jaxpeft.from_pretrained)
    model, params, _ = jaxpeft.from_pretrained(args.checkpoint, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                                               quantize=quantize, load_tokenizer=False, **kwargs)
    if not kwargs:
        _, how = attention_option(args.attention, jaxpeft.from_pretrained, model)
        model = apply_attention(model, args.attention, how)
    load_s = time.perf_counter() - t0
    targets = "q_proj,v_proj" if args.dry_run else "all-linear"  # the dry run: a smaller graph to compile
    lora = get_method("lora")
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets if targets == "all-linear" else tuple(
        targets.split(",")), lora_dropout=0.0)
    params = lora.init(jax.random.PRNGKey(0), params, cfg)
    labels = lora.labels(params, cfg)
    attempts, batch_rows, remat = [], args.batch, False
    rng = np.random.default_rng(0)
    while True:
        ids = rng.integers(3, shape["vocab"], (batch_rows, args.seq)).astype(np.int32)
        batch = {"input_ids": ids, "loss_mask": np.ones_like(ids), "attention_mask": np.ones_like(ids)}
        k = batch_rows * (args.seq - 1)
        trainer = Trainer(model.clone(remat=remat), params, labels,
                          optim_cfg=OptimConfig(lr=1e-4, warmup_steps=0, total_steps=10),
                          train_cfg=TrainConfig(steps=10, batch_size=batch_rows), max_targets=k)
        t1 = time.perf_counter()
        m = trainer.compiled_step(batch).memory_analysis()
        need = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        attempts.append({"batch": batch_rows, "remat": remat, "compiled_bytes": need,
                         "compile_s": time.perf_counter() - t1})
        if need <= 0.95 * info["bytes_limit"] or batch_rows == 1:
            break
        del trainer
        if not remat:
            remat = True
        else:
            batch_rows //= 2
    reps = 1 if args.dry_run else 3
    med, times = time_median(lambda: trainer.train_step(batch)["loss"], reps)
    flops = step_flops(shape, batch_rows, args.seq)
    _, config = resolve_model(args.checkpoint)
    plan = plan_memory(config, PlanConfig(method=args.method, batch_size=batch_rows, seq_len=args.seq, remat=remat,
                                          rank=16, targets=cfg.target_modules, dtype=dtype, param_dtype=dtype,
                                          max_targets=k))
    peak = peak_device_bytes()
    return {"status": "ok", "method": args.method, "device": info, "load_s": load_s, "attempts": attempts,
            "attention": args.attention or "default", "attention_applied": how,
            "batch": batch_rows, "seq": args.seq, "remat": remat, "s_per_step": med, "step_times": times,
            "tokens_per_s": batch_rows * args.seq / med, **flops,
            "mfu_pct": 100 * flops["model_flops"] / med / PEAK_FLOPS,
            "frozen_base_mfu_pct": 100 * flops["frozen_base_flops"] / med / PEAK_FLOPS,
            "peak_device_bytes": peak, "planner_peak_bytes": plan.peak,
            "peak_over_planner": None if not peak else peak / plan.peak,
            "goals": "LoRA >= 40% MFU; QLoRA peak within 10% of the planner"}


def section_attention(args) -> dict:
    import importlib
    import importlib.util
    import inspect

    if importlib.util.find_spec("jaxpeft.kernels.attention") is None:
        return {"status": "skipped: jaxpeft.kernels.attention is not in this checkout (the attention branch is "
                          "not merged)"}
    import jax
    import jax.numpy as jnp

    mod = importlib.import_module("jaxpeft.kernels.attention")
    fn = next((getattr(mod, n) for n in ("attention", "dot_product_attention") if callable(getattr(mod, n, None))),
              None)
    if fn is None or "implementation" not in inspect.signature(fn).parameters:
        return {"status": "skipped: jaxpeft.kernels.attention has no attention(..., implementation=...) entry "
                          f"point (found {sorted(n for n in dir(mod) if not n.startswith('_'))})"}
    lengths = (4096, 8192, 16384, 32768) if not args.dry_run else (64, 128)
    heads, kv, e = (32, 8, 128) if not args.dry_run else (4, 2, 16)
    info, rows = device_info(), []
    for s in lengths:
        key = jax.random.PRNGKey(s)
        q = jax.random.normal(key, (1, s, heads, e), jnp.bfloat16)
        kk = jax.random.normal(key, (1, s, kv, e), jnp.bfloat16)
        for impl in ("dense", "blockwise", "cudnn"):
            if time.time() > args.deadline - 5:
                rows.append({"seq": s, "implementation": impl, "skipped": "section time limit"})
                continue
            try:
                def loss(q, k, v, impl=impl):
                    return fn(q, k, v, implementation=impl).astype(jnp.float32).sum()
                grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                compiled = grad.lower(q, kk, kk).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes
                if temp > 0.9 * info["bytes_limit"]:
                    rows.append({"seq": s, "implementation": impl, "temp_bytes": temp, "skipped": "does not fit"})
                    continue
                med, _ = time_median(lambda: jax.block_until_ready(compiled(q, kk, kk)), 3)
                rows.append({"seq": s, "implementation": impl, "temp_bytes": temp, "fwd_bwd_s": med})
            except Exception as ex:  # an implementation refusing a shape (supports() says why) is a result
                rows.append({"seq": s, "implementation": impl, "error": f"{type(ex).__name__}: {ex}"[:300]})
    return {"status": "ok", "rows": rows, "shape": {"heads": heads, "kv_heads": kv, "head_dim": e}}


def section_long_context(args) -> dict:
    import dataclasses

    from jaxpeft.models.config import LlamaConfig
    from jaxpeft.plan import PRESETS, PlanConfig
    from jaxpeft.plan.xla import compiled_memory

    info = device_info()
    if args.dry_run:
        t = TINY
        config = LlamaConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                             num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                             num_key_value_heads=t["kv_heads"], head_dim=t["hidden"] // t["heads"])
        seq, limit = 64, 64  # one compile: the loop's code path, not its length
    else:
        config, seq, limit = PRESETS["llama-3-8b"], 8192, 2 ** 21
    extra = {}
    if args.attention and "attention" in {f.name for f in dataclasses.fields(PlanConfig)}:
        extra["attention"] = args.attention
    rows, longest, path = [], None, Path(args.out) / "long_context.json"
    while seq <= limit:
        last = rows[-1]["compile_s"] if rows else 0.0
        if time.time() + 1.5 * last > args.deadline - 3:
            rows.append({"seq": seq, "skipped": "section time limit"})
            break
        plan = PlanConfig(method="qlora", batch_size=1, seq_len=seq, remat=True, rank=16, dtype=dtype_name(args),
                          param_dtype=dtype_name(args), max_targets=seq // 2, **extra)
        m = compiled_memory(config, plan)
        fits = m.total <= info["bytes_limit"]
        rows.append({"seq": seq, "compiled_bytes": m.total, "temp": m.temp, "argument": m.argument, "fits": fits,
                     "compile_s": m.compile_seconds})
        write_json(path, {"status": "partial", "rows": rows, "device": info})
        if not fits:
            break
        longest = seq
        seq *= 2
    return {"status": "ok", "rows": rows, "longest_fitting_seq": longest, "device": info,
            "attention": extra.get("attention", "the model's default (no attention option in PlanConfig)"),
            "model": "llama-3-8b shape, QLoRA nf4 all-linear, LoRA r16 q,k,v,o, batch 1, remat, loss on half"}


SECTION_FNS = {"tests": section_tests, "nf4": section_nf4, "train": section_train, "attention": section_attention,
               "long_context": section_long_context}


# ----------------------------------------------------------------------------------------------
# Parent.


def run_section(args: argparse.Namespace) -> None:
    """A section's process: its result (or its error) to <out>/<section>.json; train_one to stdout."""
    if args.section == "train_one":
        print("SECTION_RESULT " + json.dumps(train_one(args), default=str), flush=True)
        return
    path = Path(args.out) / f"{args.section}.json"
    t0 = time.perf_counter()
    try:
        result = SECTION_FNS[args.section](args)
    except Exception as e:  # the section's own failure is its result; the suite carries on
        import traceback

        result = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = time.perf_counter() - t0
    write_json(path, result)


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.section:
        run_section(args)
        return 0
    # The dry run checks the code path, not speed: XLA's cheapest CPU code generation halves its compile times.
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + DRY_XLA_FLAGS).strip()
           } if args.dry_run else {}
    summary = {"dry_run": args.dry_run, "budgets_s": args.budgets, "sections": {}}
    start = time.perf_counter()
    for section in args.sections:
        budget = args.budgets[section]
        path = Path(args.out) / f"{section}.json"
        t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        rc, text = run_boxed(section_cmd(args, section, time.time() + budget), budget, env)
        if rc is None or not path.exists() or json.loads(path.read_text()).get("status") == "partial":
            prior = json.loads(path.read_text()) if path.exists() else {}
            write_json(path, {**prior, "status": "timeout" if rc is None else prior.get("status", "error"),
                              "rc": rc, "tail": text[-3000:]})
        status = json.loads(path.read_text()).get("status")
        summary["sections"][section] = {"status": status, "seconds": time.perf_counter() - t0, "budget_s": budget,
                                        "user_cpu_s": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - cpu0}
        summary["total_s"] = time.perf_counter() - start
        write_json(Path(args.out) / "summary.json", summary)
        print(f"{section}: {status} ({time.perf_counter() - t0:.0f} s of {budget:.0f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
