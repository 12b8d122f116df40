"""Long sequences: how far a LoRA step on SmolLM2-135M goes, jaxpeft against PEFT + torch, side by side.

    python -m bench.long_context                                   # 1k, 2k, 4k, ... while the peak fits 20 GB
    python -m bench.long_context --lengths=1024,2048 --max_gb=6    # a shared machine
    python -m bench.long_context --compile_only                    # jaxpeft's compiled step, 1k .. 64k, no run
    python -m bench.long_context --sides=torch_ckpt --lengths=4096 # one side alone

SmolLM2-135M (the cached fp32 HF folder both sides read, `jaxpeft.convert.default_model`), LoRA r=16 /
alpha 32 on q_proj,k_proj,v_proj,o_proj, no dropout, batch 1, random token ids, the loss on the second half of
the row (the target-only head of jaxpeft; torch keeps the same positions' logits through `logits_to_keep`),
fp32, AdamW. Every (side, length) runs in its own subprocess, so each peak RSS is that run's alone.

Never into the OOM killer: the jaxpeft child compiles the step first and runs it only when the compiled figure
(temporaries + arguments, `memory_analysis()`) is at most --max_gb; a length that does not fit ends that side's
doubling. A torch side runs a length only when 4x its previous length's measured peak is at most --max_gb (a
side's first length always runs: keep --lengths' first entry small). Lengths past SmolLM2's
max_position_embeddings (8192) are memory measurements: neither side refuses them (RoPE is computed from the
positions), and their losses mean nothing.

Sides: jax (jaxpeft Trainer; `--attention` passed on when this checkout's model takes one, `--remat`),
torch_ckpt (transformers attn_implementation="sdpa" + PEFT, gradient checkpointing, non-reentrant) and torch
(the same without checkpointing). Figures per length: compiled GB (jax), peak RSS GB over the child minus the
RSS after imports ("peak"), the RSS after loading ("base"), s/step and tokens/s (median of --steps timed steps
after one untimed first step); then the longest length each side reached and the ratios to torch_ckpt.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python bench/long_context.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, _REPO)

from bench.forward import model_folder  # noqa: E402
from bench.train_step import _proc_status_mb, _reset_peak  # noqa: E402

SIDES = ("jax", "torch_ckpt", "torch")
DEFAULT_LENGTHS = "1024,2048,4096,8192,16384,32768,65536"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma list of sequence lengths, in order")
    p.add_argument("--max_gb", type=float, default=20.0, help="largest predicted peak a run may have (GB)")
    p.add_argument("--attention", default=None,
                   help="jaxpeft attention implementation (auto|dense|blockwise|cudnn), passed on only when this "
                        "checkout's model accepts one; otherwise only dense/auto/unset are allowed")
    p.add_argument("--remat", action="store_true", help="jaxpeft: recompute layer activations in the backward")
    p.add_argument("--loss_chunk", type=int, default=None, help="jaxpeft: targets per loss chunk (default auto)")
    p.add_argument("--steps", type=int, default=1,
                   help="timed steps per run, after one untimed first step (0: time the first step itself, for "
                        "lengths where one step takes many minutes on a CPU)")
    p.add_argument("--compile_only", action="store_true",
                   help="jaxpeft only: compile each length (default lengths up to 64k) and report, run nothing")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list from {SIDES}")
    p.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2-135M folder)")
    p.add_argument("--child_timeout", type=float, default=3600.0, help="seconds before a child is killed")
    p.add_argument("--json", default=None, help="write every child's result to this file")
    # internal: what a child runs
    p.add_argument("--child", default=None, choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps={args.steps}: give 0 (time the first step) or more timed steps")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = sorted(set(sides) - set(SIDES))
    if bad:
        p.error(f"--sides: unknown {bad}; choose from {', '.join(SIDES)}")
    args.sides = ["jax"] if args.compile_only else sides
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths={args.lengths!r}: expected comma-separated integers, e.g. 1024,2048")
    if any(n < 4 for n in args.lengths):
        p.error("--lengths: every length must be at least 4")
    return args


# ----------------------------------------------------------------------------------------------
# The jaxpeft attention option, found by feature detection (it may not exist in this checkout).


def attention_option(value: str | None, loader, model=None) -> tuple[dict, str]:
    """(kwargs for `loader`, how the option is applied): `loader`'s own `attention` parameter, else a field
    `attention` of the model module or of its config (applied by `apply_attention`). Raises SystemExit for an
    implementation other than auto/dense when nothing takes one."""
    if value is None:
        return {}, "default"
    if "attention" in inspect.signature(loader).parameters:
        return {"attention": value}, "loader"
    if model is not None:
        if "attention" in {f.name for f in dataclasses.fields(model)}:
            return {}, "model"
        if dataclasses.is_dataclass(model.config) and "attention" in {
                f.name for f in dataclasses.fields(model.config)}:
            return {}, "config"
    if model is None:  # ask again with the loaded model
        return {}, "undecided"
    if value in ("auto", "dense"):
        return {}, "dense (this checkout has no attention option)"
    raise SystemExit(f"--attention={value}: this checkout's model has no attention option (the blockwise "
                     "attention is not merged here); use --attention=dense, auto or leave it out")


def apply_attention(model, value: str | None, how: str):
    if how == "model":
        return model.clone(attention=value)
    if how == "config":
        return model.clone(config=dataclasses.replace(model.config, attention=value))
    return model


# ----------------------------------------------------------------------------------------------
# Children.


def make_batch(seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One row of random ids; the targets are the second half (positions seq//2 .. seq-1)."""
    ids = np.random.default_rng(seed).integers(3, vocab, (1, seq)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, seq // 2:] = 1
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": np.ones_like(ids)}


def _timed_steps(step, steps: int) -> tuple[float, list[float], list[float]]:
    """(first step s, timed step times, every loss): one untimed step, then `steps` timed ones; with `steps`
    0 the first step is the timed one (jaxpeft compiled ahead, so it holds no compile time)."""
    t0 = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return first, times or [first], losses


def _gb(mib: float) -> float:
    return mib * 2**20 / GB


def _finish(side: str, seq: int, mem0: dict, base: dict, first: float, times: list[float], losses: list[float],
            cpu0: float, **extra) -> dict:
    mem = _proc_status_mb()
    med = statistics.median(times)
    return {"side": side, "seq": seq, "ran": True, "first_step_s": first, "s_per_step": med,
            "tokens_per_s": seq / med, "losses": losses, "rss_after_imports_gb": _gb(mem0["VmRSS"]),
            "base_gb": _gb(base["VmRSS"] - mem0["VmRSS"]), "peak_gb": _gb(mem["VmHWM"] - mem0["VmRSS"]),
            "user_cpu_s": time.process_time() - cpu0, "load": os.getloadavg(), **extra}


def run_jax(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxpeft
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train.loop import TrainConfig, Trainer
    from jaxpeft.train.optim import OptimConfig
    from jaxpeft.train.runners import release_freed_memory

    cpu0, mem0 = time.process_time(), _proc_status_mb()
    seq = args.seq
    kwargs, how = attention_option(args.attention, jaxpeft.from_pretrained)
    model, params, _ = jaxpeft.from_pretrained(args.model, dtype=jnp.float32, remat=args.remat,
                                               load_tokenizer=False, **kwargs)
    if not kwargs:
        _, how = attention_option(args.attention, jaxpeft.from_pretrained, model)
        model = apply_attention(model, args.attention, how)
    limit = model.config.max_position_embeddings
    lora, cfg = get_method("lora"), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    params = lora.init(jax.random.PRNGKey(0), params, cfg)
    batch = make_batch(seq, model.config.vocab_size)
    k = max(8, -(-int(batch["loss_mask"][:, 1:].sum()) // 8) * 8)
    trainer = Trainer(model, params, lora.labels(params, cfg),
                      optim_cfg=OptimConfig(lr=1e-4, warmup_steps=0, total_steps=1 + args.steps),
                      train_cfg=TrainConfig(steps=1 + args.steps, batch_size=1, loss_chunk=args.loss_chunk),
                      max_targets=k)
    del params
    base = _proc_status_mb()
    t0 = time.perf_counter()
    m = trainer.compiled_step(batch).memory_analysis()
    compiled = {"compile_s": time.perf_counter() - t0, "temp_gb": m.temp_size_in_bytes / GB,
                "argument_gb": m.argument_size_in_bytes / GB,
                "compiled_gb": (m.temp_size_in_bytes + m.argument_size_in_bytes) / GB,
                "attention": args.attention or "default", "attention_applied": how, "remat": args.remat,
                "max_targets": k, "past_max_positions": seq > limit, "max_position_embeddings": limit,
                "backend": jax.default_backend()}
    if args.compile_only or compiled["compiled_gb"] > args.max_gb:
        why = "compile only" if args.compile_only else f"compiled {compiled['compiled_gb']:.1f} GB > {args.max_gb} GB"
        return {"side": "jax", "seq": seq, "ran": False, "why": why, "base_gb": _gb(base["VmRSS"] - mem0["VmRSS"]),
                "user_cpu_s": time.process_time() - cpu0, **compiled}
    release_freed_memory()  # as the trainer does before a shape's first run (compiled memory freed late)
    _reset_peak()  # the compile's own peak is not the step's
    first, times, losses = _timed_steps(lambda: trainer.train_step(batch)["loss"], args.steps)
    return _finish("jax", seq, mem0, base, first, times, losses, cpu0, **compiled)


def run_torch(args: argparse.Namespace, checkpointing: bool) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    cpu0, mem0 = time.process_time(), _proc_status_mb()
    seq = args.seq
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_folder(args.model), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS),
                                                       lora_dropout=0.0))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    batch = make_batch(seq, model.config.vocab_size)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    half = seq // 2
    targets = ids[:, half:]  # predicted by the hidden states half-1 .. seq-2

    def step() -> float:
        logits = model(input_ids=ids, logits_to_keep=seq - half + 1).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    base = _proc_status_mb()
    first, times, losses = _timed_steps(step, args.steps)
    return _finish("torch_ckpt" if checkpointing else "torch", seq, mem0, base, first, times, losses, cpu0,
                   threads=torch.get_num_threads(), max_position_embeddings=model.config.max_position_embeddings)


def child_main(args: argparse.Namespace) -> None:
    if args.child == "jax":
        result = run_jax(args)
    else:
        result = run_torch(args, checkpointing=args.child == "torch_ckpt")
    result["ru_maxrss_gb"] = __import__("resource").getrusage(0).ru_maxrss * 1024 / 1e9
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent.


def _spawn(side: str, seq: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "bench.long_context", f"--child={side}", f"--seq={seq}", f"--steps={args.steps}",
           f"--max_gb={args.max_gb}"]
    for name in ("attention", "model", "loss_chunk"):
        if getattr(args, name) is not None:
            cmd.append(f"--{name}={getattr(args, name)}")
    if args.remat:
        cmd.append("--remat")
    if args.compile_only:
        cmd.append("--compile_only")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"side": side, "seq": seq, "ran": False, "why": f"timed out after {args.child_timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"side": side, "seq": seq, "ran": False, "why": f"child failed (exit {proc.returncode})"}
    res = json.loads(lines[-1][len("BENCH_RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r.get("ran"):
        return f"skip ({r.get('why', '')})"
    return f"{r['peak_gb']:.2f} GB, {r['s_per_step']:.1f} s, {r['tokens_per_s']:.0f} tok/s"


def report(args: argparse.Namespace, results: dict[str, dict[int, dict]]) -> list[str]:
    """The side-by-side table, the longest length each side reached and the ratios (jax / torch_ckpt)."""
    lines = [f"SmolLM2-135M LoRA r16 q,k,v,o, batch 1, fp32; --max_gb {args.max_gb}; attention "
             f"{args.attention or 'default'}; remat {args.remat}; load {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores"]
    head = f"{'seq':>6} | {'jax compiled (temp+arg)':>24} | " + " | ".join(f"{s:>34}" for s in args.sides)
    lines += [head, "-" * len(head)]
    for seq in args.lengths:
        jr = results.get("jax", {}).get(seq)
        comp = "-" if jr is None or "compiled_gb" not in jr else f"{jr['compiled_gb']:.2f} GB ({jr['temp_gb']:.2f}+{jr['argument_gb']:.2f})"
        lines.append(f"{seq:>6} | {comp:>24} | " + " | ".join(f"{_cell(results.get(s, {}).get(seq)):>34}"
                                                             for s in args.sides))
    for side in args.sides:
        ran = [n for n, r in results.get(side, {}).items() if r.get("ran")]
        fits = [n for n, r in results.get(side, {}).items() if r.get("compiled_gb", 1e9) <= args.max_gb]
        text = f"longest run, {side}: {max(ran) if ran else 'none'}"
        if side == "jax":
            text += f"; longest compiled step within {args.max_gb} GB: {max(fits) if fits else 'none'}"
        lines.append(text)
    jax_r, ref = results.get("jax", {}), results.get("torch_ckpt", {})
    for seq in args.lengths:
        a, b = jax_r.get(seq), ref.get(seq)
        if a and b and a.get("ran") and b.get("ran"):
            lines.append(f"ratio at {seq}: jax / torch_ckpt peak {a['peak_gb'] / b['peak_gb']:.2f}x, "
                         f"s/step {a['s_per_step'] / b['s_per_step']:.2f}x")
    comp = {n: r["compiled_gb"] for n, r in jax_r.items() if "compiled_gb" in r}
    if comp:
        first = min(comp)
        lines.append("jax compiled growth vs " + str(first) + ": " +
                     ", ".join(f"{n}: {comp[n] / comp[first]:.1f}x" for n in sorted(comp)))
    return lines


def parent_main(args: argparse.Namespace) -> int:
    results: dict[str, dict[int, dict]] = {s: {} for s in args.sides}
    for side in args.sides:
        prev_peak = None
        for seq in args.lengths:
            if side != "jax" and prev_peak is not None and 4 * prev_peak > args.max_gb:
                results[side][seq] = {"side": side, "seq": seq, "ran": False,
                                      "why": f"predicted {4 * prev_peak:.1f} GB > {args.max_gb} GB"}
                break
            res = _spawn(side, seq, args)
            results[side][seq] = res
            print(f"{side} {seq}: {_cell(res)}" + (f", compiled {res['compiled_gb']:.2f} GB"
                                                      if "compiled_gb" in res else ""), flush=True)
            if not res.get("ran") and not args.compile_only:
                break  # longer ones will not fit either
            prev_peak = res.get("peak_gb")
    lines = report(args, results)
    print("\n".join(lines))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results, "report": lines}, fh,
                      indent=1, default=str)
        os.replace(tmp, args.json)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.seq is None:
            raise SystemExit("--child needs --seq")
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
