"""Real-size runs on a random checkpoint of a real shape: measured peak memory beside the planner's figure.

    python -m bench.big_model --dir=/tmp/llama7b                       # Llama-2-7B shape, every phase
    python -m bench.big_model --dir=/tmp/l8 --layers=8 --phases=gen,load,qlora
    python -m bench.big_model --dir=/tmp/llama7b --phases=lora --json=/tmp/big.json

`gen` writes the checkpoint as transformers writes one: bf16 tensors (normal, std 0.02; norms 1), sharded
safetensors (`--shard_gb`) with `model.safetensors.index.json`, config.json (`torch_dtype` bfloat16) and
SmolLM2's tokenizer (vocabulary 49,152), so the shape is Llama-2-7B's but for the vocabulary: 32 layers,
hidden 4096, MLP 11008, 32 heads, untied head, about 6.87 B parameters, 13.7 GB. It needs the default
model's cached folder (for the tokenizer) and about twice the checkpoint's size free in --dir's disk for
the later phases. Never commit the checkpoint.

Every other phase runs as its own child process, one after the other (never two multi-GB jobs at once);
the peak RSS of each child is read from `wait4` (what `/usr/bin/time -v` reports), GB = 1e9:

    baseline  a process that imports the entry point and starts JAX, then exits: the RSS every run starts from
    cat       `cat DIR/*.safetensors > /dev/null` (the disk / page cache read speed; run first)
    load      `from_pretrained(DIR)` alone (bf16 kept): GB/s beside cat's
    qlora     `experiments.qlora --steps=3 --batch_size=1 --seq_len=256 --eval_examples=0 --save_merged`
              (on ../shared/data/code_alpaca_2k.json when present: every batch fills 256 tokens)
    parity    transformers (bf16) and jaxpeft each load qlora's merged/ in their own process and score a
              16-token prompt: max |logit diff| / max |logit| (target <= 2 %) and argmax agreement
    lora      `experiments.lora` with the same settings
    quantize  `experiments.quantize --out=DIR-nf4`: peak minus baseline beside the folder's size
    bnb       transformers + bitsandbytes (CPU) load DIR-nf4 and run a forward
    qlora_q   `experiments.qlora --model=DIR-nf4` (training from the 4-bit folder)

For the lora and qlora phases the planner's figure (`jaxpeft.plan.plan_memory` with the run's settings)
is printed beside the measured peak minus the baseline. Results go to stdout and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("gen", "baseline", "cat", "load", "qlora", "parity", "lora", "quantize", "bnb", "qlora_q")
RUN_FLAGS = ["--steps=3", "--batch_size=1", "--seq_len=256", "--eval_examples=0", "--save_every=0",
             "--noprogress"]
# Real instruction data with long answers (every batch fills the 256 tokens), when the checkout has it.
SHARED_DATA = ROOT.parent / "shared" / "data" / "code_alpaca_2k.json"


def llama_config(layers: int, vocab: int, tokenizer_config: dict, hidden: int = 4096, intermediate: int = 11008,
                 heads: int = 32, kv_heads: int | None = None) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads, "head_dim": hidden // heads, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False, "vocab_size": vocab, "torch_dtype": "bfloat16",
            "bos_token_id": tokenizer_config.get("bos_token_id", 1),
            "eos_token_id": tokenizer_config.get("eos_token_id", 2),
            "pad_token_id": tokenizer_config.get("pad_token_id", 2)}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
        out += [(p + f"self_attn.{n}.weight", shape) for n, shape in
                (("q_proj", (d, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, d)))]
        out += [(p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def generate(folder: Path, layers: int, shard_gb: float, seed: int, tokenizer: bool = True, vocab: int | None = None,
             fast: bool = False, **widths: int) -> dict:
    """Writes the random bf16 checkpoint shard by shard (one shard in memory at a time); `widths` override
    Llama-2-7B's hidden / intermediate / heads / kv_heads (`llama_config`), `vocab` the tokenizer's size.

    `fast`: each matrix is a cyclic copy of one 64 MB pool of normal draws from a random offset (memcpy speed,
    ~10x quicker at 8B parameters than drawing every value); fine for speed and memory runs, not for
    anything that needs independent weights."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxpeft.convert.default_model import cached_hf_folder

    src = Path(cached_hf_folder()) if tokenizer else None
    tok_cfg = json.loads((src / "config.json").read_text()) if src else {"vocab_size": 49152}
    cfg = llama_config(layers, int(vocab or tok_cfg["vocab_size"]), tok_cfg, **widths)
    shapes = tensor_shapes(cfg)
    limit = int(shard_gb * 1e9)
    shards, current, size = [], [], 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    largest = max(int(np.prod(s)) for _, s in shapes)
    pool = (rng.standard_normal(min(2**25, largest), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16) if fast else None
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
            elif pool is not None:
                tensors[name] = np.resize(np.roll(pool, -int(rng.integers(pool.size))), shape)
            else:
                tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            weight_map[name] = fname
            total += tensors[name].nbytes
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {fname}", file=sys.stderr, flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if src and (src / name).exists():
            shutil.copy(src / name, tmp / name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    params = sum(int(np.prod(s)) for _, s in shapes)
    return {"parameters": params, "bytes": total, "shards": len(shards)}


def run_child(argv: list[str], *, env: dict | None = None, log: Path | None = None) -> dict:
    """Runs argv, returns {rc, peak_rss_gb, wall_s}; its output goes to `log` (stderr tail printed on failure)."""
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if log:
        out.close()
    result = {"rc": proc.returncode, "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3), "wall_s": round(wall, 1)}
    if proc.returncode and log:
        tail = log.read_text().splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail), file=sys.stderr)
    return result


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def plan_figure(folder: Path, method: str, targets: str = "q_proj,k_proj,v_proj,o_proj") -> float:
    from jaxpeft.plan import PlanConfig, plan_memory, resolve_model

    _, config = resolve_model(str(folder))
    plan = PlanConfig(method=method, batch_size=1, seq_len=256, remat=False, rank=16,
                      targets=tuple(targets.split(",")), dtype="bfloat16", param_dtype="bfloat16")
    return plan_memory(config, plan).peak / 1e9


# ---------------------------------------------------------------------------------------------- children


def child_baseline() -> None:
    importlib.import_module("experiments.lora")  # what every run imports before it loads anything
    import jax

    jax.numpy.zeros(1).block_until_ready()


def child_load(folder: str) -> None:
    import jaxpeft

    start = time.perf_counter()
    _, params, _ = jaxpeft.from_pretrained(folder, load_tokenizer=False, progress=False)
    import jax

    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    print(json.dumps({"load_s": round(seconds, 2)}))


def _prompt_ids(folder: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The quick brown fox jumps over the lazy dog while the sun sets over the quiet hills")["input_ids"]
    return list(ids[:16])


def child_logits(side: str, folder: str, out: str) -> None:
    ids = _prompt_ids(folder)
    if side == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
    else:
        import jax.numpy as jnp

        import jaxpeft

        model, params, _ = jaxpeft.from_pretrained(folder, load_tokenizer=False)
        logits = np.asarray(model.apply({"params": params}, jnp.asarray([ids])).astype(jnp.float32))[0]
    np.save(out, logits)


def child_bnb(folder: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    ids = _prompt_ids(folder)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    print(json.dumps({"bnb_forward_finite": bool(torch.isfinite(logits).all()),
                      "bnb_linear4bit": type(model.model.layers[0].self_attn.q_proj).__name__}))


# ---------------------------------------------------------------------------------------------- phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="where the random checkpoint is (or is written)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shard_gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--work", default=None, help="run folders (default: DIR-runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--args", nargs="*", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        {"baseline": lambda: child_baseline(), "load": lambda: child_load(*a.args),
         "logits": lambda: child_logits(*a.args), "bnb": lambda: child_bnb(*a.args)}[a.child]()
        return
    folder = Path(a.dir)
    work = Path(a.work or f"{folder}-runs")
    work.mkdir(parents=True, exist_ok=True)
    qdir = Path(f"{folder}-nf4")
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        sys.exit(f"unknown phases {unknown}; choose from {list(PHASES)}")
    results: dict = {"dir": str(folder), "cpu": _cpu(), "mem_total_gb": _meminfo("MemTotal")}
    py = sys.executable

    def record(name: str, value: dict) -> None:
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))

    def bench_child(*args: str) -> list[str]:
        return [py, "-m", "bench.big_model", "--dir", str(folder), "--child", args[0], "--args", *args[1:]]

    if "gen" in phases:
        start = time.perf_counter()
        info = generate(folder, a.layers, a.shard_gb, a.seed)
        record("gen", {**info, "gb": round(info["bytes"] / 1e9, 2), "wall_s": round(time.perf_counter() - start, 1)})
    ckpt_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    results["checkpoint_gb"] = round(ckpt_gb, 3)
    baseline = None
    if "baseline" in phases or any(p in phases for p in ("lora", "qlora", "quantize", "qlora_q")):
        baseline = run_child(bench_child("baseline"))["peak_rss_gb"]
        record("baseline", {"peak_rss_gb": baseline})
    if "cat" in phases:
        start = time.perf_counter()
        subprocess.run(f"cat {folder}/*.safetensors > /dev/null", shell=True, check=True)
        s = time.perf_counter() - start
        record("cat", {"seconds": round(s, 1), "gb_per_s": round(ckpt_gb / s, 2), "checkpoint_gb": round(ckpt_gb, 2),
                       "mem_available_gb": _meminfo("MemAvailable"),
                       "fits_page_cache": ckpt_gb < _meminfo("MemAvailable")})
    if "load" in phases:
        log = work / "load.log"
        r = run_child(bench_child("load", str(folder)), log=log)
        load_s = json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])["load_s"] \
            if r["rc"] == 0 else None
        record("load", {**r, "load_s": load_s, "gb_per_s": round(ckpt_gb / load_s, 2) if load_s else None})

    def train(name: str, module: str, model: Path, extra: list[str], method: str) -> None:
        out = work / name
        data = [f"--dataset={SHARED_DATA}"] if SHARED_DATA.exists() else []
        argv = [py, "-m", module, f"--model={model}", f"--out={out}", "--overwrite", *RUN_FLAGS, *data, *extra]
        r = run_child(argv, log=work / f"{name}.log")
        try:  # the run's own plan (its model, batch, effective sequence length, dtypes), from config.json
            plan = json.loads((out / "config.json").read_text())["plan"]["peak_bytes"] / 1e9
        except (OSError, KeyError, TypeError, ValueError):
            plan = plan_figure(folder, method)
        r.update({"command": " ".join(argv[1:]), "plan_gb": round(plan, 3)})
        if baseline is not None:
            used = r["peak_rss_gb"] - baseline
            r.update({"peak_minus_baseline_gb": round(used, 3), "plan_error": round(plan / used - 1, 3)})
        record(name, r)

    if "qlora" in phases:
        train("qlora", "experiments.qlora", folder, ["--save_merged"], "qlora")
        merged = work / "qlora" / "merged"
        if merged.exists():
            cfg = json.loads((merged / "config.json").read_text())
            results["qlora"]["merged"] = {"files": sorted(p.name for p in merged.glob("*.safetensors*")),
                                          "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
                                          "gb": round(dir_bytes(merged) / 1e9, 2)}
            record("qlora", results["qlora"])
    if "parity" in phases:
        merged = work / "qlora" / "merged"
        out = {}
        for side in ("transformers", "jaxpeft"):
            r = run_child(bench_child("logits", side, str(merged), str(work / f"logits-{side}.npy")),
                          log=work / f"parity-{side}.log")
            out[side] = r
        if all(r["rc"] == 0 for r in out.values()):
            t, j = (np.load(work / f"logits-{s}.npy") for s in ("transformers", "jaxpeft"))
            rel = float(np.abs(t - j).max() / np.abs(t).max())
            same = bool((t.argmax(-1) == j.argmax(-1)).all())
            out.update({"max_diff_over_max_logit": round(rel, 5), "argmax_agree_all": same,
                        "argmax_agree": int((t.argmax(-1) == j.argmax(-1)).sum()), "positions": int(t.shape[0])})
        record("parity", out)
    if "lora" in phases:
        train("lora", "experiments.lora", folder, [], "lora")
    if "quantize" in phases:
        argv = [py, "-m", "experiments.quantize", f"--model={folder}", f"--out={qdir}", "--overwrite"]
        r = run_child(argv, log=work / "quantize.log")
        if r["rc"] == 0:
            q_gb = dir_bytes(qdir) / 1e9
            r.update({"q_gb": round(q_gb, 3)})
            if baseline is not None:
                r.update({"peak_minus_baseline_gb": round(r["peak_rss_gb"] - baseline, 3),
                          "limit_gb": round(q_gb + 1, 3)})
        record("quantize", r)
    if "bnb" in phases:
        log = work / "bnb.log"
        r = run_child(bench_child("bnb", str(qdir)), log=log)
        lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
        record("bnb", {**r, **(json.loads(lines[-1]) if lines else {})})
    if "qlora_q" in phases:
        train("qlora_q", "experiments.qlora", qdir, [], "qlora")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return "unknown"


def _meminfo(key: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) * 1024 / 1e9, 2)
    return 0.0


if __name__ == "__main__":
    main()
