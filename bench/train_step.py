"""LoRA training-step throughput and peak memory: jaxpeft (Trainer, CPU) against HF PEFT + transformers (torch).

SmolLM2-135M-Instruct (the cached fp32 HF folder of `jaxpeft.convert.default_model.cached_hf_folder()`, so
both sides read the same weights), LoRA r=16 / alpha=32 on q_proj,k_proj,v_proj,o_proj, dropout 0, batch
4 x 128, fp32, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay) after global-norm clipping at
1.0, the learning rate following jaxpeft's schedule with no warm-up (cosine from lr to 0 over the steps run;
the torch side uses the same formula through LambdaLR).

    python -m bench.train_step                        # 8 timed steps per side after 1 compile + 1 warm-up step
    python -m bench.train_step --steps 16 --rounds 2  # interleave 2 runs of each side
    python -m bench.train_step --variants all         # + all-position logits, oneDNN XLA flag, torch 1 thread
    python -m bench.train_step --breakdown            # + forward-only and forward+backward timings per side
    python -m bench.train_step --data random          # random ids, loss on the second half of every row
    python -m bench.train_step --data file:../shared/data/code_alpaca_2k.json   # real SFT rows (below)
    python -m bench.train_step --qlora                # QLoRA: NF4 + double quant base on both sides

The parent builds one batch (default: real `builtin:dates` records, encoded and padded to 4 x 128 by
`jaxpeft.data`; 11 target tokens per row) and one set of LoRA A matrices (seeded numpy, PEFT's
kaiming-uniform bound 1/sqrt(in)), writes them to a temporary .npz, and runs every side in its own
subprocess (`--side=jax` / `--side=torch`, internal), each training on that same batch every step. LoRA B is
zero at init on both sides, so the step-0 loss is the base model's; the parent checks that the two step-0
losses agree within --tol (1e-4 absolute) and exits 1 if not. With the same A, later losses agree too (the
largest per-step difference is printed).

jaxpeft side: `Trainer(model, lora.init(...), lora.labels(...), ...)` and `trainer.train_step(batch)`, whose
float loss syncs; K (max_targets) = the batch's target count rounded up to 8, i.e. logits only at target
positions. torch side: forward, mean NLL over the same targets from the logits (same shift and mask),
backward, clip_grad_norm_, AdamW over the trainable parameters, zero_grad.

With `--data=file:PATH` the records go through the CLI's own data path (`jaxpeft.train.run_data.prepare_data`
with a RunConfig of this batch and seq and pack=False: load_records with the CLI's 5 % held out, the chat
template, encode_records, the static row length min(seq, longest example rounded up to 16) and the Batcher),
and the first --file_batches batches of that stream are used in turn (step i trains on batch i mod N) on both
sides. jaxpeft runs today's static shape (every batch padded to that row length) with the CLI's static target
bound K (`micro_batch_targets`); PEFT gets what a PEFT user's collator gives, dynamic padding: each batch cut to
its longest real row (the Batcher pads on the right, so the cut drops only padding; targets are the same).
Both sides then also report REAL (non-pad) tokens/s: the real tokens of the timed steps over their time.

With `--qlora` the base's linears are 4-bit on both sides (NF4, double quant, blocksize 64, every linear but the
head; compute fp32): jaxpeft quantizes on load (`from_pretrained(quantize=Bnb4bitConfig())`, what
experiments.qlora does), PEFT runs over transformers' bitsandbytes 4-bit (`BitsAndBytesConfig(load_in_4bit...)`,
device_map cpu, bitsandbytes' default CPU kernels) with no `prepare_model_for_kbit_training` (it would turn on
gradient checkpointing, which the jaxpeft side does not do). The two quantizers agree to rounding, so the step-0
check there uses --qlora_tol (1e-3; measured: 1.5e-5 on code_alpaca rows).

Throughput is batch*seq / median step time (padding included: both sides run every position of the batch
they get; with --data=file the PEFT batches are shorter, so compare the real tokens/s there). Peak memory
is VmHWM - VmRSS right after the imports, over the whole child ("peak") and from just before the first
train step on ("train peak", VmHWM reset through /proc/self/clear_refs), in MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python bench/train_step.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, _REPO)

from bench.forward import _time_steps, model_folder  # noqa: E402

VARIANTS = ("all_logits", "onednn", "torch1")
ONEDNN_FLAGS = "--xla_cpu_use_onednn=true"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def _data_arg(value: str) -> str:
    if value in ("dates", "random") or (value.startswith("file:") and len(value) > len("file:")):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: expected dates, random or file:PATH")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed train steps per side (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    p.add_argument("--data", default="dates", type=_data_arg,
                   help="dates: builtin:dates records padded to batch x seq (pack=False); random: random ids, "
                        "every row full, loss on the second half of each row; file:PATH: SFT records of a file "
                        "through the CLI's data path (see above)")
    p.add_argument("--file_batches", type=int, default=4,
                   help="--data=file: distinct batches, used in turn (step i trains on batch i mod N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--target_modules", default=DEFAULT_TARGETS)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="global-norm clipping on both sides (0: off)")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch.set_num_threads in the torch child (default: leave torch's default alone)")
    p.add_argument("--variants", default="",
                   help=f"comma list of extra runs, or 'all': all_logits (jaxpeft with max_targets = every "
                        f"position, B*(S-1)), onednn (jaxpeft with XLA_FLAGS={ONEDNN_FLAGS}), torch1 "
                        f"(torch with 1 thread)")
    p.add_argument("--breakdown", action="store_true",
                   help="each child also times the loss forward alone and forward+backward (no optimizer); "
                        "this runs before the timed steps, so it counts in 'peak MB' but not in 'train MB'")
    p.add_argument("--hlo", action="store_true",
                   help="jaxpeft children also compile the step ahead of time and report a hash of the "
                        "optimized HLO (to see whether XLA_FLAGS change the program); jax reuses that executable, "
                        "so the first train step then no longer includes the compile (the AOT times are printed)")
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--tol", type=float, default=1e-4, help="absolute tolerance of the step-0 loss check")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base on both sides (see above)")
    p.add_argument("--qlora_tol", type=float, default=1e-3,
                   help="absolute tolerance of the step-0 loss check with --qlora (the 4-bit kernels differ)")
    p.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2-135M folder)")
    p.add_argument("--json", default=None, help="also write all child results to this file")
    # internal: what a child runs
    p.add_argument("--side", default=None, choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--all_logits", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Memory (Linux /proc; kB in the file, MB here).


def _proc_status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024.0
    return out


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Inputs built by the parent.


def total_steps(args: argparse.Namespace) -> int:
    return 1 + args.warmup + args.steps


def lr_at(args: argparse.Namespace, i: int) -> float:
    """jaxpeft's schedule with warmup_steps=0 (optax.warmup_cosine_decay_schedule): cosine from lr to 0."""
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(i, total_steps(args)) / total_steps(args)))


def _lora_in_dims(folder: str) -> dict[str, tuple[int, int]]:
    with open(os.path.join(folder, "config.json")) as fh:
        c = json.load(fh)
    d = c["hidden_size"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    kv = c.get("num_key_value_heads") or heads
    dims = {"q_proj": (d, heads * head_dim), "k_proj": (d, kv * head_dim), "v_proj": (d, kv * head_dim),
            "o_proj": (heads * head_dim, d), "gate_proj": (d, c["intermediate_size"]),
            "up_proj": (d, c["intermediate_size"]), "down_proj": (c["intermediate_size"], d)}
    return {"layers": c["num_hidden_layers"], "vocab": c["vocab_size"], "dims": dims}  # type: ignore[return-value]


def _file_batches(args: argparse.Namespace, folder: str) -> tuple[list[dict[str, np.ndarray]], int, str]:
    """The first --file_batches batches of the CLI's training stream of `args.data`'s file, the CLI's K, a note."""
    from transformers import AutoTokenizer

    from jaxpeft.train.loop import micro_batch_targets
    from jaxpeft.train.run_config import RunConfig
    from jaxpeft.train.run_data import prepare_data

    path = args.data[len("file:"):]
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = RunConfig(out="", dataset=path, batch_size=args.batch, seq_len=args.seq, pack=False, eval_examples=0,
                    seed=args.seed)
    data = prepare_data(cfg, tok)
    batches = [next(data.batcher) for _ in range(args.file_batches)]
    k = micro_batch_targets(data.encoded, args.batch, data.seq_len, False)
    real = [int(b["attention_mask"].sum()) for b in batches]
    longest = [int(b["attention_mask"].sum(1).max()) for b in batches]
    desc = (f"{path} through the CLI's data path (prepare_data, pack=False, seed {args.seed}): {len(data.encoded)} "
            f"train examples, static rows of {data.seq_len}; {len(batches)} batches used in turn, real tokens per "
            f"batch {real}, longest row per batch {longest} (PEFT's dynamic padding), targets per batch "
            f"{[int(b['loss_mask'][:, 1:].sum()) for b in batches]}")
    return batches, k, desc


def build_inputs(args: argparse.Namespace, folder: str) -> tuple[dict[str, np.ndarray], dict]:
    """The batches (input_ids, loss_mask, attention_mask, each [N, B, S] int32; step i trains on batch i mod N),
    torch_len [N] (the columns the torch side keeps of each batch), max_targets (jaxpeft's K, 0: the batches'
    own bound) and the LoRA A matrices (I, R)."""
    info = _lora_in_dims(folder)
    b, s = args.batch, args.seq
    k = 0
    if args.data == "random":
        ids = np.random.default_rng(args.seed).integers(0, info["vocab"], size=(b, s), dtype=np.int64)
        mask = np.zeros((b, s), np.int32)
        mask[:, s // 2:] = 1
        batches = [{"input_ids": ids.astype(np.int32), "loss_mask": mask, "attention_mask": np.ones((b, s), np.int32)}]
        desc = f"random ids (seed {args.seed}), loss on positions {s // 2}..{s - 1} of every row"
    elif args.data.startswith("file:"):
        batches, k, desc = _file_batches(args, folder)
    else:
        from transformers import AutoTokenizer

        from jaxpeft.data import Batcher, encode_records, load_records

        tok = AutoTokenizer.from_pretrained(folder)
        records, _ = load_records("builtin:dates", seed=args.seed)
        encoded, _ = encode_records(tok, records, seq_len=s)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batches = [next(Batcher(encoded, batch_size=b, seq_len=s, pad_id=pad, seed=args.seed, pack=False))]
        desc = (f"builtin:dates records (seed {args.seed}), padded (pack=False): real tokens per row "
                f"{batches[0]['attention_mask'].sum(1).tolist()}, targets per row "
                f"{batches[0]['loss_mask'][:, 1:].sum(1).tolist()}")
    dynamic = args.data.startswith("file:")
    return stack_inputs(args, batches, k, info, dynamic=dynamic), {"desc": desc, "dynamic_padding": dynamic}


def stack_inputs(args: argparse.Namespace, batches: list[dict[str, np.ndarray]], k: int, info: dict, *,
                 dynamic: bool) -> dict[str, np.ndarray]:
    """`build_inputs`' arrays from a list of batches (each padded on the right to the widest, so any widths
    stack), the torch side's columns per batch (with `dynamic`, its longest real row: dynamic padding) and the
    LoRA A matrices both sides start from (`info`: `_lora_in_dims`)."""
    torch_len = [int(x["attention_mask"].sum(1).max()) if dynamic else x["input_ids"].shape[1] for x in batches]
    rng = np.random.default_rng(args.seed + 1)
    lora_a = {}
    for layer in range(info["layers"]):
        for name in args.target_modules.split(","):
            in_dim = info["dims"][name][0]
            bound = 1.0 / math.sqrt(in_dim)  # PEFT: kaiming_uniform_(a=sqrt(5)) on the (R, I) weight
            lora_a[f"lora_a/{layer}/{name}"] = rng.uniform(-bound, bound, (in_dim, args.rank)).astype(np.float32)
    width = max(x["input_ids"].shape[1] for x in batches)
    stacked = {key: np.stack([np.pad(np.asarray(x[key], np.int32), ((0, 0), (0, width - x[key].shape[1])))
                              for x in batches])
               for key in ("input_ids", "loss_mask", "attention_mask")}
    extra = {"torch_len": np.asarray(torch_len, np.int32), "max_targets": np.asarray(k, np.int32)}
    return stacked | extra | lora_a


def _batch_list(inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = inputs["input_ids"].shape[0]
    return [{key: inputs[key][i] for key in ("input_ids", "loss_mask", "attention_mask")} for i in range(n)]


def _real_tokens(batches: list[dict[str, np.ndarray]], args: argparse.Namespace) -> list[int]:
    """Real (non-pad) tokens of every step run (step i trains on batch i mod N)."""
    return [int(batches[i % len(batches)]["attention_mask"].sum()) for i in range(total_steps(args))]


# ----------------------------------------------------------------------------------------------
# Children.


def _timed_losses(step, args: argparse.Namespace) -> tuple[list[float], float, list[float], float]:
    """(every step's loss, first-step s, timed step times, process CPU s / wall s over the timed steps)."""
    losses: list[float] = []
    mark: list[float] = []

    def one():
        if len(losses) == 1 + args.warmup:  # the first timed step starts now
            mark.extend((time.process_time(), time.perf_counter()))
        losses.append(step())

    _, first, times = _time_steps(one, args.steps, args.warmup)
    util = (time.process_time() - mark[0]) / max(time.perf_counter() - mark[1], 1e-9)
    return losses, first, times, util


def _summary(side: str, args: argparse.Namespace, losses, first, times, mem0, mem_setup, reset_ok, real,
             **extra) -> dict:
    """`real`: the real (non-pad) tokens of every step run; the timed steps are the last len(times)."""
    mem = _proc_status_mb()
    med = statistics.median(times)
    tokens = args.batch * args.seq
    real_timed = real[len(real) - len(times):]
    return {
        "side": side,
        "tokens_per_s": tokens / med,
        "real_tokens_per_s": sum(real_timed) / sum(times),
        "real_tokens_timed": sum(real_timed),
        "tokens_per_s_best": tokens / min(times),
        "median_s": med,
        "min_s": min(times),
        "first_step_s": first,
        "compile_est_s": first - med,
        "steps": len(times),
        "losses": losses,
        "rss_after_imports_mb": mem0["VmRSS"],
        "rss_after_setup_mb": mem_setup["VmRSS"],
        "setup_peak_mb": mem_setup["VmHWM"] - mem0["VmRSS"],
        "train_peak_mb": mem["VmHWM"] - mem0["VmRSS"] if reset_ok else None,
        "peak_mb": max(mem["VmHWM"], mem_setup["VmHWM"]) - mem0["VmRSS"],
        "ru_maxrss_mb": _ru_maxrss_mb(),
        "load": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        **extra,
    }


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, reps: int) -> tuple[float, float, list[float]]:
    """(first call s, median s, times) of `fn()` (which syncs) over `reps` calls after the first."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), times


def run_jax(args: argparse.Namespace, inputs: dict[str, np.ndarray]) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxpeft
    from jaxpeft.convert.bnb import Bnb4bitConfig
    from jaxpeft.core.tree import flatten_params, unflatten_params
    from jaxpeft.methods import get_method
    from jaxpeft.methods.lora import LoraConfig
    from jaxpeft.train.loop import TrainConfig, Trainer
    from jaxpeft.train.optim import OptimConfig

    mem0 = _proc_status_mb()
    batches = _batch_list(inputs)
    batch = batches[0]
    quantize = Bnb4bitConfig() if args.qlora else None  # nf4, double quant, blocksize 64, all-linear
    model, params, _ = jaxpeft.from_pretrained(args.model, load_tokenizer=False, quantize=quantize)
    targets = tuple(args.target_modules.split(","))
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0)
    lora = get_method("lora")
    adapted = lora.init(jax.random.PRNGKey(0), params, cfg)
    flat = flatten_params(adapted)
    replaced = 0
    for path in list(flat):
        if path[-1] == "lora_a":
            layer, name = path[path.index("layers") + 1], path[-2]
            flat[path] = jnp.asarray(inputs[f"lora_a/{layer}/{name}"])
            replaced += 1
    adapted = unflatten_params(flat)
    b, s = batch["input_ids"].shape
    n_targets = max(int(x["loss_mask"][:, 1:].sum()) for x in batches)
    k = b * (s - 1) if args.all_logits else int(inputs["max_targets"]) or max(8, -(-n_targets // 8) * 8)
    optim_cfg = OptimConfig(lr=args.lr, warmup_steps=0, total_steps=total_steps(args),
                            max_grad_norm=args.max_grad_norm, weight_decay=0.0)
    trainer = Trainer(model, adapted, lora.labels(adapted, cfg), optim_cfg=optim_cfg,
                      train_cfg=TrainConfig(steps=total_steps(args), batch_size=b), max_targets=k)
    n_trainable = sum(int(x.size) for x in jax.tree_util.tree_leaves(trainer.state["params"]))
    del params, adapted, flat
    extra: dict = {}
    if args.hlo:
        import hashlib

        micro = {key: jnp.asarray(v[None]) for key, v in batch.items()}
        t0 = time.perf_counter()
        lowered = trainer._step.lower(trainer.state, trainer.frozen, micro)
        t1 = time.perf_counter()
        text = lowered.compile().as_text()
        extra.update(hlo_sha1=hashlib.sha1(text.encode()).hexdigest()[:12], lower_s=t1 - t0,
                     compile_s=time.perf_counter() - t1, hlo_chars=len(text),
                     hlo_onednn_calls=text.count("onednn"), hlo_ynn_fusions=text.count("ynn_fusion"))
    if args.breakdown:
        extra["breakdown"] = _jax_breakdown(model, trainer, batch, k)
    mem_setup = _proc_status_mb()
    reset_ok = _reset_peak()
    count = [0]

    def step() -> float:
        count[0] += 1
        return trainer.train_step(batches[(count[0] - 1) % len(batches)])["loss"]

    losses, first, times, util = _timed_losses(step, args)
    return _summary("jax", args, losses, first, times, mem0, mem_setup, reset_ok, _real_tokens(batches, args),
                    cpu_util=util, max_targets=k, seq_len=s,
                    n_targets=n_targets, lora_a_replaced=replaced, n_trainable=n_trainable,
                    lr_first_last=[float(trainer.schedule(0)), float(trainer.schedule(total_steps(args) - 1))],
                    jax_version=jax.__version__, backend=jax.default_backend(),
                    xla_flags=os.environ.get("XLA_FLAGS", ""), **extra)


def _jax_breakdown(model, trainer, batch: dict[str, np.ndarray], k: int) -> dict:
    """Forward loss alone and value_and_grad (no optimizer), jitted like the train step."""
    import jax
    import jax.numpy as jnp

    from jaxpeft.core.partition import combine
    from jaxpeft.train.step import token_nll_sum

    jb = {key: jnp.asarray(v) for key, v in batch.items()}  # an argument, not a constant XLA could fold

    def loss(trainable, frozen, b):
        nll, n = token_nll_sum(model, combine(frozen, trainable), b, k)
        return nll / n

    fwd = jax.jit(loss)
    grad = jax.jit(jax.value_and_grad(loss))
    reps = 5
    out = {}
    f_first, f_med, _ = _timed(lambda: float(fwd(trainer.state["params"], trainer.frozen, jb)), reps)
    g_first, g_med, _ = _timed(lambda: float(grad(trainer.state["params"], trainer.frozen, jb)[0]), reps)
    out.update(forward_s=f_med, forward_first_s=f_first, fwd_bwd_s=g_med, fwd_bwd_first_s=g_first)
    return out


def run_torch(args: argparse.Namespace, inputs: dict[str, np.ndarray]) -> dict:
    import peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    mem0 = _proc_status_mb()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    folder = model_folder(args.model)
    quant = {}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        quant = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=args.attn, **quant)
    targets = args.target_modules.split(",")
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                                       lora_dropout=0.0))
    replaced = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                parts = name.split(".")
                layer, proj = parts[parts.index("layers") + 1], parts[-1]
                a = torch.from_numpy(inputs[f"lora_a/{layer}/{proj}"])
                module.lora_A["default"].weight.copy_(a.T)
                assert float(module.lora_B["default"].weight.abs().max()) == 0.0
                replaced += 1
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(args, i) / args.lr)
    batches = _batch_list(inputs)
    tensors = []  # per batch, cut to torch_len columns (dynamic padding with --data=file; else the full row)
    for x, cols in zip(batches, inputs["torch_len"].tolist()):
        ids = torch.from_numpy(x["input_ids"][:, :cols].astype(np.int64))
        tensors.append((ids, torch.from_numpy(x["attention_mask"][:, :cols].astype(np.int64)),
                        torch.from_numpy(x["loss_mask"][:, 1:cols].astype(np.float32))))
    count = [0]

    def loss_fn(i: int = 0):
        ids, attn, mask = tensors[i % len(tensors)]
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="none")
        return (nll * mask.reshape(-1)).sum() / mask.sum()

    def step() -> float:
        count[0] += 1
        loss = loss_fn(count[0] - 1)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    extra: dict = {}
    if args.breakdown:
        def fwd():
            with torch.no_grad():
                return float(loss_fn())

        def fwd_bwd():
            loss = loss_fn()
            loss.backward()
            for p in trainable:
                p.grad = None
            return float(loss.detach())

        f_first, f_med, _ = _timed(fwd, 3)
        g_first, g_med, _ = _timed(fwd_bwd, 3)
        extra["breakdown"] = dict(forward_s=f_med, forward_first_s=f_first, fwd_bwd_s=g_med, fwd_bwd_first_s=g_first)
    mem_setup = _proc_status_mb()
    reset_ok = _reset_peak()
    losses, first, times, util = _timed_losses(step, args)
    return _summary("torch", args, losses, first, times, mem0, mem_setup, reset_ok, _real_tokens(batches, args),
                    cpu_util=util, **extra, seq_lens=inputs["torch_len"].tolist(),
                    lora_a_replaced=replaced,
                    n_trainable=sum(p.numel() for p in trainable), torch_version=torch.__version__,
                    transformers_version=transformers.__version__, peft_version=peft.__version__,
                    threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
                    attn_implementation=model.config._attn_implementation)


def child_main(args: argparse.Namespace) -> None:
    with np.load(args.inputs) as z:
        inputs = {k: z[k] for k in z.files}
    result = run_jax(args, inputs) if args.side == "jax" else run_torch(args, inputs)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent.


def _spawn(side: str, args: argparse.Namespace, inputs_path: str, *, xla_flags: str | None = None,
           torch_threads: int | None = None, all_logits: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--inputs={inputs_path}",
           f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}", f"--warmup={args.warmup}",
           f"--seed={args.seed}", f"--rank={args.rank}", f"--alpha={args.alpha}",
           f"--target_modules={args.target_modules}", f"--lr={args.lr}", f"--max_grad_norm={args.max_grad_norm}",
           f"--attn={args.attn}", f"--data={args.data}", f"--file_batches={args.file_batches}"]
    if args.qlora:
        cmd.append("--qlora")
    if args.model:
        cmd.append(f"--model={args.model}")
    threads = torch_threads or args.torch_threads
    if threads:
        cmd.append(f"--torch_threads={threads}")
    if all_logits:
        cmd.append("--all_logits")
    if args.breakdown:
        cmd.append("--breakdown")
    if args.hlo and side == "jax":
        cmd.append("--hlo")
    env = dict(os.environ)
    if xla_flags is not None:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {side} child failed (exit {proc.returncode}): {' '.join(cmd)}")
    res = json.loads(lines[-1][len("BENCH_RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    return res


def _variants(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "all" in asked:
        asked = list(VARIANTS)
    unknown = sorted(set(asked) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)} or all")
    out = [("jaxpeft", "jax", {})]
    if "all_logits" in asked:
        out.append(("jaxpeft, all-position logits", "jax", {"all_logits": True}))
    if "onednn" in asked:
        out.append((f"jaxpeft, {ONEDNN_FLAGS}", "jax", {"xla_flags": ONEDNN_FLAGS}))
    out.append(("PEFT", "torch", {}))
    if "torch1" in asked and args.torch_threads != 1:
        out.append(("PEFT, 1 torch thread", "torch", {"torch_threads": 1}))
    return out


def _fmt_mb(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def parent_main(args: argparse.Namespace) -> int:
    folder = model_folder(args.model)
    variants = _variants(args)
    load_before = os.getloadavg()
    inputs, meta = build_inputs(args, folder)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    w = max(len(name) for name, _, _ in variants) + 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(path, **inputs)
        for r in range(args.rounds):
            for name, side, kw in variants:
                res = _spawn(side, args, path, **kw)
                res["round"] = r
                results[name].append(res)
                print(f"  round {r} {name:<{w}s} {res['tokens_per_s']:8.1f} tok/s, {res['real_tokens_per_s']:7.1f} "
                      f"real tok/s  (median "
                      f"{res['median_s'] * 1e3:.0f} ms, min {res['min_s'] * 1e3:.0f} ms, first step "
                      f"{res['first_step_s']:.1f} s, peak +{res['peak_mb']:.0f} MB, CPU/wall {res['cpu_util']:.2f}, "
                      f"load {res['load'][0]:.2f}, child wall {res['wall_s']:.0f} s)", flush=True)
    load_after = os.getloadavg()

    jax_res, torch_res = results["jaxpeft"][0], results["PEFT"][0]
    tokens = args.batch * args.seq
    print()
    print(f"model {folder}")
    print(("QLoRA (NF4 + double quant, blocksize 64, all linears but the head; bitsandbytes on the PEFT side), "
           if args.qlora else "") + f"LoRA r={args.rank} alpha={args.alpha:g} on {args.target_modules}, dropout 0; "
          f"{jax_res['n_trainable']} trainable (jaxpeft) / {torch_res['n_trainable']} (PEFT)")
    print(f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step, fp32, AdamW lr {args.lr:g} cosine to 0 over "
          f"{total_steps(args)} steps, clip {args.max_grad_norm:g}; {args.steps} timed steps after 1 + "
          f"{args.warmup} warm-up step(s), "
          + (f"{args.file_batches} batches in turn" if meta["dynamic_padding"] else "same batch every step"))
    if meta["dynamic_padding"]:
        print(f"padding: jaxpeft static rows of {jax_res['seq_len']} (today's static shape); PEFT dynamic padding to "
              f"the longest row of each batch, {torch_res['seq_lens']}; compare the real (non-pad) tokens/s")
    print(f"data: {meta['desc']}; jaxpeft max_targets K={jax_res['max_targets']} "
          f"({jax_res['n_targets']} targets)")
    print(f"load average (1/5/15 min) before {'/'.join(f'{v:.2f}' for v in load_before)}, after "
          f"{'/'.join(f'{v:.2f}' for v in load_after)} on {os.cpu_count()} CPUs (the benchmark itself adds ~2 while it "
          f"runs; a 'before' above ~0.5, or 'after' well above 2, means other processes shared the CPUs and the "
          f"figures are noisy; so does a CPU/wall per child well under the {os.cpu_count()} it gets when alone)")
    print(f"jax {jax_res['jax_version']} on {jax_res['backend']}; torch {torch_res['torch_version']}, transformers "
          f"{torch_res['transformers_version']}, peft {torch_res['peft_version']}: "
          f"attn_implementation={torch_res['attn_implementation']}, threads {torch_res['threads']} "
          f"(interop {torch_res['interop_threads']})")
    print()
    # Over rounds: the best median step (the least disturbed run; its first step and CPU/wall too), the best
    # step, and the median of the memory figures (which load hardly moves).
    header = (f"{'side':<{w}s} {'tok/s':>7s} {'real/s':>7s} {'median ms':>9s} {'min ms':>7s} {'1st step s':>10s} "
              f"{'peak MB':>7s} {'train MB':>8s} {'loss@0':>9s} {'loss@end':>9s} {'CPU/wall':>8s} {'tok/s x':>7s} "
              f"{'mem x':>6s} {'real x':>6s}")
    print(header)
    print("-" * len(header))
    best = {name: min(r["median_s"] for r in runs) for name, runs in results.items()}
    peak = {name: statistics.median(r["peak_mb"] for r in runs) for name, runs in results.items()}
    calm = {name: min(runs, key=lambda r: r["median_s"]) for name, runs in results.items()}
    real = {name: max(r["real_tokens_per_s"] for r in runs) for name, runs in results.items()}
    for name, _, _ in variants:
        runs = results[name]
        mn = min(r["min_s"] for r in runs)
        first = calm[name]["first_step_s"]
        train_mb = [r["train_peak_mb"] for r in runs if r["train_peak_mb"] is not None]
        train = statistics.median(train_mb) if train_mb else None
        r0 = runs[0]
        print(f"{name:<{w}s} {tokens / best[name]:7.1f} {real[name]:7.1f} {best[name] * 1e3:9.0f} {mn * 1e3:7.0f} {first:10.1f} "
              f"{peak[name]:7.0f} {_fmt_mb(train):>8s} {r0['losses'][0]:9.5f} {r0['losses'][-1]:9.5f} "
              f"{calm[name]['cpu_util']:8.2f} {best['PEFT'] / best[name]:7.2f} {peak[name] / peak['PEFT']:6.2f} "
              f"{real[name] / real['PEFT']:6.2f}")
    print()
    print(f"jaxpeft / PEFT: real (non-pad) tokens/s x{real['jaxpeft'] / real['PEFT']:.2f} (the real tokens of the "
          f"timed steps over their summed time, best round), ", end="")
    print(f"tokens/s x{best['PEFT'] / best['jaxpeft']:.2f}, peak memory "
          f"x{peak['jaxpeft'] / peak['PEFT']:.2f} (best median step over {args.rounds} round(s); "
          f"peak = VmHWM - RSS after imports, median over rounds)")
    for name, runs in results.items():
        r = calm[name]
        comp = r["compile_est_s"]
        what = "first-call setup" if r["side"] == "torch" else \
            "compiled ahead by --hlo, so no compile here" if "compile_s" in r else "jit compilation"
        line = f"{name}: first step {r['first_step_s']:.1f} s, {comp:+.1f} s over the median step ({what})"
        if "compile_s" in r:
            line += f"; AOT lower {r['lower_s']:.1f} s + compile {r['compile_s']:.1f} s, HLO sha1 {r['hlo_sha1']} " \
                    f"({r['hlo_ynn_fusions']} 'ynn_fusion', {r['hlo_onednn_calls']} 'onednn' mentions)"
        if "breakdown" in r:
            bd = r["breakdown"]
            line += f"; forward loss {bd['forward_s'] * 1e3:.0f} ms, forward+backward {bd['fwd_bwd_s'] * 1e3:.0f} ms " \
                    f"(first calls {bd['forward_first_s']:.1f} / {bd['fwd_bwd_first_s']:.1f} s)"
        print(line)
    print()
    ok = True
    for name, _, _ in variants:
        if name == "PEFT":
            continue
        ref = "PEFT" if results[name][0]["side"] == "jax" else "jaxpeft"
        for r, t in zip(results[name], results[ref]):
            a, b = (r["losses"], t["losses"]) if r["side"] == "jax" else (t["losses"], r["losses"])
            d0 = abs(a[0] - b[0])
            dmax = max(abs(x - y) for x, y in zip(a, b))
            tol = args.qlora_tol if args.qlora else args.tol
            good = d0 <= tol
            ok &= good
            print(f"check {name} vs {ref} (round {r['round']}): step-0 loss jaxpeft {a[0]:.6f} vs PEFT {b[0]:.6f} "
                  f"(|diff| {d0:.1e}) -> {'OK' if good else 'MISMATCH'} (tol {tol:g}); largest per-step "
                  f"|diff| over {len(a)} steps {dmax:.1e}; final {a[-1]:.5f} vs {b[-1]:.5f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "meta": meta, "load_before": load_before, "load_after": load_after,
                       "results": results}, fh, indent=1)
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        child_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
